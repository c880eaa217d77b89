"""The fixing engine: one greedy round of weight fixing, shared by PWFN and WFN.

A round fixes (quantises) enough of the still-free weights that at least ``ceil(p * N)``
of all ``N`` weights are fixed afterwards.  It is a pure tensor function: no module, no
optimizer, no global state (a caller may keep an :class:`EngineCache` between rounds); it
runs wherever its inputs live (CPU or CUDA).

Semantics (docs/algorithm.md; :mod:`pwfn.core.engine_reference` is the executable spec):

* Candidate centres: :func:`pwfn.core.centres.candidate_centres` with ``max_abs`` = max |values|
  over the whole vector (fixed entries included); in budget mode only ``config.allowed``
  and zero.  A round starts at ``order = 1`` and tolerance multiplier ``m = 1``.
* Weight ``i`` *fits* centre ``c`` iff ``v_i - m*t_i <= c <= v_i + m*t_i``, evaluated in the
  values' dtype (``m*t_i`` rounded once, then the two sums).  With ``zero_fix`` every free
  weight with ``|v_i| < 2**-b`` also fits the zero centre (found by value).
* Greedy: take the centre of order <= ``order`` that fits the most free weights (ties:
  smallest ``|c|``, then the negative one); fix all its fitting weights, or - when that is
  more than this round still needs - the ``need`` ones with the smallest
  ``|v_i - c| / (m*t_i)`` (float64; ``0/0 := 0``, ``x/0 := inf``), ties by lower index.  That
  centre is then out for the rest of the level.  When no centre fits any free weight,
  escalate: raise ``order`` (up to ``max_order``) and multiply ``m`` by ``inc`` alternately,
  order first, then only ``m`` once ``order == max_order``; the full candidate set (used
  centres included) comes back.
* Fallback: after ``max_escalations`` escalation steps, the still-needed weights go to
  their nearest centre of order <= ``max_order`` (ranked by that absolute distance, ties by
  index; equidistant centres resolved as above).  This only matters for weights no finite
  multiplier helps, e.g. zero tolerance.
* Sigma: see :class:`EngineConfig`.

How a level costs O(N) instead of O(#centres x N), exactly and deterministically, is
:mod:`pwfn.core._engine_fast`'s business; :class:`EngineTuning` only changes how it computes.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from pwfn.core import _engine_fast as fast
from pwfn.core._engine_fast import EngineTuning
from pwfn.core.centres import CentreSet, candidate_centres, grid_limit, lookup_centres
from pwfn.errors import ConfigError, EngineInputError

__all__ = ["EngineCache", "EngineConfig", "EngineTuning", "RoundResult", "fix_round",
           "lookup_centres", "target_count"]

log = logging.getLogger(__name__)

_SIGMA_UPDATES = ("std_mu", "keep", "divide")


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
    ``allowed`` (budget mode, ``pwfn.training.budget``): when given, only these candidate values (and
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

        def is_real(x: Any) -> bool:
            return isinstance(x, numbers.Real) and math.isfinite(x)

        if not is_int(self.b) or not 0 <= self.b <= 30:
            raise ConfigError(f"engine.b must be an int in [0, 30], got {self.b!r}")
        if not is_int(self.max_order) or not 1 <= self.max_order <= 32:
            raise ConfigError(f"engine.max_order must be an int in [1, 32], got {self.max_order!r}")
        if not isinstance(self.signed_terms, bool) or not isinstance(self.zero_fix, bool):
            raise ConfigError("engine.signed_terms and engine.zero_fix must be booleans")
        if not is_real(self.inc) or self.inc <= 1:
            raise ConfigError(f"engine.inc must be a finite number > 1, got {self.inc!r}")
        if self.sigma_update not in _SIGMA_UPDATES:
            raise ConfigError(
                f"engine.sigma_update must be one of {_SIGMA_UPDATES}, got {self.sigma_update!r}"
            )
        if not is_real(self.sigma_divisor) or self.sigma_divisor <= 0:
            raise ConfigError(f"engine.sigma_divisor must be > 0, got {self.sigma_divisor!r}")
        if not is_real(self.sigma_floor) or self.sigma_floor < 0:
            raise ConfigError(f"engine.sigma_floor must be >= 0, got {self.sigma_floor!r}")
        if not is_int(self.max_escalations) or self.max_escalations < 0:
            raise ConfigError(
                f"engine.max_escalations must be an int >= 0, got {self.max_escalations!r}"
            )
        if self.allowed is not None and (not isinstance(self.allowed, tuple)
                                         or not all(is_real(v) for v in self.allowed)):
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
    was given).  ``centres``: this round's candidate set at ``max_order`` (shared by the
    rounds of one :class:`EngineCache`: do not modify it).  ``summary``: JSON-friendly
    per-round statistics.  ``centre_index`` (int32) and ``order`` (int8) are computed on
    first access (an O(N) lookup the training loop rarely needs): the index into
    ``centres`` / term count of every fixed weight's value, ``-1`` for free weights (and for
    fixed values that are not in ``centres``, e.g. set by hand).  Zero has order 0.
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


class EngineCache:
    """Candidate sets and their lookup tables, kept by the caller between rounds.

    Why: a candidate set depends on max |values| only through its grid limit, so the rounds
    of one run mostly reuse one.  Without a cache, :func:`fix_round` builds what it needs on
    every call.  Holds the ``size`` most recently used sets; results made with one cache
    share their ``centres``.
    """

    def __init__(self, size: int = 4) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"EngineCache size must be an int >= 1, got {size!r}")
        self.size = size
        self._books: OrderedDict[tuple, fast.Codebook] = OrderedDict()

    def codebook(self, grid: int, cfg: EngineConfig, dtype: torch.dtype,
                 device: torch.device) -> fast.Codebook:
        key = (grid, cfg.max_order, cfg.b, cfg.signed_terms, cfg.allowed, dtype, device)
        book = self._books.pop(key, None) or _codebook(grid, cfg, dtype, device)
        self._books[key] = book
        while len(self._books) > self.size:
            self._books.popitem(last=False)
        return book


def _codebook(grid: int, cfg: EngineConfig, dtype: torch.dtype,
              device: torch.device) -> fast.Codebook:
    """The round's candidates: every centre up to the grid limit, or budget mode's subset."""
    cs = candidate_centres(grid * 2.0**-cfg.b, cfg.max_order, cfg.b, cfg.signed_terms,
                           device=device, dtype=dtype)
    if cfg.allowed is not None:  # only the allowed values (and zero) stay candidates
        ok = torch.isin(cs.values.double(),
                        torch.tensor(cfg.allowed, dtype=torch.float64, device=device))
        ok |= cs.values == 0
        cs = CentreSet(values=cs.values[ok], orders=cs.orders[ok], signs=cs.signs[ok],
                       exponents=cs.exponents[ok], b=cs.b, max_order=cs.max_order,
                       signed_terms=cs.signed_terms)
    return fast.Codebook(cs)


def target_count(target_fraction: float, n: int) -> int:
    """``ceil(p * n)`` with a tiny slack, so that binary rounding (``0.2 * 10``) is harmless."""
    return int(min(n, max(0, math.ceil(float(target_fraction) * n - 1e-12 * n))))


def _check_tensor(name: str, x: Any, like: torch.Tensor | None,
                  dtype: torch.dtype | None = None) -> None:
    """Type, and shape, device and dtype as ``like`` (the values) demands."""
    if not isinstance(x, torch.Tensor):
        raise EngineInputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if like is not None:
        if tuple(x.shape) != tuple(like.shape):
            raise EngineInputError(
                f"{name}: shape {tuple(x.shape)} does not match values {tuple(like.shape)}")
        if x.device != like.device:
            raise EngineInputError(f"{name}: on {x.device}, values on {like.device}")
    if dtype is not None and x.dtype != dtype:
        raise EngineInputError(f"{name}: dtype {x.dtype} != values dtype {dtype}")


def _range(x: torch.Tensor, red: fast.Reductions | None = None) -> tuple[float, float]:
    """(min, max) in one pass; NaN propagates (over every shard when ``red`` combines shards)."""
    if x.numel():
        lo, hi = (float(t) for t in torch.aminmax(x.detach()))
    else:  # an empty shard
        lo, hi = math.inf, -math.inf
    return (red or fast.Reductions()).range(lo, hi)


def _validate(values: Any, tolerance: Any, fixed: Any, target_fraction: Any,
              sigma: Any, red: fast.Reductions | None = None) -> tuple[float, int]:
    """Check every input; return (max |values|, number fixed).  One pass per tensor.

    With ``red`` combining shards, the checks and counts are over all of them (every process
    raises the same error)."""
    red = red or fast.Reductions()
    _check_tensor("values", values, None)
    if values.dim() != 1:
        raise EngineInputError(f"values: expected a 1-D tensor, got shape {tuple(values.shape)}")
    if red.total(values.numel()) == 0:
        raise EngineInputError("values: empty (N = 0), nothing to fix")
    if values.dtype not in (torch.float32, torch.float64):
        raise EngineInputError(f"values: dtype must be float32 or float64, got {values.dtype}")
    lo, hi = _range(values, red)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EngineInputError("values: contains NaN or inf")
    _check_tensor("tolerance", tolerance, values, values.dtype)
    tlo, thi = _range(tolerance, red)
    if math.isnan(tlo) or math.isnan(thi):
        raise EngineInputError("tolerance: contains NaN")
    if tlo < 0:
        raise EngineInputError("tolerance: contains negative entries")
    if math.isinf(thi):
        raise EngineInputError("tolerance: contains inf")
    _check_tensor("fixed", fixed, values)
    if fixed.dtype != torch.bool:
        raise EngineInputError(f"fixed: dtype must be torch.bool, got {fixed.dtype}")
    if sigma is not None:
        _check_tensor("sigma", sigma, values, values.dtype)
        if not all(map(math.isfinite, _range(sigma, red))):
            raise EngineInputError("sigma: contains NaN or inf")
    if (isinstance(target_fraction, bool) or not isinstance(target_fraction, numbers.Real)
            or not math.isfinite(float(target_fraction))
            or not 0.0 <= float(target_fraction) <= 1.0):
        raise EngineInputError(
            f"target_fraction: must be a number in [0, 1], got {target_fraction!r}")
    return max(-lo, hi), red.total(int(torch.count_nonzero(fixed)))


def _closest(values: torch.Tensor, tolerance: torch.Tensor, candidates: torch.Tensor,
             centre: float, mult: float, r: int, step: int, red: fast.Reductions,
             index_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The partial pick: the ``r`` candidates with the smallest ``|v - c| / (m*t)`` (ties: lower
    index; ``index_of`` maps this process's indices to the global ones)."""

    def ratio(s: int, e: int) -> torch.Tensor:
        idx = candidates[s:e]
        dist = (values.index_select(0, idx).double() - centre).abs_()
        out = dist / (tolerance.index_select(0, idx).double() * mult)
        return out.masked_fill_(dist == 0, 0.0)  # 0/0 := 0; x/0 = inf already

    chosen = red.select_smallest(ratio, int(candidates.numel()), r, step,
                                 lambda s, e: index_of(candidates[s:e]))
    return candidates.index_select(0, chosen)


