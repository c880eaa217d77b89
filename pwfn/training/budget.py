"""Budget mode: the most accurate fixed network within a limit on its codebook.

A budget asks for at most ``K`` unique values in the whole network (``max_values``), at most
``H`` bits of weight-space entropy (``max_entropy_bits``) and/or at most ``M`` distinct values
in any one quantised tensor (``max_values_per_tensor``; 128 fits TFLite-Micro's 7-bit
per-tensor lookup tables). Two mechanisms, both keeping every value an exact sum of powers of
two from the run's candidate set:

1. **Restricted candidates** (``max_values``). Before the first round the fixing engine's
   candidate centres are cut down to an *allowed set* of at most ``K`` values, chosen by
   posterior coverage: a dry run of the engine's own greedy round fixes every weight at once
   with round 0's tolerances (``k * sigma`` for PWFN, ``delta_t * |w|`` for WFN, plus
   ``zero_fix``), i.e. it takes the values whose tolerance intervals hold the most weights;
   those values are then merged, least squared error first, down to ``K`` (so the few large
   weights keep a value of their own). Zero is always allowed. Every round then fixes weights only to
   allowed values (escalation and the nearest-centre fallback included), so the network can
   never exceed ``K`` values and the rounds' retraining adapts to the restriction.
   The choice depends only on the float model and the config, so a resumed run makes the same.
2. **Merging** (``max_entropy_bits``, ``max_values_per_tensor``, and ``max_values`` as a
   safety net). After every fixing round, while a limit is exceeded on the fixed weights, the
   value whose weights cost least to move (squared error of moving all of them to the nearest
   other value present, per bit of entropy saved for the entropy limit) is merged into that
   neighbour. Per-tensor merges only use values the tensor already holds, so they never add
   a network-wide value. Merges made in early rounds are compensated by the later rounds'
   training; the last round's merges guarantee the final network meets the budget.

The run report gets a ``budget`` section: each requested limit, what was achieved, whether it
was met, the allowed set and how many weights merging moved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core import metrics as M
from ..core.engine import EngineConfig, fix_round

__all__ = ["BudgetPlan", "choose_allowed", "merge_to_budget", "plan_budget"]

log = logging.getLogger(__name__)

def choose_allowed(
    values: Tensor,
    tolerance: Tensor,
    k: int,
    *,
    b: int = 7,
    max_order: int = 4,
    signed_terms: bool = False,
    zero_fix: bool = True,
    inc: float = 2.0,
) -> Tensor:
    """At most ``k`` candidate values (zero included), sorted (float64).

    A dry run of the fixing engine fixes every weight at once with the run's tolerances
    (its greedy picks the centres that cover the most weights, escalating as needed); the
    values it used are then merged, least squared error first (``count x distance^2`` to the
    nearest other used value), until ``k`` remain. Rarely used values far from the others
    (the large weights) are expensive to merge and so survive. Deterministic.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    v = values.detach().reshape(-1).to(torch.float64).cpu()
    t = tolerance.detach().reshape(-1).to(torch.float64).cpu().clamp_min(0)
    cfg = EngineConfig(b=b, max_order=max_order, signed_terms=signed_terms, zero_fix=zero_fix, inc=inc,
                       sigma_update="keep")
    dry = fix_round(v, t, torch.zeros_like(v, dtype=torch.bool), 1.0, config=cfg)
    vals, counts = torch.unique(dry.values + 0.0, sorted=True, return_counts=True)
    if not bool((vals == 0).any()):
        zero_at = int(torch.searchsorted(vals, torch.zeros(())))
        vals = torch.cat([vals[:zero_at], torch.zeros(1, dtype=vals.dtype), vals[zero_at:]])
        counts = torch.cat([counts[:zero_at], torch.zeros(1, dtype=counts.dtype), counts[zero_at:]])
    while vals.numel() > max(k, 1):
        i, j = _merge_once(vals, counts, keep_zero=True, entropy=False, total=int(counts.sum()))
        counts[j] += counts[i]
        keep = torch.ones(vals.numel(), dtype=torch.bool)
        keep[i] = False
        vals, counts = vals[keep], counts[keep]
    return vals.clone()


def _entropy(counts: Tensor) -> float:
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts.to(torch.float64) / total
    p = p[p > 0]
    return max(0.0, float(-(p * torch.log2(p)).sum()))


def _merge_once(vals: Tensor, counts: Tensor, keep_zero: bool, entropy: bool, total: int) -> tuple[int, int]:
    """(index of the value to drop, index of the neighbour it merges into) among sorted ``vals``."""
    n = vals.numel()
    left = torch.full((n,), math.inf, dtype=torch.float64)
    right = torch.full((n,), math.inf, dtype=torch.float64)
    left[1:] = (vals[1:] - vals[:-1]).abs()
    right[:-1] = (vals[1:] - vals[:-1]).abs()
    to_left = left <= right
    dist = torch.where(to_left, left, right)
    c = counts.to(torch.float64)
    cost = c * dist.square()
    if entropy:
        nb = torch.where(to_left, torch.arange(n) - 1, torch.arange(n) + 1).clamp(0, n - 1)
        p, q = c / total, c[nb] / total
        s = p + q
        gain = s * torch.log2(s) - p * torch.log2(p.clamp_min(1e-300)) - q * torch.log2(q.clamp_min(1e-300))
        gain = -gain  # entropy saved by the merge (>= 0)
        cost = cost / gain.clamp_min(1e-300)
    if keep_zero:
        cost[vals == 0] = math.inf
    i = int(torch.argmin(cost))
    j = i - 1 if bool(to_left[i]) else i + 1
    return i, j


