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
    sigmas = [e.sigma for e in entries]
    drawn = [e.gaussian.last_eps for e in entries]
    have = [i for i, (eps, s) in enumerate(zip(drawn, sigmas)) if eps is not None and eps.shape == s.shape]
    weights: list = [None] * len(entries)
    if have:
        for i, w in zip(have, torch._foreach_abs([drawn[i].detach() for i in have])):
            weights[i] = w
    for i, e in enumerate(entries):
        if weights[i] is None:
            weights[i] = torch.full_like(sigmas[i], EXPECTED_ABS_EPS)
        if frozen:
            mask = _frozen_mask(frozen, e, sigmas[i])
            if mask is not None:
                weights[i] = weights[i].masked_fill(mask, 0.0)  # frozen entries: no push, no gradient
    # One autograd node for the whole network: the gradient is known in closed form, and one
    # node instead of seven per tensor keeps a training step cheap (see bayes_layer_cost).
    return _SigmaRegularizer.apply(taus, float(lam), weights, *sigmas)


class _SigmaRegularizer(torch.autograd.Function):
    """``lam/2 * sum(w * relu(tau - sigma)**2)`` with gradient ``-lam * relu(tau - sigma) * w``."""

    @staticmethod
    def forward(ctx, tau, lam, weights, *sigmas):
        # relu(tau - sigma) for every tensor at once (torch's multi-tensor ops)
        r = torch._foreach_neg(list(sigmas))
        torch._foreach_add_(r, tau)  # one float, or one float per tensor
        torch._foreach_clamp_min_(r, 0.0)
        rw = torch._foreach_mul(r, list(weights))  # w * relu(tau - sigma)
        ctx.lam = lam
        ctx.save_for_backward(*rw)
        sq = torch._foreach_mul(rw, r)  # w * relu(tau - sigma)^2
        total = torch.cat([t.reshape(-1) for t in sq]).sum() if len(sq) > 1 else sq[0].sum()
        return total * (0.5 * lam)

    @staticmethod
    def backward(ctx, grad_out):
        grads = torch._foreach_mul(list(ctx.saved_tensors), -ctx.lam)
        if not bool(grad_out == 1):
            grads = torch._foreach_mul(grads, grad_out)
        return (None, None, None, *grads)


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
