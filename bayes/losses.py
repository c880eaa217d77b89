"""Objectives for training Bayesian layers: the paper's sigma regulariser and a standard KL.

Both take an optional ``frozen`` mapping ``"<layer>.<param>_sigma" -> bool mask`` of entries
that must receive no gradient (pwfn uses it for weights that are already fixed); ``bayes``
itself attaches no meaning to the mask.
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
from .layers import bayesian_layers

#: E|eps| for eps ~ N(0, 1): used where a forward drew no per-weight eps (local/mean modes).
EXPECTED_ABS_EPS = math.sqrt(2.0 / math.pi)


def _check_frozen_keys(model: nn.Module, frozen: Optional[Mapping[str, torch.Tensor]]) -> None:
    """Unknown keys are an error: a typo (or a DDP ``module.`` prefix) would silently unfreeze."""
    if not frozen:
        return
    known = {f"{lname + '.' if lname else ''}{p}_sigma" for lname, layer in bayesian_layers(model)
             for p in layer.present_params()}
    unknown = sorted(set(frozen) - known)
    if unknown:
        raise BayesError(
            f"frozen masks name no sigma of this model: {unknown[:5]}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            + f"; keys look like {sorted(known)[:2]}"
        )


def _keep(frozen: Optional[Mapping[str, torch.Tensor]], key: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    if not frozen or key not in frozen:
        return None
    mask = frozen[key]
    if mask.shape != like.shape:
        raise BayesError(f"frozen mask for {key!r} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return (~mask.to(torch.bool)).to(like.dtype)


def sigma_regularizer(
    model: nn.Module,
    tau: float = 0.05,
    lam: float = 2.0**-11,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Loss term pushing every sigma below ``tau`` upwards, weighted by the drawn noise.

    The term is ``lam/2 * sum(|eps| * relu(tau - sigma)**2)`` so its gradient w.r.t. each sigma is
    exactly ``-lam * relu(tau - sigma) * |eps|`` (zero for frozen entries), for the eps the last
    ``sample``-mode forward drew. Layers whose last forward drew no eps (``local``/``mean`` modes)
    use ``E|eps| = sqrt(2/pi)``. Call it after the forward pass, before ``backward``.
    """
    if tau < 0 or lam < 0:
        raise BayesError(f"tau and lam must be non-negative, got tau={tau}, lam={lam}")
    _check_frozen_keys(model, frozen)
    total: Optional[torch.Tensor] = None
    for lname, layer in bayesian_layers(model):
        for pname in layer.present_params():
            sigma = layer.sigma(pname)
            eps = layer.last_eps(pname)
            weight = eps.detach().abs() if eps is not None else torch.full_like(sigma, EXPECTED_ABS_EPS)
            term = weight * torch.relu(tau - sigma) ** 2
            keep = _keep(frozen, f"{lname + '.' if lname else ''}{pname}_sigma", sigma)
            if keep is not None:
                term = term * keep
            term = 0.5 * lam * term.sum()
            total = term if total is None else total + term
    if total is None:
        raise BayesError("the model has no Bayesian layer: nothing to regularise")
    return total


def kl_divergence(
    model: nn.Module,
    prior_sigma: float = 1.0,
    prior_mu: float = 0.0,
    dataset_size: Optional[int] = None,
    frozen: Optional[Mapping[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Closed-form KL(q || N(prior_mu, prior_sigma^2)) summed over every Gaussian weight.

    Divided by ``dataset_size`` when given, so ``cross_entropy + kl`` is the per-example
    negative ELBO. Computed with ``pyro.distributions``.
    """
    if not prior_sigma > 0:
        raise BayesError(f"prior_sigma must be positive, got {prior_sigma}")
    if dataset_size is not None and dataset_size <= 0:
        raise BayesError(f"dataset_size must be positive, got {dataset_size}")
    _check_frozen_keys(model, frozen)
    total: Optional[torch.Tensor] = None
    for lname, layer in bayesian_layers(model):
        for pname in layer.present_params():
            mu = layer.mu(pname)
            q = dist.Normal(mu, layer.floored_sigma(pname))
            prior = dist.Normal(torch.full_like(mu, prior_mu), torch.full_like(mu, prior_sigma))
            kl = _kl_divergence(q, prior)  # (pyro.distributions has no top-level kl_divergence)
            keep = _keep(frozen, f"{lname + '.' if lname else ''}{pname}_sigma", mu)
            if keep is not None:
                kl = kl * keep
            kl = kl.sum()
            total = kl if total is None else total + kl
    if total is None:
        raise BayesError("the model has no Bayesian layer: no KL to compute")
    return total / dataset_size if dataset_size else total
