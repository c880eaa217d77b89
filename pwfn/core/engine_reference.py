"""The fixing engine's executable spec: a dense, obviously correct round (tiny inputs only).

:func:`reference_fix_round` does what the :mod:`pwfn.core.engine` docstring states, in the most
direct way: a dense (weights x centres) fit matrix per pick, Python loops, ``sorted`` with
the documented tie-breaks.  It costs O(#picks x N x #centres) time and O(N x #centres)
memory, so it is for tests and for reading, never for training.  The fast engine must
reproduce it exactly (values, masks, picks, escalations, fallback); only the sigma update
may differ by float rounding, because the spec sums with ``np.std`` in its own order.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pwfn.core.centres import CentreSet, candidate_centres, grid_limit
from pwfn.core.engine import EngineConfig, RoundResult, _validate, target_count
from pwfn.errors import EngineInputError

__all__ = ["reference_fix_round"]


def _candidates(max_abs: float, cfg: EngineConfig, dtype: torch.dtype) -> CentreSet:
    """Every centre up to max |values| at ``max_order``; budget mode: the allowed ones and zero."""
    cs = candidate_centres(grid_limit(max_abs, cfg.b) * 2.0**-cfg.b, cfg.max_order, cfg.b,
                           cfg.signed_terms, dtype=dtype)
    if cfg.allowed is None:
        return cs
    allowed = {float(a) for a in cfg.allowed} | {0.0}
    ok = torch.tensor([float(c) in allowed for c in cs.values.double().tolist()],
                      dtype=torch.bool)
    return CentreSet(values=cs.values[ok], orders=cs.orders[ok], signs=cs.signs[ok],
                     exponents=cs.exponents[ok], b=cs.b, max_order=cs.max_order,
                     signed_terms=cs.signed_terms)


def reference_fix_round(values: torch.Tensor, tolerance: torch.Tensor, fixed: torch.Tensor,
                        target_fraction: float, *, sigma: torch.Tensor | None = None,
                        config: EngineConfig | None = None) -> RoundResult:
    """One round exactly as specified (see :func:`pwfn.core.engine.fix_round`); CPU, small N."""
    cfg = EngineConfig() if config is None else config
    t_start = time.perf_counter()
    max_abs, n_fixed0 = _validate(values, tolerance, fixed, target_fraction, sigma)
    values, tolerance, fixed = values.detach().cpu(), tolerance.detach().cpu(), fixed.cpu()
    n = values.numel()
    target = target_count(target_fraction, n)
    if target < n_fixed0:
        raise EngineInputError(f"target_fraction: {target_fraction!r} asks for {target} fixed "
                               f"weights but {n_fixed0} of {n} are already fixed")
    need = target - n_fixed0
    cs = _candidates(max_abs, cfg, values.dtype)
    full = cs.values.double().tolist()
    new_v, fx = values.clone(), fixed.clone()
    assigned: dict[int, float] = {}  # weight index -> centre value, in fixing order
    picks: list[dict] = []
    order, mult, esc, order_turn, levels, fallback = 1, 1.0, 0, True, 0, 0
    vl, tl = values.double().tolist(), tolerance.double().tolist()
    small = (values.abs() < 2.0**-cfg.b).numpy()

    def key(c: float) -> tuple:  # the greedy's preference among centres: |c|, then negative
        return (abs(c), c)

    while need > 0:
        levels += 1
        level = cs.orders <= order
        c = cs.values[level].numpy()
        cl = c.astype(np.float64).tolist()
        orders = cs.orders[level].tolist()
        removed = np.zeros(c.size, dtype=bool)
        # m * t rounded once in the values' dtype, then the two sums
        mt = tolerance if mult == 1.0 else tolerance * mult
        lo, hi = (values - mt).numpy(), (values + mt).numpy()
        while need > 0:
            fit = (lo[:, None] <= c[None, :]) & (c[None, :] <= hi[:, None])  # dense N x C
            if cfg.zero_fix:
                fit[:, cl.index(0.0)] |= small  # the zero centre, by value
            fit &= ~fx.numpy()[:, None]
            fit[:, removed] = False
            counts = fit.sum(0).tolist()
            if max(counts) == 0:
                break
            best = min(range(len(cl)), key=lambda j: (-counts[j], *key(cl[j])))
            cb = cl[best]

            def ratio(i: int, cb: float = cb, mult: float = mult) -> float:
                d, m = abs(vl[i] - cb), tl[i] * mult
                return 0.0 if d == 0 else (math.inf if m == 0 else d / m)

            members = sorted(np.flatnonzero(fit[:, best]).tolist(), key=lambda i: (ratio(i), i))
            take = members[:need]
            for i in take:
                new_v[i], fx[i], assigned[i] = float(c[best]), True, cb
            need -= len(take)
            removed[best] = True
            picks.append({"centre": cb, "count": len(take), "centre_order": int(orders[best]),
                          "level_order": order, "multiplier": mult,
                          "partial": len(take) < len(members)})
        if need <= 0:
            break
        if esc >= cfg.max_escalations:  # fallback: nearest centre, nearest weights first
            cand = []
            for i in torch.nonzero(~fx).squeeze(1).tolist():
                j = min(range(len(full)), key=lambda j: (abs(full[j] - vl[i]), *key(full[j])))
                cand.append((abs(full[j] - vl[i]), i, j))
            for _, i, j in sorted(cand)[:need]:
                new_v[i], fx[i], assigned[i] = cs.values[j], True, full[j]
            fallback = min(need, len(cand))
            break
        esc += 1
        if order < cfg.max_order and order_turn:
            order, order_turn = order + 1, False
        else:
            mult, order_turn = mult * cfg.inc, True

    new_sigma = None if sigma is None else sigma.detach().cpu().clone()
    if new_sigma is not None and cfg.sigma_update != "keep":
        groups: dict[float, list[float]] = {}
        for i, cv in assigned.items():
            groups.setdefault(cv, []).append(float(values[i]))
        for i, cv in assigned.items():
            s = (float(sigma[i]) / cfg.sigma_divisor if cfg.sigma_update == "divide"
                 else float(np.std(np.array(groups[cv], dtype=np.float64))))
            new_sigma[i] = max(s, cfg.sigma_floor)
    per_centre: dict[str, int] = {}
    for p in picks:
        per_centre[repr(p["centre"])] = per_centre.get(repr(p["centre"]), 0) + p["count"]
    summary = {
        "n": n, "target_fraction": float(target_fraction), "target": target,
        "fixed_before": n_fixed0, "fixed_after": int(fx.sum()),
        "newly_fixed": int(fx.sum()) - n_fixed0, "max_abs": max_abs, "n_candidates": len(cs),
        "picks": picks, "fixed_per_centre": per_centre, "levels": levels, "escalations": esc,
        "final_order": order, "final_multiplier": mult, "fallback": fallback,
        "seconds": time.perf_counter() - t_start,
    }
    return RoundResult(values=new_v, fixed=fx, newly_fixed=fx & ~fixed, sigma=new_sigma,
                       centres=cs, summary=summary)
