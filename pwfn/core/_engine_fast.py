"""The fixing engine's fast machinery (private): grid pairs, run types, a host greedy.

:mod:`pwfn.core.engine` states the algorithm; this module makes one greedy level cost O(N)
elementwise work instead of O(#centres x N).  Nothing of size #centres x #weights is ever
allocated, and results are exactly those of :mod:`pwfn.core.engine_reference`.

* Runs.  The centres a weight fits form a contiguous run of the sorted candidates (zero_fix
  keeps it contiguous: zero is in the run or next to it).  With ``c = n * 2**-b``,
  ``v - m*t <= c <= v + m*t``  <=>  ``lo <= n <= hi`` for the integers
  ``lo = ceil((v - m*t) * 2**b)`` and ``hi = floor((v + m*t) * 2**b)`` (scaling by 2**b is
  exact), so a weight's run is fixed by its *grid pair* ``(lo, hi)``, clamped to
  ``[-G-1, G+1]``.
* One pass per multiplier.  Grid pairs do not depend on the order, so one elementwise pass
  per multiplier buckets the free weights by grid pair: an integer histogram of
  ``(2G+3)**2`` bins, or the sorted unique pairs when that would dwarf the work.  A level
  maps the (few) present pairs to its run types ``(a, e)`` on the host: ``a`` = its centres
  below ``lo``, ``e`` = its centres up to ``hi``.  A level that only raises the order costs
  no pass over the weights.
* Greedy.  A level's whole pick sequence depends only on the run-type counts, so it runs on
  the host.  Key fact: a full pick of centre ``j`` fixes *every* free weight covering ``j``,
  so the weights still free and covering ``j'`` are exactly the run types with
  ``L < a <= j' < e <= R`` for the nearest picked centres ``L < j' < R``.
* Apply.  One table lookup per weight says whether a full pick fixes it (and to which
  centre), whether it is a candidate of the final partial pick, or whether it stays free.
  Only the partial pick ranks weights, with a k-th value selection, not a sort.
* Determinism.  No float atomics: counts are integer bincounts and per-centre sigma statistics
  serial host sums, so CPU and GPU results are bit-identical.
* Memory.  Beyond its outputs a round holds the free weights' indices and grid-pair keys (4 + 4
  bytes each, compacted in place as levels fix weights), the newly fixed weights and their
  centres (4 + 2 bytes each), and chunk-sized temporaries; the partial pick ranks its candidates
  in one float64 array (partitioned in place), after the free list is gone.  Per-weight float64
  statistics and int64 index copies are never made for the whole vector.

On the CPU, comparisons, positions of true entries, the k-th smallest value and scatters
run in numpy on views of the tensors (torch's single-threaded CPU kernels for these are up to
10x slower); both give exactly the same results.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pwfn.core.centres import CentreSet
from pwfn.errors import ConfigError

__all__ = ["Assignments", "Codebook", "EngineTuning", "FitRuns", "LevelPlan", "Reductions", "chunks",
           "free_indices", "group_std", "nearest_centres", "scatter_", "select_smallest", "smallest"]


@dataclass(frozen=True)
class EngineTuning:
    """How the fast path computes, never what: results are identical for every setting.

    ``chunk``: weights per chunk of the elementwise passes (cache-sized temporaries).  A pass
    over ``n`` free weights uses a dense histogram of its ``(2G+3)**2`` grid pairs when that
    is at most ``max(dense_min, work_factor * n)`` bins, else the sorted unique pairs.
    ``EngineTuning(chunk=3, dense_min=0, work_factor=0)`` forces the slow paths (the tests
    compare both).
    """

    chunk: int = 1 << 16
    dense_min: int = 1 << 16
    work_factor: int = 1

    def __post_init__(self) -> None:
        for name, low in (("chunk", 1), ("dense_min", 0), ("work_factor", 0)):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise ConfigError(f"EngineTuning.{name} must be an int >= {low}, got {x!r}")


class Reductions:
    """Where a round's global quantities come from: on one process, the vectors themselves.

    A round decides from a few global quantities: the number of weights and of fixed ones, the
    value range, per grid-pair counts, the k smallest partial-pick ratios (ties by index), and
    the per-centre sums of the ``std_mu`` sigma update.  When the vectors are one process's
    shards of a network-wide vector (FSDP), :class:`pwfn.core.sharding.ShardGroup` combines the
    shards' parts instead; every decision is then the single-process one.
    """

    #: whether the vectors are shards of a larger vector
    sharded = False

    def total(self, n: int) -> int:
        """The sum of an integer over the shards."""
        return n

    def range(self, lo: float, hi: float) -> tuple[float, float]:
        """(min, max) over the shards (NaN anywhere: NaN)."""
        return lo, hi

    def sum_counts_(self, counts: torch.Tensor) -> torch.Tensor:
        """Integer counts summed over the shards, in place."""
        return counts

    def merge_counts(self, keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique keys with their counts, merged over the shards."""
        return keys, counts

    def sum_floats(self, x: np.ndarray) -> np.ndarray:
        """Float sums over the shards, added in a fixed order (the same on every process)."""
        return x

    def select_smallest(self, score_of: Callable[[int, int], torch.Tensor], n: int, k: int, step: int,
                        index_of: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Positions (of this process's ``n`` scores) among the ``k`` smallest scores of all shards,
        ties by global index (``index_of(start, stop)``: the global indices of a chunk)."""
        return select_smallest(score_of, n, k, step)


def _find(x: torch.Tensor, test: Callable[[Any], Any]) -> torch.Tensor:
    """Ascending positions (int64) where the elementwise ``test`` holds on 1-D ``x``."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(test(x.numpy())))
    return torch.nonzero(test(x)).squeeze(1)


def scatter_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor | bool | float) -> torch.Tensor:
    """``dst[index] = src`` in place (``index`` int64, no duplicates; ``src`` a tensor or one
    value for all); returns ``dst``."""
    if dst.device.type == "cpu":
        dst.numpy()[index.numpy()] = src.numpy() if isinstance(src, torch.Tensor) else src
        return dst
    if not isinstance(src, torch.Tensor):
        src = torch.tensor(src, dtype=dst.dtype, device=dst.device)
    return dst.index_put_((index,), src)


def _index_dtype(n: int) -> torch.dtype:
    """Weight indices take 4 bytes when ``n`` allows."""
    return torch.int32 if n < 2**31 - 1 else torch.int64


def free_indices(fixed: torch.Tensor, n_free: int, tuning: EngineTuning) -> torch.Tensor:
    """Ascending indices of the free weights, chunked so no N-sized int64 temporary exists."""
    n = int(fixed.numel())
    out = torch.empty(n_free, dtype=_index_dtype(n), device=fixed.device)
    pos = 0
    step = 4 * tuning.chunk
    for s in range(0, n, step):
        found = _find(fixed[s:s + step], lambda f: ~f)
        out[pos:pos + found.numel()] = found.add_(s)
        pos += found.numel()
    return out


def chunks(n: int, step: int):
    """``(start, stop)`` of consecutive chunks of ``range(n)``."""
    for s in range(0, n, step):
        yield s, min(n, s + step)


def smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the ``k`` smallest scores, ties by position (no sort)."""
    n = int(score.numel())
    return select_smallest(lambda s, e: score[s:e], n, k, max(n, 1), scratch=score.clone())


def select_smallest(score_of: Callable[[int, int], torch.Tensor], n: int, k: int, step: int,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending positions of the ``k`` smallest of ``n`` scores, ties by position (no sort).

    ``score_of(start, stop)`` gives the scores of a chunk; it is called twice per chunk, so the
    scores are never held twice: once into one array (``scratch`` when given, overwritten) whose
    k-th value a selection finds in place, then again to pick the positions.  Positions are
    int32 when ``n`` allows.
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=scratch.device if scratch is not None else None)
    if scratch is None:
        first = score_of(0, min(n, step))
        scratch = torch.empty(n, dtype=first.dtype, device=first.device)
        scratch[:first.numel()] = first
        done = first.numel()
    else:
        done = n
    dev = scratch.device
    if k >= n:
        return torch.arange(n, device=dev)
    for s, e in chunks(n, step):
        if s >= done:
            scratch[s:e] = score_of(s, e)
    if dev.type == "cpu":
        arr = scratch.numpy()
        arr.partition(k - 1)  # in place: no copy of the scores
        theta = float(arr[k - 1])
        below, upto = int(np.count_nonzero(arr < theta)), int(np.count_nonzero(arr <= theta))
    else:
        theta_t = torch.kthvalue(scratch, k).values
        theta = float(theta_t)
        below, upto = int(torch.count_nonzero(scratch < theta_t)), int(torch.count_nonzero(scratch <= theta_t))
    del scratch
    room = k - below  # >= 1: how many of the ties at theta make it, lowest positions first
    trim = upto > k  # more ties than room: the later ones stay out
    out = torch.empty(k, dtype=_index_dtype(n), device=dev)
    got = 0
    for s, e in chunks(n, step):
        x = score_of(s, e)
        pos = _find(x, lambda a: a <= theta)
        if trim and pos.numel():
            tie = _find(x.index_select(0, pos), lambda a: a == theta)
            if tie.numel() > room:
                keep = torch.ones(pos.numel(), dtype=torch.bool, device=dev)
                keep[tie[max(room, 0):]] = False
                pos = pos[keep]
            room -= min(int(tie.numel()), max(room, 0))
        out[got:got + pos.numel()] = pos.add_(s)
        got += int(pos.numel())
    assert got == k, (got, k)
    return out


def group_std(v: torch.Tensor, ci: torch.Tensor, centre_values: torch.Tensor,
              n_centres: int, step: int = 1 << 16, red: Reductions | None = None) -> torch.Tensor:
    """Population std of ``v`` per centre index ``ci`` (float64, shape ``(n_centres,)``).

    Why on the host with numpy's serial sums: float sums must not depend on thread or atomic
    order (CUDA float ``cumsum``/``index_add`` are not deterministic), and this way CPU and GPU
    runs give bit-identical sigmas.  Two passes (mean, then squared deviations from it) on
    deviations from the centre keep the precision.  Chunked: ``np.add.at`` adds each chunk's
    terms in order onto the running sums, exactly the serial sum one ``bincount`` over the
    whole vector would do, with float64 temporaries of one chunk only.  Sharded (``red``): each
    process's serial sums are added in rank order, the same on every process.
    """
    red = red or Reductions()
    centres64 = centre_values.cpu().numpy().astype(np.float64)
    n = int(ci.numel())
    counts = np.zeros(n_centres, dtype=np.int64)
    sums = np.zeros(n_centres, dtype=np.float64)

    v_host, ci_host = v.cpu().numpy(), ci.cpu().numpy()

    def chunk(s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        idx = ci_host[s:e].astype(np.intp)
        return idx, np.subtract(v_host[s:e], centres64.take(idx))  # float64 deviations

    for s, e in chunks(n, step):
        idx, d = chunk(s, e)
        counts += np.bincount(idx, minlength=n_centres)
        np.add.at(sums, idx, d)
    if red.sharded:
        counts = red.sum_counts_(torch.from_numpy(counts)).numpy()
        sums = red.sum_floats(sums)
    denom = np.maximum(counts, 1).astype(np.float64)
    mean = sums / denom
    sq = np.zeros(n_centres, dtype=np.float64)
    for s, e in chunks(n, step):
        idx, d = chunk(s, e)
        d -= np.take(mean, idx)
        np.add.at(sq, idx, np.square(d, out=d))
    if red.sharded:
        sq = red.sum_floats(sq)
    return torch.from_numpy(np.sqrt(sq / denom)).to(centre_values.device)


class Assignments:
    """Newly fixed weights and their codebook centres, in fixing order (sigma sums follow it).

    Weight indices take 4 bytes (int32 when ``n`` allows), centre indices 2 (int16 when the
    codebook has fewer than 2**15 centres).
    """

    def __init__(self, capacity: int, n: int, device: torch.device, n_centres: int = 1 << 31) -> None:
        self._weights = torch.empty(capacity, dtype=_index_dtype(n), device=device)
        self._centres = torch.empty(capacity, dtype=torch.int16 if n_centres < 1 << 15 else torch.int32,
                                    device=device)
        self.count = 0

    def add(self, weights: torch.Tensor, centres: torch.Tensor) -> None:
        m = int(weights.numel())
        self._weights[self.count:self.count + m] = weights
        self._centres[self.count:self.count + m] = centres
        self.count += m

    @property
    def weights(self) -> torch.Tensor:
        return self._weights[:self.count]

    @property
    def centres(self) -> torch.Tensor:
        return self._centres[:self.count]


def _tiebreak_priority(values: torch.Tensor) -> np.ndarray:
    """Higher is better: smallest |c| first, then the negative centre (C-1 ... 0)."""
    c = values.double().cpu().numpy()
    order = np.lexsort((c, np.abs(c)))
    rank = np.empty(c.shape[0], dtype=np.int64)
    rank[order] = np.arange(c.shape[0])
    return c.shape[0] - 1 - rank


@dataclass(frozen=True)
class _Level:
    """The candidates of one order: a subset of the codebook."""

    members: np.ndarray  # codebook indices (ascending) of the centres with <= order terms
    grid: np.ndarray  # their integers n (value = n * 2**-b), ascending
    priority: np.ndarray  # tie-break rank within the level (higher wins)

    @property
    def size(self) -> int:
        return int(self.members.shape[0])


class Codebook:
    """A candidate set (at the config's ``max_order``) with everything derived from it."""

    def __init__(self, centres: CentreSet) -> None:
        self.centres = centres
        self.span = centres.grid_span  # G: every centre is n * 2**-b with |n| <= G
        self.scale = 2.0**centres.b
        self.priority = _tiebreak_priority(centres.values)
        self.values_list: list[float] = centres.values.double().cpu().tolist()
        self.orders_list: list[int] = centres.orders.cpu().tolist()
        self._grid = centres.grid().cpu().numpy()
        self._levels: dict[int, _Level] = {}

    def level(self, order: int) -> _Level:
        lv = self._levels.get(order)
        if lv is None:
            members = np.flatnonzero(np.asarray(self.orders_list, dtype=np.int64) <= order)
            sub = self.priority[members]
            rank = np.argsort(np.argsort(sub, kind="stable"), kind="stable").astype(np.int64)
            lv = self._levels[order] = _Level(members, self._grid[members], rank)
        return lv


@dataclass(frozen=True)
class LevelPlan:
    """A level's greedy pick sequence, decided from run-type counts alone.

    ``picks``: ``(codebook index, weights taken, partial)`` in pick order.  ``code``: per grid
    pair of the pass, the codebook index of the full pick that fixes its weights, ``-2`` for
    candidates of the final partial pick, ``-1`` when they stay free.  ``need``: still
    needed afterwards.
    """

    picks: list[tuple[int, int, bool]]
    code: np.ndarray
    need: int

    @property
    def partial(self) -> bool:
        return bool(self.picks) and self.picks[-1][2]


class FitRuns:
    """The free weights at one tolerance multiplier, bucketed by grid pair ``(lo, hi)``."""

    def __init__(self, book: Codebook, values: torch.Tensor, tolerance: torch.Tensor,
                 free: torch.Tensor, mult: float, zero_fix: bool, tuning: EngineTuning,
                 red: Reductions | None = None) -> None:
        red = red or Reductions()
        self.book = book
        self.free = free
        self.tuning = tuning
        n = int(free.numel())
        self.width = 2 * book.span + 3  # grid pair key: (lo + G+1) * width + (hi + G+1)
        self.nbins = self.width**2
        self.dense = self.nbins <= max(tuning.dense_min, tuning.work_factor * red.total(n))
        keys = torch.empty(n, dtype=_index_dtype(self.nbins), device=free.device)
        step = tuning.chunk
        for s in range(0, n, step):
            idx = free[s:s + step]
            self._grid_pairs(values.index_select(0, idx), tolerance.index_select(0, idx), mult,
                             zero_fix, keys[s:s + step])
        self.keys = keys
        if self.dense:
            hist = red.sum_counts_(torch.bincount(keys, minlength=self.nbins))
            pairs = _find(hist, lambda h: h != 0)
            counts = hist.index_select(0, pairs)
        else:
            pairs, counts = torch.unique(keys, sorted=True, return_counts=True)
            if red.sharded:
                merged, counts = red.merge_counts(pairs.cpu().numpy().astype(np.int64),
                                                  counts.cpu().numpy().astype(np.int64))
                pairs = torch.as_tensor(merged, dtype=keys.dtype, device=keys.device)
        self.pairs_dev = pairs
        self.pairs = pairs.cpu().numpy().astype(np.int64)
        self.counts = counts.cpu().numpy().astype(np.int64) if isinstance(counts, torch.Tensor) else counts

    def _grid_pairs(self, v: torch.Tensor, t: torch.Tensor, mult: float, zero_fix: bool,
                    out: torch.Tensor) -> None:
        """Grid pair key of each weight; ``v``, ``t`` are fresh copies and get overwritten."""
        span, scale, width = self.book.span, self.book.scale, self.width
        if mult != 1.0:
            t.mul_(mult)  # m*t rounded once in the values' dtype
        if scale != 1.0:  # exact: a power of two, so (v - m*t) * 2**b == v*2**b - m*t*2**b
            v.mul_(scale)
            t.mul_(scale)
        lo = torch.sub(v, t).ceil_().clamp_(-span - 1, span + 1)
        hi = t.add_(v).floor_().clamp_(-span - 1, span + 1)
        if zero_fix:  # where |v * 2**b| < 1 the run reaches zero: lo <= 0 <= hi
            cap = v.abs_().floor_().clamp_(max=1).mul_(span + 1)  # 0 there, else G+1 (no-op)
            torch.minimum(lo, cap, out=lo)
            torch.maximum(hi, cap.neg_(), out=hi)
        offset = (span + 1) * (width + 1)
        if self.nbins <= 2 / torch.finfo(v.dtype).eps:  # every key is an exact float
            out.copy_(torch.add(hi, lo, alpha=width).add_(offset))
        else:
            key = lo.to(torch.int64).mul_(width).add_(hi.to(torch.int64)).add_(offset)
            out.copy_(key)

    def plan(self, order: int, need: int) -> LevelPlan:
        """The greedy pick sequence among the centres of ``order`` (host, over run types)."""
        lv = self.book.level(order)
        lo = self.pairs // self.width - (self.book.span + 1)
        hi = self.pairs % self.width - (self.book.span + 1)
        runs = (np.searchsorted(lv.grid, lo, side="left") * (lv.size + 1)
                + np.searchsorted(lv.grid, hi, side="right"))
        types, inverse = np.unique(runs, return_inverse=True)
        type_counts = np.bincount(inverse, weights=self.counts.astype(np.float64),
                                  minlength=types.shape[0]).astype(np.int64)  # exact
        code, picks, need_after = _greedy(types, type_counts, lv.size, lv.priority, need)
        code = code[inverse]
        if picks:
            centre_of_pick = lv.members[[p[0] for p in picks]].astype(np.int32)
            code = np.where(code >= 0, centre_of_pick[np.maximum(code, 0)], code)
        return LevelPlan([(int(lv.members[j]), k, part) for j, k, part in picks],
                         code.astype(np.int32), need_after)

    def apply(self, plan: LevelPlan, fixing: Assignments) -> torch.Tensor:
        """Fix the weights of the plan's full picks, keep the free rest for the next level.

        Returns the candidates of the partial pick (weight indices; empty when none).
        """
        dev = self.free.device
        code_dev = torch.as_tensor(plan.code, device=dev)
        if self.dense:
            table = torch.full((self.nbins,), -1, dtype=torch.int32, device=dev)
            table[self.pairs_dev] = code_dev
        else:
            table = code_dev  # aligned with the sorted unique pairs
        keep_rest = plan.need > 0
        stays = plan.code == -1
        # (the counts are over every shard: this process holds at most its free weights of them)
        cand = torch.empty(min(int(self.counts[plan.code == -2].sum()), int(self.free.numel())),
                           dtype=self.free.dtype, device=dev)
        n_cand = n_rest = 0
        step = self.tuning.chunk
        for s in range(0, int(self.free.numel()), step):
            keys = self.keys[s:s + step]
            where = keys if self.dense else torch.searchsorted(self.pairs_dev, keys)
            code = table.index_select(0, where)
            free = self.free[s:s + step]
            pos = _find(code, lambda c: c >= 0)
            fixing.add(free.index_select(0, pos), code.index_select(0, pos))
            if plan.partial:
                pos = _find(code, lambda c: c == -2)
                cand[n_cand:n_cand + pos.numel()] = free.index_select(0, pos)
                n_cand += pos.numel()
            elif keep_rest:  # compact in place: the kept entries move down (n_rest <= s)
                pos = _find(code, lambda c: c == -1)
                kept, kept_keys = free.index_select(0, pos), keys.index_select(0, pos)  # copies first
                self.free[n_rest:n_rest + pos.numel()] = kept
                self.keys[n_rest:n_rest + pos.numel()] = kept_keys
                n_rest += pos.numel()
        if keep_rest:  # every weight of a fully picked run type is fixed now
            self.free, self.keys = self.free[:n_rest], self.keys[:n_rest]
            self.pairs, self.counts = self.pairs[stays], self.counts[stays]
            self.pairs_dev = torch.as_tensor(self.pairs, dtype=self.pairs_dev.dtype, device=dev)
        return cand[:n_cand]


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


def nearest_centres(values: torch.Tensor, free: torch.Tensor,
                    book: Codebook) -> tuple[torch.Tensor, torch.Tensor]:
    """Each free weight's nearest codebook centre (int64) and that distance (float64).

    Equidistant centres resolve like the greedy's ties: smaller ``|c|``, then the negative one.
    """
    cv = book.centres.values.double()
    v = values.index_select(0, free).double()
    hi = torch.searchsorted(cv, v).clamp_(max=len(cv) - 1)
    lo = (hi - 1).clamp_(min=0)
    d_hi = (cv.index_select(0, hi) - v).abs()
    d_lo = (cv.index_select(0, lo) - v).abs()
    prio = torch.as_tensor(book.priority, device=v.device)
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi)
                               & (prio.index_select(0, lo) > prio.index_select(0, hi)))
    return torch.where(take_lo, lo, hi), torch.where(take_lo, d_lo, d_hi)