def merge_to_budget(
    values: Tensor,
    fixed: Tensor,
    slots: list[tuple[str, int, int]],
    *,
    max_values: Optional[int] = None,
    max_entropy_bits: Optional[float] = None,
    max_values_per_tensor: Optional[int] = None,
) -> tuple[Tensor, int]:
    """Merge fixed values until the limits hold; returns (new flat values, weights moved).

    ``slots`` are (name, offset, numel) of each tensor in the flat vector. Only fixed entries
    are counted and moved; every moved weight gets a value that was already present.
    """
    out = values.detach().clone()
    moved = 0
    if max_values_per_tensor is not None:
        for _, off, n in slots:
            seg = out[off:off + n]
            f = fixed[off:off + n]
            while True:
                vals, inv, counts = torch.unique(seg[f] + 0.0, sorted=True, return_inverse=True, return_counts=True)
                if vals.numel() <= max_values_per_tensor or vals.numel() < 2:
                    break
                i, j = _merge_once(vals.double(), counts, keep_zero=True, entropy=False, total=int(f.sum()))
                sel = f.clone()
                sel[f] = inv == i
                seg[sel] = vals[j]
                moved += int(sel.sum())
    while True:
        fv = out[fixed] + 0.0
        vals, inv, counts = torch.unique(fv, sorted=True, return_inverse=True, return_counts=True)
        if vals.numel() < 2:
            break
        over_k = max_values is not None and vals.numel() > max_values
        over_h = max_entropy_bits is not None and _entropy(counts) > max_entropy_bits + 1e-12
        if not (over_k or over_h):
            break
        i, j = _merge_once(vals.double(), counts, keep_zero=True, entropy=over_h and not over_k,
                           total=int(fv.numel()))
        sel = fixed.clone()
        sel[fixed] = inv == i
        out[sel] = vals[j]
        moved += int(sel.sum())
    return out, moved


@dataclasses.dataclass
class BudgetPlan:
    """A run's budget: the restricted engine config and the merging after each round."""

    max_values: Optional[int]
    max_entropy_bits: Optional[float]
    max_values_per_tensor: Optional[int]
    engine_config: EngineConfig
    allowed: Optional[list[float]]
    merged_weights: int = 0
    merges_per_round: list[int] = dataclasses.field(default_factory=list)

    def enforce(self, view: Any) -> int:
        """Merge the view's fixed values to the budget (in place); returns weights moved."""
        values, fixed = view.values(), view.fixed()
        slots = [(s.name, s.offset, s.numel) for s in view.slots]
        new, moved = merge_to_budget(values, fixed, slots, max_values=self.max_values,
                                     max_entropy_bits=self.max_entropy_bits,
                                     max_values_per_tensor=self.max_values_per_tensor)
        if moved:
            view.write(new.to(values.dtype), fixed)
            log.info("budget: merged %d fixed weights onto neighbouring values", moved)
        self.merged_weights += moved
        self.merges_per_round.append(moved)
        return moved

    def report(self, view: Any) -> dict[str, Any]:
        """Requested against achieved, on the view's (final) values."""
        values, fixed = view.values(), view.fixed()
        fv = values[fixed]
        unique = M.unique_count(fv) if fv.numel() else 0
        entropy = M.entropy_bits(fv) if fv.numel() else 0.0
        per_tensor = {s.name: M.unique_count(s.value.detach()[s.mask]) if bool(s.mask.any()) else 0
                      for s in view.slots}
        worst = max(per_tensor.values()) if per_tensor else 0
        out: dict[str, Any] = {}

        def row(name: str, requested: Any, achieved: Any, ok: bool) -> None:
            out[name] = {"requested": requested, "achieved": achieved,
                         "met": ok, "slack": None if requested is None else requested - achieved}

        row("max_values", self.max_values, unique, self.max_values is None or unique <= self.max_values)
        row("max_entropy_bits", self.max_entropy_bits, entropy,
            self.max_entropy_bits is None or entropy <= self.max_entropy_bits + 1e-12)
        row("max_values_per_tensor", self.max_values_per_tensor, worst,
            self.max_values_per_tensor is None or worst <= self.max_values_per_tensor)
        out["met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
        out["allowed_values"] = self.allowed
        out["merged_weights"] = self.merged_weights
        out["merged_per_round"] = list(self.merges_per_round)
        out["values_per_tensor"] = per_tensor
        return out


def budget_active(budget: Any) -> bool:
    """Whether the config's ``budget`` section sets any limit (budget mode is on)."""
    return budget is not None and any(getattr(budget, k) is not None
                                      for k in ("max_values", "max_entropy_bits", "max_values_per_tensor"))


def plan_budget(budget: Any, engine_config: EngineConfig, view: Any,
                tolerance: Callable[[], Tensor]) -> Optional[BudgetPlan]:
    """The run's ``BudgetPlan`` from the config's ``budget`` section, or None when it sets no limit.

    ``tolerance()`` gives round 0's per-weight tolerance (called only for ``max_values``).
    """
    if not budget_active(budget):
        return None
    allowed: Optional[list[float]] = None
    cfg = engine_config
    if budget.max_values is not None:
        a = choose_allowed(view.values(), tolerance(), budget.max_values, b=cfg.b, max_order=cfg.max_order,
                           signed_terms=cfg.signed_terms, zero_fix=cfg.zero_fix, inc=cfg.inc)
        allowed = [float(x) for x in a.tolist()]
        cfg = dataclasses.replace(cfg, allowed=tuple(allowed))
        log.info("budget: %d allowed values %s", len(allowed), allowed)
    return BudgetPlan(budget.max_values, budget.max_entropy_bits, budget.max_values_per_tensor, cfg, allowed)
