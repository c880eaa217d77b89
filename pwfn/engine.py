"""The fixing engine: one greedy round of weight fixing, shared by PWFN and WFN.

A round fixes (quantises) enough of the still-free weights that at least ``ceil(p * N)``
of all ``N`` weights are fixed afterwards.  It is a pure tensor function: no module, no
optimizer, no global state; it runs wherever its inputs live (CPU or CUDA).

Semantics (see docs/ALGORITHM.md section 2, and the test file's dense reference):

* Candidate centres: :func:`pwfn.centres.candidate_centres` with ``max_abs`` = max |values|
  over the whole vector (fixed entries included).  A round starts at ``order = 1`` and
  tolerance multiplier ``m = 1``.
* Weight ``i`` *fits* centre ``c`` iff ``v_i - m*t_i <= c <= v_i + m*t_i``, evaluated in the
  values' dtype (``m*t_i`` rounded once, then the two sums).  With ``zero_fix`` every free
  weight with ``|v_i| < 2**-b`` also fits the zero centre (found by value).
* Greedy: take the centre that fits the most free weights (ties: smallest ``|c|``, then
  the negative one); fix all its fitting weights, or - when that is more than this round
  still needs - the ``need`` ones with the smallest ``|v_i - c| / (m*t_i)`` (float64;
  ``0/0 := 0``, ``x/0 := inf``), ties by lower index.  That centre is then out for the
  rest of the level.  When no centre fits any free weight, escalate: raise ``order``
  (up to ``max_order``) and multiply ``m`` by ``inc`` alternately, order first, then only
  ``m`` once ``order == max_order``; the full candidate set (used centres included) comes
  back.
* Fallback: after ``max_escalations`` escalation steps, the still-needed weights go to
  their nearest centre of order <= ``max_order`` (ranked by that absolute distance, ties by
  index; equidistant centres resolved as above).  This only matters for weights no finite
  multiplier helps, e.g. zero tolerance.

Fast path (why a level costs O(N) elementwise work instead of O(#centres x N)): the
fitting centres of a weight are a contiguous run ``[a_i, b_i]`` of the sorted candidates
(zero_fix keeps it contiguous).  Runs come from exact integer grid arithmetic
(``c = n * 2**-b``, so ``c >= lo  <=>  n >= ceil(lo * 2**b)``) and table lookups, and
weights are bucketed by *run type* ``(a, b)``: an integer histogram of ``(C+1)**2`` bins
(or the unique run types, when that is smaller).  The whole greedy pick sequence of a
level depends only on that histogram, so it runs on the host over run types.  Key fact:
a full pick of centre ``j`` fixes *every* free weight covering ``j``, so the weights still
free and covering ``j'`` are exactly the run types with ``L < a <= j' <= b < R`` for the
nearest picked centres ``L < j' < R``.  The device then applies the result with one table
lookup per weight; only the final, partial pick ranks weights (a k-th value selection,
not a sort).  Nothing of size ``#centres x #weights`` is ever allocated, weights are
processed in cache-sized chunks, and there are no float atomics (counts are integer
bincounts, per-centre sigma statistics serial host sums), so results are deterministic
on CPU and GPU.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from pwfn.centres import CentreSet, candidate_centres, grid_limit
from pwfn.errors import ConfigError, EngineInputError

__all__ = ["EngineConfig", "RoundResult", "fix_round", "lookup_centres", "target_count"]

log = logging.getLogger(__name__)

_SIGMA_UPDATES = ("std_mu", "keep", "divide")
_CHUNK = 1 << 16  # elements per chunk of the per-weight run computation (cache-sized)
# Switches between two exact implementations of the same step (tests force both paths):
_GRID_MIN = 1 << 16  # grid lookup tables when the grid span is <= max(this, #work)
_DENSE_MIN = 1 << 16  # dense run-type histogram when #bins <= max(this, #work)
_PER_WORK = 1


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the fixing engine; the defaults are the PWFN paper's.

    ``signed_terms=False`` gives the PWFN codebook (positive power-of-two terms), ``True``
    the WFN one (signed terms).  ``inc`` multiplies the tolerance on escalation.
    ``sigma_update`` says what a newly fixed weight's sigma becomes: ``"std_mu"`` (population
    std of the values fixed to the same centre in this round), ``"keep"``, or ``"divide"``
    (``sigma / sigma_divisor``); both changing rules are floored at ``sigma_floor``.
    ``max_escalations`` caps escalation steps per round before the nearest-centre fallback
    (``inc**max_escalations`` must stay <= 2**100 so multiplied tolerances stay finite).
    ``allowed`` (budget mode, ``pwfn.budget``): when given, only these candidate values (and
    zero) can be chosen, in every level and in the fallback.
    """

    b: int = 7
    max_order: int = 4
    signed_terms: bool = False
    zero_fix: bool = True
    inc: float = 2.0
    sigma_update: str = "std_mu"
    sigma_divisor: float = 2.0
    sigma_floor: float = 2.0**-30
    max_escalations: int = 64
    allowed: tuple | None = None

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.b) or not 0 <= self.b <= 30:
            raise ConfigError(f"engine.b must be an int in [0, 30], got {self.b!r}")
        if not is_int(self.max_order) or not 1 <= self.max_order <= 32:
            raise ConfigError(f"engine.max_order must be an int in [1, 32], got {self.max_order!r}")
        if not isinstance(self.signed_terms, bool) or not isinstance(self.zero_fix, bool):
            raise ConfigError("engine.signed_terms and engine.zero_fix must be booleans")
        if not isinstance(self.inc, numbers.Real) or not math.isfinite(self.inc) or self.inc <= 1:
            raise ConfigError(f"engine.inc must be a finite number > 1, got {self.inc!r}")
        if self.sigma_update not in _SIGMA_UPDATES:
            raise ConfigError(
                f"engine.sigma_update must be one of {_SIGMA_UPDATES}, got {self.sigma_update!r}"
            )
        if (not isinstance(self.sigma_divisor, numbers.Real)
                or not math.isfinite(self.sigma_divisor) or self.sigma_divisor <= 0):
            raise ConfigError(f"engine.sigma_divisor must be > 0, got {self.sigma_divisor!r}")
        if (not isinstance(self.sigma_floor, numbers.Real)
                or not math.isfinite(self.sigma_floor) or self.sigma_floor < 0):
            raise ConfigError(f"engine.sigma_floor must be >= 0, got {self.sigma_floor!r}")
        if not is_int(self.max_escalations) or self.max_escalations < 0:
            raise ConfigError(
                f"engine.max_escalations must be an int >= 0, got {self.max_escalations!r}"
            )
        if self.allowed is not None and (not isinstance(self.allowed, tuple) or not all(
                isinstance(v, numbers.Real) and math.isfinite(v) for v in self.allowed)):
            raise ConfigError("engine.allowed must be a tuple of finite numbers (or None)")
        # keep every multiplier (<= inc**max_escalations) finite even in float32
        if self.max_escalations * math.log2(self.inc) > 100:
            raise ConfigError(
                f"engine.inc**engine.max_escalations = {self.inc}**{self.max_escalations} "
                "exceeds 2**100; lower one of them"
            )


