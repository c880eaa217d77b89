"""sigma initialisers for mean-field Gaussian weights.

The paper's rule gives weights that already sit near a power of two a small sigma (they are
"easy" to fix) and weights far from one room to move. All initialisers are pure functions of
the mu tensor so they can be tested against a direct evaluation of the formula.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from .errors import BayesError

#: Default sigma floor: keeps the standard deviation strictly positive (research code: 2^-30).
DEFAULT_SIGMA_FLOOR = 2.0**-30


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) without ``torch.quantile``'s size limit."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise BayesError("cannot take a quantile of an empty tensor")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(flat, lo + 1).values
    if frac == 0.0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(flat, hi + 1).values
    return v_lo + (v_hi - v_lo) * frac


def power_of_two_distance(mu: torch.Tensor) -> torch.Tensor:
    """r = |(mu - p_up)/mu| * |(mu - p_down)/mu| with p_up/p_down the powers of two around |mu|.

    r is 0 on an exact power of two (and, by convention, at mu == 0) and at most 1/8.
    """
    r = _power_of_two_distance64(mu)
    return r.to(mu.dtype if mu.dtype.is_floating_point else torch.float32)


def _power_of_two_distance64(mu: torch.Tensor) -> torch.Tensor:
    """:func:`power_of_two_distance` in float64, whatever the dtype of ``mu``."""
    a = mu.detach().abs().to(torch.float64)
    nonzero = a > 0
    safe = torch.where(nonzero, a, torch.ones_like(a))
    # (log2 of the largest doubles rounds up to 1024; clamp so that p_down stays finite.)
    p_down = torch.exp2(torch.floor(torch.log2(safe)).clamp(max=1023))
    # log2 rounding can put p_down one binade off for values next to a power of two: correct it.
    p_down = torch.where(p_down > safe, p_down / 2, p_down)
    p_down = torch.where(p_down * 2 <= safe, p_down * 2, p_down)
    # With t = |mu| / p_down in [1, 2) (exact: p_down is a power of two), p_up = 2 * p_down and
    # r = |(t - 2)/t| * |(t - 1)/t| -- the same value, but 2 * p_down is never formed, so it
    # cannot overflow to inf (and give NaN/inf r) for |mu| >= 2^1023 in float64.
    t = safe / p_down
    r = ((t - 2) / t).abs() * ((t - 1) / t).abs()
    return torch.where(nonzero, r, torch.zeros_like(r))


def power_of_two_sigma(
    mu: torch.Tensor,
    scale: float = 0.0025,
    q: float = 0.75,
    floor: float = DEFAULT_SIGMA_FLOOR,
    ceiling: float = 0.05,
) -> torch.Tensor:
    """The paper's per-tensor rule: sigma = clamp(scale * r / quantile_q(r), floor, ceiling).

    If the q-quantile of r is 0 (most weights exactly on powers of two) the largest r is used
    as the normaliser instead, so the rule never divides by zero or produces NaN.
    """
    _check_floor(floor)
    if mu.numel() == 0:
        return torch.empty_like(mu)
    # Normalise in float64: rounding r to a low-precision mu dtype first would flush small r.
    r = _power_of_two_distance64(mu)
    norm = quantile(r, q)
    if norm <= 0:
        norm = r.max()
    if norm <= 0:
        norm = torch.ones((), dtype=r.dtype, device=r.device)
    sigma = (scale * r / norm).clamp(min=floor, max=ceiling)
    return sigma.to(mu.dtype)


def constant_sigma(mu: torch.Tensor, value: float = 1e-3, floor: float = DEFAULT_SIGMA_FLOOR) -> torch.Tensor:
    """Every weight gets the same sigma."""
    _check_floor(floor)
    if not value > 0:
        raise BayesError(f"constant sigma must be positive, got {value}")
    return torch.full_like(mu, max(value, floor))


def moped_sigma(mu: torch.Tensor, delta: float = 0.1, floor: float = DEFAULT_SIGMA_FLOOR) -> torch.Tensor:
    """MOPED-style sigma = delta * |mu|, floored (mu == 0 gets the floor)."""
    _check_floor(floor)
    if not delta > 0:
        raise BayesError(f"MOPED delta must be positive, got {delta}")
    return (delta * mu.detach().abs()).clamp(min=floor)


def tensor_scale(mu: torch.Tensor) -> float:
    """A tensor's own scale, mean |mu| (float64 sum): scaling mu by 2^k scales it by exactly 2^k."""
    if mu.numel() == 0:
        return 0.0
    return float(mu.detach().abs().to(torch.float64).mean())


def laplace_sigma(
    fisher: torch.Tensor,
    dataset_size: int,
    prior_sigma: Union[float, torch.Tensor],
    floor: float = DEFAULT_SIGMA_FLOOR,
) -> torch.Tensor:
    """Diagonal Laplace posterior std: ``1 / sqrt(N * F + 1 / prior_sigma^2)``, floored.

    ``fisher`` is a per-weight (empirical) Fisher estimate of the per-example loss, e.g. the mean
    of squared per-example gradients; ``N`` the training-set size. Weights the data pins down (large
    curvature) get a small sigma, weights the loss ignores get the prior's. Never above the prior.
    """
    _check_floor(floor)
    if dataset_size <= 0:
        raise BayesError(f"dataset_size must be positive, got {dataset_size}")
    f = fisher.detach().to(torch.float64)
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise BayesError("the Fisher estimate must be finite and non-negative")
    prior = torch.as_tensor(prior_sigma, dtype=torch.float64, device=f.device)
    if not bool((prior > 0).all()):
        raise BayesError("prior_sigma must be positive")
    sigma = (dataset_size * f + prior.reciprocal().square()).rsqrt()
    return sigma.clamp_min(floor).to(fisher.dtype if fisher.is_floating_point() else torch.float32)


def _check_floor(floor: float) -> None:
    if not floor > 0:
        raise BayesError(f"sigma floor must be positive, got {floor}")


SigmaInit = Union[str, float, Callable[[torch.Tensor], torch.Tensor]]

SIGMA_INITIALISERS: dict[str, Callable[..., torch.Tensor]] = {
    "power_of_two": power_of_two_sigma,
    "constant": constant_sigma,
    "moped": moped_sigma,
}


def resolve_sigma_init(spec: SigmaInit, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a name, a constant or a callable into ``mu -> sigma``.

    ``kwargs`` are passed to a named initialiser (e.g. ``delta`` for "moped").
    """
    if callable(spec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
        return lambda mu: constant_sigma(mu, value, **kwargs)
    if isinstance(spec, str):
        if spec not in SIGMA_INITIALISERS:
            raise BayesError(
                f"unknown sigma initialiser {spec!r}; choose one of {sorted(SIGMA_INITIALISERS)}"
            )
        fn = SIGMA_INITIALISERS[spec]
        return lambda mu: fn(mu, **kwargs)
    raise BayesError(f"sigma_init must be a name, a number or a callable, got {type(spec).__name__}")