def _nearest_fallback(values: torch.Tensor, free: torch.Tensor, book: fast.Codebook, need: int,
                      step: int, red: fast.Reductions,
                      index_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback: the ``need`` free weights nearest to a centre (nearest first, ties by
    index) and their centres."""
    chosen = red.select_smallest(lambda s, e: fast.nearest_centres(values, free[s:e], book)[1],
                                 int(free.numel()), need, step, lambda s, e: index_of(free[s:e]))
    weights = free.index_select(0, chosen)
    return weights, fast.nearest_centres(values, weights, book)[0]


def _write(values: torch.Tensor, fixed: torch.Tensor, sigma: torch.Tensor | None,
           fixing: fast.Assignments, centres: CentreSet, cfg: EngineConfig,
           step: int, red: fast.Reductions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The round's outputs: copies of the inputs with the newly fixed entries written, chunk by
    chunk (no index or value copy of the whole assignment list).

    The sigma update of the newly fixed weights (``cfg.sigma_update``) is floored at
    ``cfg.sigma_floor``; ``std_mu`` is the population std of the values fixed to the same centre
    in this round.
    """
    step = max(step, -(-fixing.count // 16))  # a few large chunks: 1/16 of the list at most
    update = None if sigma is None or red.total(fixing.count) == 0 else cfg.sigma_update
    std = None
    if update == "std_mu":  # before the outputs exist: the gathered values are the peak's smaller part
        std = fast.group_std(values.index_select(0, fixing.weights), fixing.centres, centres.values,
                             len(centres), step, red).clamp_(min=cfg.sigma_floor).to(sigma.dtype)
    new_values, new_fixed = values.clone(), fixed.clone()
    new_sigma = None if sigma is None else sigma.clone()
    for s, e in fast.chunks(fixing.count, step):
        w = fixing.weights[s:e].to(torch.int64)  # one index conversion per chunk, for every write
        ci = fixing.centres[s:e].to(torch.int32)
        fast.scatter_(new_values, w, centres.values.index_select(0, ci))
        fast.scatter_(new_fixed, w, True)
        if update == "divide":
            fast.scatter_(new_sigma, w, (sigma.index_select(0, w).double() / cfg.sigma_divisor
                                         ).clamp_(min=cfg.sigma_floor).to(sigma.dtype))
        elif update == "std_mu":
            fast.scatter_(new_sigma, w, std.index_select(0, ci))
    return new_values, new_fixed, torch.bitwise_xor(new_fixed, fixed), new_sigma  # fixed stays fixed


def fix_round(values: torch.Tensor, tolerance: torch.Tensor, fixed: torch.Tensor,
              target_fraction: float, *, sigma: torch.Tensor | None = None,
              config: EngineConfig | None = None, tuning: EngineTuning | None = None,
              cache: EngineCache | None = None, shards: fast.Reductions | None = None) -> RoundResult:
    """Fix free weights to shared power-of-two centres until ``ceil(p*N)`` are fixed.

    Why one function: PWFN (``tolerance = k*sigma``, ``signed_terms=False``) and WFN
    (``tolerance = delta_t*|w|``, ``signed_terms=True``) differ only in their inputs and
    config.  Inputs are not modified; already-fixed entries are returned bit-identical.
    ``tuning`` changes how the fast path computes, never the result; ``cache`` (owned by
    the caller, e.g. one per run) saves rebuilding the candidate set every round.
    ``shards`` (:class:`pwfn.core.sharding.ShardGroup`): the vectors are this process's shards of
    one network-wide vector (FSDP); every process calls this together, each gets its shards of
    the single-process result (``std_mu`` sigmas up to float rounding: per-process sums added in
    rank order) and the single-process summary.
    Raises :class:`~pwfn.errors.EngineInputError` (naming the tensor) on bad input.
    """
    cfg = EngineConfig() if config is None else config
    if not isinstance(cfg, EngineConfig):
        raise ConfigError(f"config must be an EngineConfig, got {type(cfg).__name__}")
    tuning = EngineTuning() if tuning is None else tuning
    if not isinstance(tuning, EngineTuning) or not isinstance(cache, (EngineCache, type(None))):
        raise ConfigError("tuning must be an EngineTuning and cache an EngineCache (or None)")
    if not isinstance(shards, (fast.Reductions, type(None))):
        raise ConfigError(f"shards must be a pwfn.core.sharding.ShardGroup (or None), got {type(shards).__name__}")
    red = shards or fast.Reductions()
    index_of = getattr(red, "global_index", None) or (lambda local: local)
    t_start = time.perf_counter()
    max_abs, n_fixed0 = _validate(values, tolerance, fixed, target_fraction, sigma, red)
    values, tolerance = values.detach(), tolerance.detach()
    n_local = int(values.numel())
    n = red.total(n_local)
    n_target = target_count(target_fraction, n)
    if n_target < n_fixed0:
        raise EngineInputError(f"target_fraction: {target_fraction!r} asks for {n_target} fixed "
                               f"weights but {n_fixed0} of {n} are already fixed")
    grid = grid_limit(max_abs, cfg.b)
    book = (cache.codebook(grid, cfg, values.dtype, values.device) if cache is not None
            else _codebook(grid, cfg, values.dtype, values.device))
    need = n_target - n_fixed0
    n_free = n_local - int(torch.count_nonzero(fixed)) if red.sharded else n - n_fixed0
    fixing = fast.Assignments(min(need, n_free), n_local, values.device, len(book.centres))
    picks: list[dict] = []
    order, mult, escalations, order_turn, levels, n_fallback = 1, 1.0, 0, True, 0, 0
    free = fast.free_indices(fixed, n_free, tuning) if need > 0 else None
    runs = None
    while need > 0:
        levels += 1
        if runs is None:  # which centres a weight fits depends on the multiplier, not the order
            runs = fast.FitRuns(book, values, tolerance, free, mult, cfg.zero_fix, tuning, red)
        plan = runs.plan(order, need)  # the level's greedy pick sequence, from counts alone
        if plan.picks:
            candidates = runs.apply(plan, fixing)  # full picks: all their fitting weights
            picks += [{"centre": book.values_list[c], "count": k,
                       "centre_order": book.orders_list[c], "level_order": order,
                       "multiplier": mult, "partial": part} for c, k, part in plan.picks]
            if plan.partial:  # the last pick fits more than still needed: the closest ones
                runs = free = None  # the round ends with this pick: the free list goes first
                centre, r = plan.picks[-1][:2]
                chosen = _closest(values, tolerance, candidates, book.values_list[centre], mult, r,
                                  tuning.chunk, red, index_of)
                del candidates
                fixing.add(chosen, torch.full_like(chosen, centre, dtype=fixing.centres.dtype))
                need = plan.need
                log.debug("level order=%d mult=%g: %d picks, partial", order, mult, len(plan.picks))
                break
        need, free = plan.need, runs.free
        log.debug("level order=%d mult=%g: %d picks, need %d", order, mult, len(plan.picks), need)
        if need <= 0:
            break
        if escalations >= cfg.max_escalations:  # fallback: the nearest centres, nearest first
            runs = None
            weights, centre_of = _nearest_fallback(values, free, book, need, tuning.chunk, red, index_of)
            fixing.add(weights, centre_of)
            n_fallback = red.total(int(weights.numel()))
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
            runs = None
    del runs, free

    centres = book.centres
    n_new = red.total(fixing.count)
    new_values, new_fixed, newly, new_sigma = _write(values, fixed, None if sigma is None else sigma.detach(),
                                                     fixing, centres, cfg, tuning.chunk, red)
    del fixing
    per_centre: dict[str, int] = {}
    for p in picks:  # dyadic, so repr is exact; str keys stay JSON-friendly
        per_centre[repr(p["centre"])] = per_centre.get(repr(p["centre"]), 0) + p["count"]
    summary = {
        "n": n, "target_fraction": float(target_fraction), "target": n_target,
        "fixed_before": n_fixed0, "fixed_after": n_fixed0 + n_new,
        "newly_fixed": n_new, "max_abs": max_abs, "n_candidates": len(centres),
        "picks": picks, "fixed_per_centre": per_centre, "levels": levels,
        "escalations": escalations, "final_order": order, "final_multiplier": mult,
        "fallback": n_fallback, "seconds": time.perf_counter() - t_start,
    }
    return RoundResult(values=new_values, fixed=new_fixed, newly_fixed=newly,
                       sigma=new_sigma, centres=centres, summary=summary)