@dataclass
class RoundResult:
    """Outcome of one round.

    ``values``: the input with newly fixed entries replaced by their centre (exact).
    ``fixed`` / ``newly_fixed``: bool masks.  ``sigma``: updated sigma (``None`` when none
    was given).  ``centres``: this round's candidate set at ``max_order``.  ``summary``:
    JSON-friendly per-round statistics.  ``centre_index`` (int32) and ``order`` (int8) are
    computed on first access (an O(N) lookup the training loop rarely needs): the index
    into ``centres`` / term count of every fixed weight's value, ``-1`` for free weights
    (and for fixed values that are not in ``centres``, e.g. set by hand).  Zero has order 0.
    """

    values: torch.Tensor
    fixed: torch.Tensor
    newly_fixed: torch.Tensor
    sigma: torch.Tensor | None
    centres: CentreSet
    summary: dict = field(default_factory=dict)

    @cached_property
    def centre_index(self) -> torch.Tensor:
        return lookup_centres(self.values, self.centres, self.fixed)

    @cached_property
    def order(self) -> torch.Tensor:
        orders = torch.cat([self.centres.orders.to(torch.int8),
                            torch.full((1,), -1, dtype=torch.int8, device=self.values.device)])
        ci = self.centre_index
        return orders.index_select(0, torch.where(ci >= 0, ci, len(self.centres)))


