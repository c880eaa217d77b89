"""Objectives for training Gaussian weights: the paper's sigma regulariser and a standard KL.

Both take an optional ``frozen`` mapping ``"<qualified parameter name>" -> bool mask`` of
entries that must receive no gradient (pwfn uses it for weights that are already fixed); the
names are those of the point-estimate model (``"fc.weight"``, ``"encoder.layers.0.self_attn.in_proj_weight"``).
``bayes`` itself attaches no meaning to the mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence as _kl_divergence
from torch import nn

from .errors import BayesError
from .layers import GaussianEntry, gaussian_parameters

#: E|eps| for eps ~ N(0, 1): used where a forward drew no per-weight eps (local/mean modes).
EXPECTED_ABS_EPS = math.sqrt(2.0 / math.pi)


def _entries(model: nn.Module, frozen: Optional[Mapping[str, torch.Tensor]], what: str) -> list[GaussianEntry]:
    entries = gaussian_parameters(model)
    if not entries:
        raise BayesError(f"the model has no Gaussian parameter: {what}")
    if frozen:
        known = {n for e in entries for n in (e.name, *e.aliases)}
        unknown = sorted(set(frozen) - known)
        if unknown:
            # a typo (or a DDP ``module.`` prefix) would silently unfreeze
            raise BayesError(
                f"frozen masks name no Gaussian parameter of this model: {unknown[:5]}"
                + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                + f"; names look like {sorted(known)[:2]}"
            )
    return entries


def _frozen_mask(frozen: Optional[Mapping[str, torch.Tensor]], entry: GaussianEntry,
                 like: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool mask of the entry's frozen elements (None when it has none)."""
    if not frozen:
        return None
    key = next((n for n in (entry.name, *entry.aliases) if n in frozen), None)
    if key is None:
        return None
    mask = frozen[key]
    if mask.shape != like.shape:
        raise BayesError(f"frozen mask for {key!r} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool and mask.device == like.device else mask.to(like.device, torch.bool)


def sigma_regularizer(
    model: nn.Module,
    tau: float = 0.05,
    lam: float = 2.0**-11,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
    tau_scale: Optional[Mapping[str, float]] = None,
) -> torch.Tensor:
    """Loss term pushing every sigma below ``tau`` upwards, weighted by the drawn noise.

    The term is ``lam/2 * sum(|eps| * relu(tau - sigma)**2)`` so its gradient w.r.t. each sigma is
    exactly ``-lam * relu(tau - sigma) * |eps|`` (zero for frozen entries), for the eps of the
    current ``sample``-mode draw. Tensors that drew no eps (``local``/``mean`` modes) use
    ``E|eps| = sqrt(2/pi)``. Call it after the forward pass, before ``backward``.

    ``tau_scale`` (``"<parameter name>" -> s``) makes the target per tensor: ``tau * s`` (tensors
    not named keep ``tau``). With ``s`` a tensor's own scale the push is scale-equivariant: scaling
    that tensor (and its sigmas) by ``2^k`` scales its gradient by ``2^k``, so an SGD step moves sigma
    by the same fraction of its size.
    """
    if tau < 0 or lam < 0:
        raise BayesError(f"tau and lam must be non-negative, got tau={tau}, lam={lam}")
    entries = _entries(model, frozen, "nothing to regularise")
    taus: object = float(tau)
    if tau_scale:
        taus = []
        for e in entries:
            key = next((n for n in (e.name, *e.aliases) if n in tau_scale), None)
            s = 1.0 if key is None else float(tau_scale[key])
            if not (s >= 0 and math.isfinite(s)):
                raise BayesError(f"tau_scale for {key!r} must be finite and >= 0, got {s}")
            taus.append(float(tau) * s)
    total: Optional[torch.Tensor] = None
    for group in _by_dtype_and_device(entries).values():  # one flat vector per dtype and device
        term = _regularise_group([entries[i] for i in group], [taus if isinstance(taus, float) else taus[i]
                                                               for i in group], frozen, float(lam))
        total = term if total is None else total + term.to(total.device)
    assert total is not None
    return total


def _by_dtype_and_device(entries: list[GaussianEntry]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(entries):
        s = e.gaussian.sigma
        groups.setdefault((s.dtype, s.device), []).append(i)
    return groups


def _regularise_group(entries: list[GaussianEntry], taus: list[float],
                      frozen: Optional[Mapping[str, torch.Tensor]], lam: float) -> torch.Tensor:
    """``lam/2 * sum(w * relu(tau - sigma)**2)`` over the tensors of one dtype and device.

    Why flat: the weights ``w`` (``|eps|``, zero where frozen) and the sigmas are concatenated
    once, so the term is a handful of single kernels on any device instead of several ops per
    tensor, and one autograd node hands each sigma its gradient as a view of one flat vector.
    """
    sigmas = [e.gaussian.sigma for e in entries]
    pieces = []
    for e, s in zip(entries, sigmas):
        eps = e.gaussian.last_eps  # drawn under no autograd graph (never requires grad)
        if eps is not None and eps.shape == s.shape:
            pieces.append(eps)
        else:  # no per-weight draw in this forward (local/mean modes): E|eps|
            pieces.append(torch.full_like(s, EXPECTED_ABS_EPS, requires_grad=False))
    weight = _flatten(pieces).abs()  # a new tensor (the flat of one tensor is a view of it)
    if frozen:
        masks = [_frozen_mask(frozen, e, s) for e, s in zip(entries, sigmas)]
        if any(m is not None for m in masks):
            weight.masked_fill_(_flatten([m if m is not None else torch.zeros_like(s, dtype=torch.bool)
                                          for m, s in zip(masks, sigmas)]), 0.0)  # frozen: no push, no gradient
    tau: object = taus[0]
    if len(set(taus)) > 1:  # a target per tensor
        sizes = torch.tensor([s.numel() for s in sigmas], device=weight.device)
        tau = torch.tensor(taus, dtype=weight.dtype, device=weight.device).repeat_interleave(sizes)
    return _SigmaRegularizer.apply(tau, lam, weight, *sigmas)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat vector of the tensors (torch's own flattening: a single copy, no per-tensor op in Python)."""
    return torch._utils._flatten_dense_tensors(tensors)


class _SigmaRegularizer(torch.autograd.Function):
    """``lam/2 * sum(w * relu(tau - sigma)**2)`` on flat vectors, gradient ``-lam * relu(tau - sigma) * w``.

    One node for all the group's sigmas: the gradient is known in closed form and comes back as
    views of one flat vector (see bayes_layer_cost for what a node per tensor costs).
    """

    @staticmethod
    def forward(ctx, tau, lam, weight, *sigmas):
        r = torch.rsub(_flatten(list(sigmas)), tau).clamp_min_(0.0)  # relu(tau - sigma), a new tensor
        rw = r * weight
        ctx.lam = lam
        ctx.save_for_backward(rw, *sigmas)
        return torch.dot(rw, r) * (0.5 * lam)

    @staticmethod
    def backward(ctx, grad_out):
        rw, *sigmas = ctx.saved_tensors
        grad = rw * (grad_out * -ctx.lam)
        return (None, None, None, *torch._utils._unflatten_dense_tensors(grad, sigmas))


def kl_divergence(
    model: nn.Module,
    prior_sigma: float = 1.0,
    prior_mu: float = 0.0,
    dataset_size: Optional[int] = None,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Closed-form KL(q || N(prior_mu, prior_sigma^2)) summed over every Gaussian weight.

    Divided by ``dataset_size`` when given, so ``task_loss + kl`` is the per-example
    negative ELBO. Computed with ``pyro.distributions``.
    """
    if not prior_sigma > 0:
        raise BayesError(f"prior_sigma must be positive, got {prior_sigma}")
    if dataset_size is not None and dataset_size <= 0:
        raise BayesError(f"dataset_size must be positive, got {dataset_size}")
    total: Optional[torch.Tensor] = None
    for e in _entries(model, frozen, "no KL to compute"):
        mu = e.mu
        q = dist.Normal(mu, e.gaussian.floored_sigma())
        prior = dist.Normal(torch.full_like(mu, prior_mu), torch.full_like(mu, prior_sigma))
        kl = _kl_divergence(q, prior)  # (pyro.distributions has no top-level kl_divergence)
        mask = _frozen_mask(frozen, e, mu)
        if mask is not None:
            kl = kl.masked_fill(mask, 0.0)
        kl = kl.sum()
        total = kl if total is None else total + kl
    assert total is not None
    return total / dataset_size if dataset_size else total
