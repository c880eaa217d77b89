"""The published WFN clustering (ECCV 2022), for a faithful baseline beside pwfn's ``wfn``.

pwfn's ``wfn`` runs the PWFN greedy with the tolerance ``delta_t * |w|``. The published method
clusters differently (docs/ALGORITHM.md section 2b); this module does that, per round:

* ``delta_t = delta * (T - t)``; the acceptance bound ``a`` starts at ``delta_t``; order ``k`` at 0.
* Candidates for ``(delta_t, k)``: a geometric grid ``v_0 = 2^-7``, ``v_{i+1} = v_i (1 + delta_t) /
  (1 - delta_t)`` while ``v_i < max |w|`` over the unfixed weights, each snapped to a signed additive
  power-of-two form ``c = P(v)``, ``P(x) = sign(x) 2^max(L, round(log2 |x|))``, ``L = -8 - k``
  (floored at ``-24`` here so every value stays a multiple of 2^-24, the finest term run files record), then ``k`` times: ``r = v - c``;
  if ``|r| >= delta_t |v|`` and ``c != 0``: ``c += P(r)``. Candidates are the unique ``+-c`` and 0.
* Pick: the candidate that is the absolute-nearest centre of the most unfixed weights; accept: all
  unfixed weights sorted by relative distance ``|w - c| / |w|`` (``0/0 := 1``; 0 for ``|w| < 2^-7``
  at the zero centre), the longest prefix whose mean non-zero distance is ``<= a``, capped at what
  the round still needs.
* Escalate when nothing was accepted: ``k += 1``; once ``k > 20`` also ``a *= 2``. After a success
  ``a`` returns to ``delta_t``; ``k`` is not reset within the round.
* Fixed values never move (the research code re-clusters all weights every round).

The candidate set of a pick is tiny (a few hundred values), so a pick is one ``searchsorted`` and
one sort over the unfixed weights: O(N log N) per pick, no ``#centres x #weights`` matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pwfn.core.engine import target_count
from pwfn.errors import EngineInputError

__all__ = ["published_candidates", "published_wfn_round"]

_SMALL = 2.0**-7
_MIN_EXP = -24
_K_DOUBLE = 20  # past this order the acceptance bound doubles on every further failure
_MAX_FAILURES = 400


def _snap(x: np.ndarray, low_exp: int) -> np.ndarray:
    """``P(x) = sign(x) 2^max(L, round(log2 |x|))`` elementwise (0 stays 0)."""
    out = np.zeros_like(x)
    nz = x != 0
    e = np.maximum(low_exp, np.round(np.log2(np.abs(x[nz]))))
    out[nz] = np.sign(x[nz]) * np.exp2(e)
    return out


def published_candidates(delta_t: float, order: int, max_abs: float) -> np.ndarray:
    """The sorted candidate centres (float64, zero included) for ``(delta_t, order)`` up to ``max_abs``."""
    if not 0 < delta_t < 1:
        raise EngineInputError(f"delta_t must be in (0, 1), got {delta_t!r}")
    ratio = (1.0 + delta_t) / (1.0 - delta_t)
    n = max(1, int(math.ceil(math.log(max(max_abs, _SMALL) / _SMALL) / math.log(ratio))) + 1)
    grid = _SMALL * ratio ** np.arange(n, dtype=np.float64)
    grid = grid[np.concatenate([[True], grid[:-1] < max_abs])]  # v_{i+1} exists while v_i < max|w|
    low = max(int(math.log2(_SMALL)) - order - 1, _MIN_EXP)
    c = _snap(grid, low)
    for _ in range(order):
        r = grid - c
        step = (np.abs(r) >= delta_t * np.abs(grid)) & (c != 0)
        c = np.where(step, c + _snap(r, low), c)
    c = np.unique(np.concatenate([c, -c, [0.0]]))
    return c


def published_wfn_round(values: torch.Tensor, fixed: torch.Tensor, delta_t: float,
                        target_fraction: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One round of the published WFN clustering: returns (values, fixed, summary).

    At least ``ceil(p * N)`` weights are fixed afterwards; fixed entries keep their values. The
    new values are exact float64 sums of powers of two written in ``values``' dtype.
    """
    if values.dim() != 1 or fixed.shape != values.shape or fixed.dtype != torch.bool:
        raise EngineInputError("values must be 1-D and fixed a bool mask of the same shape")
    n = values.numel()
    fixed_np = fixed.cpu().numpy()
    n_fixed = int(fixed_np.sum())
    target = target_count(target_fraction, n)
    out_v = values.detach().clone()
    out_f = fixed.clone()
    summary: dict[str, Any] = {"picks": 0, "escalations": 0, "final_order": 0, "final_bound": delta_t}
    if target - n_fixed <= 0:
        return out_v, out_f, summary
    w_all = values.detach().double().cpu().numpy()
    pool = np.flatnonzero(~fixed_np)  # the free weights (the research code re-clusters fixed ones too)
    need = target - n_fixed
    order, a, failures = 0, float(delta_t), 0
    cands_key = None
    cands = np.zeros(1)
    while need > 0:
        w = w_all[pool]
        max_abs = float(np.abs(w).max())
        key = (order, max_abs)
        if key != cands_key:
            cands = published_candidates(delta_t, order, max_abs)
            cands_key = key
        avail = cands
        # absolute-nearest centre of every free weight (ties: the lower centre); the most popular is picked
        pos = np.searchsorted(avail, w)
        lo = np.clip(pos - 1, 0, avail.size - 1)
        hi = np.clip(pos, 0, avail.size - 1)
        nearest = np.where(np.abs(w - avail[lo]) <= np.abs(w - avail[hi]), lo, hi)
        counts = np.bincount(nearest, minlength=avail.size)
        j = int(np.argmax(counts))  # ties: the lowest (most negative) centre
        c = float(avail[j])
        # acceptance ranks *every* free weight by its relative distance to c (as the research code
        # does), not only those nearest to c
        wm = w
        absw = np.abs(wm)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(absw > 0, np.abs(wm - c) / np.where(absw > 0, absw, 1.0), 1.0)
        if c == 0.0:
            d = np.where(absw < _SMALL, 0.0, d)
        ordr = np.argsort(d, kind="stable")
        ds = d[ordr]
        nz = np.cumsum(ds > 0)
        mean = np.cumsum(ds) / np.maximum(nz, 1)
        ok = np.flatnonzero(mean <= a)
        take = min(int(ok[-1]) + 1 if ok.size else 0, need)
        if take == 0:
            failures += 1
            summary["escalations"] += 1
            if failures > _MAX_FAILURES:  # only reachable for degenerate inputs: nearest-centre fallback
                take = min(wm.size, need)
            else:
                order += 1
                if order > _K_DOUBLE:
                    a *= 2.0
                continue
        new = pool[ordr[:take]]
        idx = torch.from_numpy(new).to(out_v.device)
        out_v[idx] = torch.tensor(c, dtype=out_v.dtype, device=out_v.device)
        out_f[idx] = True
        keep = np.ones(pool.size, dtype=bool)
        keep[ordr[:take]] = False
        pool = pool[keep]
        need -= take
        summary["picks"] += 1
        a = float(delta_t)
    summary["final_order"] = order
    summary["final_bound"] = a
    return out_v, out_f, summary