def target_count(target_fraction: float, n: int) -> int:
    """``ceil(p * n)`` with a tiny slack, so that binary rounding (``0.2 * 10``) is harmless."""
    return int(min(n, max(0, math.ceil(float(target_fraction) * n - 1e-12 * n))))


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, x: Any, like: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise EngineInputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if like is not None:
        if tuple(x.shape) != tuple(like.shape):
            raise EngineInputError(
                f"{name}: shape {tuple(x.shape)} does not match values {tuple(like.shape)}"
            )
        if x.device != like.device:
            raise EngineInputError(f"{name}: on {x.device}, values on {like.device}")
    return x


def _validate(values: Any, tolerance: Any, fixed: Any, target_fraction: Any,
              sigma: Any) -> tuple[float, int]:
    """Check every input; return (max |values|, number fixed).  One pass per tensor."""
    values = _check_tensor("values", values, None)
    if values.dim() != 1:
        raise EngineInputError(f"values: expected a 1-D tensor, got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise EngineInputError("values: empty (N = 0), nothing to fix")
    if values.dtype not in (torch.float32, torch.float64):
        raise EngineInputError(f"values: dtype must be float32 or float64, got {values.dtype}")
    lo, hi = (float(x) for x in torch.aminmax(values.detach()))  # NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EngineInputError("values: contains NaN or inf")
    tolerance = _check_tensor("tolerance", tolerance, values)
    if tolerance.dtype != values.dtype:
        raise EngineInputError(f"tolerance: dtype {tolerance.dtype} != values dtype {values.dtype}")
    tlo, thi = (float(x) for x in torch.aminmax(tolerance.detach()))
    if math.isnan(tlo) or math.isnan(thi):
        raise EngineInputError("tolerance: contains NaN")
    if tlo < 0:
        raise EngineInputError("tolerance: contains negative entries")
    if math.isinf(thi):
        raise EngineInputError("tolerance: contains inf")
    fixed = _check_tensor("fixed", fixed, values)
    if fixed.dtype != torch.bool:
        raise EngineInputError(f"fixed: dtype must be torch.bool, got {fixed.dtype}")
    if sigma is not None:
        sigma = _check_tensor("sigma", sigma, values)
        if sigma.dtype != values.dtype:
            raise EngineInputError(f"sigma: dtype {sigma.dtype} != values dtype {values.dtype}")
        slo, shi = (float(x) for x in torch.aminmax(sigma.detach()))
        if not (math.isfinite(slo) and math.isfinite(shi)):
            raise EngineInputError("sigma: contains NaN or inf")
    if (isinstance(target_fraction, bool) or not isinstance(target_fraction, numbers.Real)
            or not math.isfinite(float(target_fraction))
            or not 0.0 <= float(target_fraction) <= 1.0):
        raise EngineInputError(
            f"target_fraction: must be a number in [0, 1], got {target_fraction!r}"
        )
    return max(-lo, hi), int(torch.count_nonzero(fixed))


# --------------------------------------------------------------------------- levels


class _Level:
    """Candidates of one escalation level plus exact lookup tables grid -> run bounds."""

    def __init__(self, centres: CentreSet, order: int, grid_full: torch.Tensor,
                 prio_full: np.ndarray, use_grid: bool) -> None:
        dev = centres.values.device
        self.full_index = centres.subset(order)  # int64, ascending
        self.full_index_list = self.full_index.cpu().tolist()
        self.values = centres.values.index_select(0, self.full_index)
        self.grid = grid_full.index_select(0, self.full_index)
        self.C = int(self.values.numel())
        self.zero = int(torch.searchsorted(self.grid, torch.zeros((), dtype=torch.int64,
                                                                  device=dev)))
        self.G = int(grid_full[-1]) if grid_full.numel() else 0
        self.scale = 2.0**centres.b
        # tie-break priority restricted to this level (a subset keeps the relative order)
        sub = prio_full[self.full_index.cpu().numpy()]
        self.prio = np.argsort(np.argsort(sub, kind="stable"), kind="stable").astype(np.int64)
        self.use_grid = use_grid
        if self.use_grid:
            g = torch.arange(-self.G - 1, self.G + 2, dtype=torch.int64, device=dev)
            self.first_ge = torch.searchsorted(self.grid, g, out_int32=True)
            self.last_le1 = torch.searchsorted(self.grid, g, right=True, out_int32=True)
        # run [a, b] -> key a*(C+1) + (b+1); an empty run (b = a-1) gets a key of its own
        self.nbins = (self.C + 1) ** 2
        self.key_dtype = torch.int32 if self.nbins < 2**31 - 1 else torch.int64

    def dense(self, n_work: int) -> bool:
        """Dense run-type histogram (bincount) unless it would dwarf the work."""
        return self.nbins <= max(_DENSE_MIN, _PER_WORK * n_work)

    def keys(self, v: torch.Tensor, t: torch.Tensor, mult: float, zero_fix: bool,
             small_thr: float, out: torch.Tensor) -> torch.Tensor:
        """Run-type key ``a*(C+1) + b+1`` of each weight, written into ``out``."""
        G, C, z = self.G, self.C, self.zero
        mt = t if mult == 1.0 else t * mult
        lo = v - mt
        hi = v + mt
        if self.use_grid:
            # c = n * 2**-b >= lo  <=>  n >= ceil(lo * 2**b): exact, scaling is exact
            lo.mul_(self.scale).ceil_().clamp_(-G - 1, G + 1).add_(G + 1)
            hi.mul_(self.scale).floor_().clamp_(-G - 1, G + 1).add_(G + 1)
            a = self.first_ge.index_select(0, lo.to(torch.int32))
            b1 = self.last_le1.index_select(0, hi.to(torch.int32))
        else:
            a = torch.searchsorted(self.values, lo, out_int32=True)
            b1 = torch.searchsorted(self.values, hi, right=True, out_int32=True)
        if zero_fix:
            # |v| < 2**-b joins zero; the run stays contiguous (0 is in or next to it)
            small = v.abs_() < small_thr
            a = torch.where(small, a.clamp(max=z), a)
            b1 = torch.where(small, b1.clamp(min=z + 1), b1)
        if self.key_dtype != torch.int32:
            a = a.to(self.key_dtype)
            b1 = b1.to(self.key_dtype)
        return torch.add(b1, a, alpha=C + 1, out=out)


def _greedy(type_keys: np.ndarray, type_counts: np.ndarray, C: int, prio: np.ndarray,
            need: int) -> tuple[np.ndarray, list, int]:
    """The greedy pick sequence of one level, on run types (host, small arrays).

    Returns ``code`` per run type (pick number for a full pick, -2 for the candidates of
    the final partial pick, -1 untouched), the picks ``[(candidate, n_taken, partial)]``
    and the remaining need.  Free weights covering ``j`` are exactly the run types with
    ``left < a <= j <= b < right`` (nearest picked candidates ``left < j < right``),
    because every earlier full pick fixed all weights covering it.
    """
    a_t = type_keys // (C + 1)
    b_t = type_keys % (C + 1) - 1  # empty runs (b = a-1) add nothing to any count
    m_t = type_counts.astype(np.int64)
    code = np.full(a_t.shape[0], -1, dtype=np.int32)
    if a_t.size == 0:
        return code, [], need
    mf = m_t.astype(np.float64)  # exact: counts < 2**53
    diff = np.bincount(a_t, mf, C + 1) - np.bincount(b_t + 1, mf, C + 1)
    counts = np.cumsum(diff)[:C].astype(np.int64)
    score = counts * C + prio  # max count first, then the tie-break priority
    picked = [-1, C]
    picks: list = []
    while need > 0:
        j = int(score.argmax())
        k = int(counts[j])
        if k <= 0:
            break
        pos = bisect.bisect_left(picked, j)
        left, right = picked[pos - 1], picked[pos]
        s = int(np.searchsorted(a_t, left, side="right"))
        e = int(np.searchsorted(a_t, j, side="right"))
        bb = b_t[s:e]
        sel = s + np.flatnonzero((bb >= j) & (bb < right))
        if k > need:
            code[sel] = -2
            picks.append((j, need, True))
            need = 0
            break
        code[sel] = len(picks)
        picks.append((j, k, False))
        need -= k
        picked.insert(pos, j)
        width = right - left  # only counts inside (left, right) change
        ms = mf[sel]
        d = (np.bincount(a_t[sel] - left, ms, width + 1)
             - np.bincount(b_t[sel] + 1 - left, ms, width + 1))
        counts[left + 1:right] -= np.cumsum(d)[1:width].astype(np.int64)
        score[left + 1:right] = counts[left + 1:right] * C + prio[left + 1:right]
    return code, picks, need


def _tiebreak_priority(values: torch.Tensor) -> np.ndarray:
    """Higher is better: smallest |c| first, then the negative centre (C-1 ... 0)."""
    c = values.double().cpu().numpy()
    order = np.lexsort((c, np.abs(c)))
    rank = np.empty(c.shape[0], dtype=np.int64)
    rank[order] = np.arange(c.shape[0])
    return c.shape[0] - 1 - rank


def _smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest scores, ties by position (deterministic, no sort)."""
    n = int(score.numel())
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    theta = torch.kthvalue(score, k).values
    below = score < theta
    at = score == theta
    room = k - int(torch.count_nonzero(below))
    return below | (at & (torch.cumsum(at.to(torch.int64), 0) <= room))


# --------------------------------------------------------------------------- lookups


class _GridTable:
    """Exact value -> centre index lookup (grid table, or binary search when huge)."""

    def __init__(self, centres: CentreSet, n: int) -> None:
        self.centres = centres
        self.grid = centres.grid()
        self.G = int(self.grid[-1]) if self.grid.numel() else 0
        self.scale = 2.0**centres.b
        self.use_grid = 2 * self.G + 3 <= max(_GRID_MIN, _PER_WORK * n)
        if self.use_grid:
            table = torch.full((2 * self.G + 3,), -1, dtype=torch.int32,
                               device=centres.values.device)
            table[self.grid + self.G + 1] = torch.arange(len(centres), dtype=torch.int32,
                                                         device=table.device)
            self.table = table

    def index(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """int32 centre index of each value where ``mask`` and the value is a centre, else -1."""
        out = torch.empty(values.shape, dtype=torch.int32, device=values.device)
        G = self.G
        step = max(_CHUNK, 1)
        for s in range(0, int(values.numel()), step):
            v = values[s:s + step]
            m = mask[s:s + step]
            if self.use_grid:
                sc = v * self.scale
                g = sc.clamp(-G - 1, G + 1).to(torch.int32)
                exact = (g.to(v.dtype) == sc) & m
                ci = self.table.index_select(0, g.add_(G + 1))
            else:
                cv = self.centres.values
                pos = torch.searchsorted(cv, v).clamp_(max=len(cv) - 1)
                exact = (cv.index_select(0, pos) == v) & m
                ci = pos.to(torch.int32)
            out[s:s + step] = ci.masked_fill_(~exact, -1)
        return out


def lookup_centres(values: torch.Tensor, centres: CentreSet,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """int32 index of each value in ``centres`` (exact match), -1 where absent or masked out.

    Why: callers (reporting, export) need the centre of fixed weights from their values.
    """
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    return _GridTable(centres, int(values.numel())).index(values.reshape(-1),
                                                          mask.reshape(-1)).reshape(values.shape)


# --------------------------------------------------------------------------- the round


def _group_std(v: torch.Tensor, ci: torch.Tensor, centre_values: torch.Tensor,
               n_centres: int) -> torch.Tensor:
    """Population std of ``v`` per centre index ``ci`` (float64, shape ``(n_centres,)``).

    Why on the host with numpy's serial bincount: float sums must not depend on thread or
    atomic order (CUDA float ``cumsum``/``index_add`` are not deterministic), and this way
    CPU and GPU runs give bit-identical sigmas.  Two passes (mean, then squared
    deviations from it) on deviations from the centre keep the precision.
    """
    idx = ci.cpu().numpy()
    d = v.cpu().numpy().astype(np.float64)
    d -= centre_values.cpu().numpy().astype(np.float64)[idx]
    denom = np.maximum(np.bincount(idx, minlength=n_centres), 1).astype(np.float64)
    mean = np.bincount(idx, weights=d, minlength=n_centres) / denom
    d -= mean[idx]
    var = np.bincount(idx, weights=np.square(d, out=d), minlength=n_centres) / denom
    return torch.from_numpy(np.sqrt(var)).to(v.device)


def _fallback(values: torch.Tensor, u: torch.Tensor, centres: CentreSet, need: int,
              prio_full: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Documented fallback: the ``need`` free weights nearest to any centre go to it."""
    cv = centres.values.double()
    v = values.index_select(0, u).double()
    hi = torch.searchsorted(cv, v).clamp_(max=len(cv) - 1)
    lo = (hi - 1).clamp_(min=0)
    d_hi = (cv.index_select(0, hi) - v).abs()
    d_lo = (cv.index_select(0, lo) - v).abs()
    prio = torch.as_tensor(prio_full, device=v.device)
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi)
                               & (prio.index_select(0, lo) > prio.index_select(0, hi)))
    ci = torch.where(take_lo, lo, hi)
    dist = torch.where(take_lo, d_lo, d_hi)
    chosen = _smallest(dist, need)
    return u.masked_select(chosen), ci.masked_select(chosen)


def _unfixed_indices(fixed: torch.Tensor, n_free: int) -> torch.Tensor:
    """Ascending indices of the free weights (int32 when N allows: 4 bytes each)."""
    n = int(fixed.numel())
    idt = torch.int32 if n < 2**31 - 1 else torch.int64
    u = torch.empty(n_free, dtype=idt, device=fixed.device)
    pos = 0
    step = max(_CHUNK, 1) * 4
    for s in range(0, n, step):  # chunked, so no N-sized int64 temporary
        nz = torch.nonzero(~fixed[s:s + step]).squeeze(1)
        u[pos:pos + nz.numel()] = nz.to(idt) + s
        pos += nz.numel()
    return u


class _Round:
    """Mutable state of one round (kept out of the public function for readability)."""

    def __init__(self, values: torch.Tensor, tolerance: torch.Tensor, fixed: torch.Tensor,
                 cfg: EngineConfig, prep: _Prepared, keep_assignments: bool,
                 need: int) -> None:
        self.values = values
        self.tolerance = tolerance
        self.cfg = cfg
        self.prep = prep
        self.centres = prep.centres
        self.prio_full = prep.prio_full
        self.small_thr = 2.0**-cfg.b
        self.new_values = values.clone()
        self.new_fixed = fixed.clone()
        self.keep = keep_assignments
        dev = values.device
        # newly fixed weights and their centres, in assignment order (for the sigma update)
        self.gi_buf = torch.empty(need if self.keep else 0, dtype=torch.int64, device=dev)
        self.ci_buf = torch.empty(need if self.keep else 0, dtype=torch.int32, device=dev)
        self.n_assigned = 0
        self.picks_log: list = []
        self.true = torch.ones((), dtype=torch.bool, device=dev)

    def assign(self, gi: torch.Tensor, ci: torch.Tensor) -> None:
        """Fix weights ``gi`` to full-set centres ``ci`` (int64)."""
        m = int(gi.numel())
        if m == 0:
            return
        gi = gi.to(torch.int64)
        self.new_values.index_put_((gi,), self.centres.values.index_select(0, ci))
        self.new_fixed.index_put_((gi,), self.true)
        if self.keep:
            self.gi_buf[self.n_assigned:self.n_assigned + m] = gi
            self.ci_buf[self.n_assigned:self.n_assigned + m] = ci
        self.n_assigned += m

    def level(self, u: torch.Tensor, order: int, mult: float, need: int
              ) -> tuple[torch.Tensor, int]:
        """One escalation level: greedy picks until ``need`` is met or nothing fits."""
        dev = u.device
        n_u = int(u.numel())
        lv = self.prep.level(order, n_u)
        step = max(_CHUNK, 1)
        # pass 1: run-type key of every free weight, and the run-type histogram
        keys = torch.empty(n_u, dtype=lv.key_dtype, device=dev)
        for s in range(0, n_u, step):  # chunks keep temporaries cache-sized
            idx = u[s:s + step]
            lv.keys(self.values.index_select(0, idx), self.tolerance.index_select(0, idx),
                    mult, self.cfg.zero_fix, self.small_thr, keys[s:s + step])
        hist = torch.bincount(keys, minlength=lv.nbins) if lv.dense(n_u) else None
        if hist is not None:
            type_keys_dev = torch.nonzero(hist).squeeze(1)
            type_counts = hist.index_select(0, type_keys_dev)
        else:
            type_keys_dev, type_counts = torch.unique(keys, sorted=True, return_counts=True)
        type_counts_np = type_counts.cpu().numpy()
        code_t, picks, need_after = _greedy(type_keys_dev.cpu().numpy(), type_counts_np, lv.C,
                                            lv.prio, need)
        if not picks:
            return u, need_after
        # pass 2: apply - one table lookup per weight
        code_dev = torch.as_tensor(code_t, device=dev)
        if hist is not None:
            table = torch.full((lv.nbins,), -1, dtype=torch.int32, device=dev)
            table[type_keys_dev] = code_dev
        else:
            table = code_dev  # aligned with the sorted unique keys
        pick_full = lv.full_index.index_select(
            0, torch.as_tensor([p[0] for p in picks], dtype=torch.int64, device=dev))
        partial = picks[-1][2]
        n_full = int(type_counts_np[code_t >= 0].sum())
        n_cand = int(type_counts_np[code_t == -2].sum())
        # preallocated outputs: no list-and-concatenate doubling of memory
        cand = torch.empty(n_cand if partial else 0, dtype=u.dtype, device=dev)
        rest = torch.empty(n_u - n_full if need_after > 0 else 0, dtype=u.dtype, device=dev)
        pc = pr = 0
        for s in range(0, n_u, step):
            kc = keys[s:s + step]
            if hist is None:
                kc = torch.searchsorted(type_keys_dev, kc)
            cw = table.index_select(0, kc)
            uc = u[s:s + step]
            full = cw >= 0
            self.assign(uc.masked_select(full),
                        pick_full.index_select(0, cw.masked_select(full).to(torch.int64)))
            if partial:
                x = uc.masked_select(cw == -2)
                cand[pc:pc + x.numel()] = x
                pc += x.numel()
            elif need_after > 0:
                x = uc.masked_select(cw == -1)
                rest[pr:pr + x.numel()] = x
                pr += x.numel()
        del keys
        if partial:  # the final pick: rank its candidates by normalised distance
            j, r, _ = picks[-1]
            dist = (self.values.index_select(0, cand).double()
                    - float(lv.values[j].double())).abs_()
            ratio = dist / (self.tolerance.index_select(0, cand).double() * mult)
            ratio.masked_fill_(dist == 0, 0.0)  # 0/0 := 0; x/0 = inf already
            del dist
            chosen = cand.masked_select(_smallest(ratio, r))
            self.assign(chosen, lv.full_index[j:j + 1].expand(chosen.numel()))
        for (j, k, part) in picks:
            fi = lv.full_index_list[j]
            self.picks_log.append({
                "centre": self.prep.values_list[fi], "count": int(k),
                "centre_order": self.prep.orders_list[fi], "level_order": order,
                "multiplier": mult, "partial": bool(part),
            })
        log.debug("level order=%d mult=%g: %d picks, need %d", order, mult, len(picks),
                  need_after)
        return (rest if need_after > 0 else u[:0]), need_after


class _Prepared:
    """A candidate set and everything derived from it; small, so cached across rounds."""

    def __init__(self, centres: CentreSet) -> None:
        self.centres = centres
        self.grid_full = centres.grid()
        self.G = int(self.grid_full[-1]) if self.grid_full.numel() else 0
        self.prio_full = _tiebreak_priority(centres.values)
        self.values_list = centres.values.double().cpu().tolist()
        self.orders_list = centres.orders.cpu().tolist()
        self._levels: dict = {}

    def level(self, order: int, n_work: int) -> _Level:
        # Grid tables are cheap elementwise lookups; use them unless the grid is huge
        # compared with the work (then a binary search per weight is cheaper).
        use_grid = 2 * self.G + 3 <= max(_GRID_MIN, _PER_WORK * n_work)
        lv = self._levels.get((order, use_grid))
        if lv is None:  # tables depend on the order only, not on the multiplier
            lv = self._levels[(order, use_grid)] = _Level(
                self.centres, order, self.grid_full, self.prio_full, use_grid)
        return lv


def _per_centre(picks: list) -> dict:
    """Weights fixed per centre value this round (picks only, not the fallback)."""
    out: dict = {}
    for p in picks:
        key = repr(p["centre"])  # dyadic, so repr is exact; str keys stay JSON-friendly
        out[key] = out.get(key, 0) + p["count"]
    return out


@functools.lru_cache(maxsize=16)
def _prepared(grid: int, max_order: int, b: int, signed_terms: bool, dtype: torch.dtype,
              device: torch.device, allowed: tuple | None = None) -> _Prepared:
    """Candidate sets depend on ``max_abs`` only through ``grid``: cache them.

    (Callers must treat ``RoundResult.centres`` as read-only; it may be shared.)
    """
    cs = candidate_centres(grid * 2.0**-b, max_order, b, signed_terms, device=device, dtype=dtype)
    if allowed is not None:  # budget mode: only the allowed values (and zero) stay candidates
        ok = torch.isin(cs.values.double(), torch.tensor(allowed, dtype=torch.float64, device=cs.values.device))
        ok |= cs.values == 0
        cs = CentreSet(values=cs.values[ok], orders=cs.orders[ok], signs=cs.signs[ok],
                       exponents=cs.exponents[ok], b=cs.b, max_order=cs.max_order,
                       signed_terms=cs.signed_terms)
    return _Prepared(cs)


def fix_round(values: torch.Tensor, tolerance: torch.Tensor, fixed: torch.Tensor,
              target_fraction: float, *, sigma: torch.Tensor | None = None,
              config: EngineConfig | None = None) -> RoundResult:
    """Fix free weights to shared power-of-two centres until ``ceil(p*N)`` are fixed.

    Why one function: PWFN (``tolerance = k*sigma``, ``signed_terms=False``) and WFN
    (``tolerance = delta_t*|w|``, ``signed_terms=True``) differ only in their inputs and
    config.  Inputs are not modified; already-fixed entries are returned bit-identical.
    Raises :class:`~pwfn.errors.EngineInputError` (naming the tensor) on bad input.
    """
    cfg = EngineConfig() if config is None else config
    if not isinstance(cfg, EngineConfig):
        raise ConfigError(f"config must be an EngineConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    max_abs, n_fixed0 = _validate(values, tolerance, fixed, target_fraction, sigma)
    values = values.detach()
    tolerance = tolerance.detach()
    sigma = None if sigma is None else sigma.detach()
    n = int(values.numel())
    n_target = target_count(target_fraction, n)
    if n_target < n_fixed0:
        raise EngineInputError(
            f"target_fraction: {target_fraction!r} asks for {n_target} fixed weights but "
            f"{n_fixed0} of {n} are already fixed"
        )
    prep = _prepared(grid_limit(max_abs, cfg.b), cfg.max_order, cfg.b, cfg.signed_terms,
                     values.dtype, values.device, cfg.allowed)
    centres = prep.centres
    keep = sigma is not None and cfg.sigma_update != "keep"
    need = n_target - n_fixed0
    rd = _Round(values, tolerance, fixed, cfg, prep, keep, max(need, 0))
    order, mult, escalations, order_turn, levels, n_fallback = 1, 1.0, 0, True, 0, 0
    if need > 0:
        u = _unfixed_indices(fixed, n - n_fixed0)
        while need > 0:
            levels += 1
            u, need = rd.level(u, order, mult, need)
            if need <= 0:
                break
            if escalations >= cfg.max_escalations:
                gi, ci = _fallback(values, u, centres, need, rd.prio_full)
                rd.assign(gi, ci)
                n_fallback = int(gi.numel())
                log.warning("fixing round: %d weights fixed by nearest-centre fallback after "
                            "%d escalations", n_fallback, escalations)
                break
            escalations += 1
            if order < cfg.max_order and order_turn:
                order += 1
                order_turn = False
            else:
                mult *= cfg.inc
                order_turn = True
        del u

    new_fixed = rd.new_fixed
    newly = new_fixed & ~fixed
    new_sigma: torch.Tensor | None = None
    if sigma is not None:
        new_sigma = sigma.clone()
        if keep and rd.n_assigned:
            gi = rd.gi_buf[:rd.n_assigned]
            if cfg.sigma_update == "divide":
                s_new = sigma.index_select(0, gi).double() / cfg.sigma_divisor
            else:
                ci = rd.ci_buf[:rd.n_assigned]
                std = _group_std(values.index_select(0, gi), ci, centres.values, len(centres))
                s_new = std.index_select(0, ci)
            new_sigma.index_put_((gi,), s_new.clamp_(min=cfg.sigma_floor).to(sigma.dtype))
        del rd.gi_buf, rd.ci_buf

    n_fixed1 = int(torch.count_nonzero(new_fixed))
    summary = {
        "n": n,
        "target_fraction": float(target_fraction),
        "target": n_target,
        "fixed_before": n_fixed0,
        "fixed_after": n_fixed1,
        "newly_fixed": n_fixed1 - n_fixed0,
        "max_abs": max_abs,
        "n_candidates": len(centres),
        "picks": rd.picks_log,
        "fixed_per_centre": _per_centre(rd.picks_log),
        "levels": levels,
        "escalations": escalations,
        "final_order": order,
        "final_multiplier": mult,
        "fallback": n_fallback,
        "seconds": time.perf_counter() - t_start,
    }
    return RoundResult(values=rd.new_values, fixed=new_fixed, newly_fixed=newly,
                       sigma=new_sigma, centres=centres, summary=summary)
