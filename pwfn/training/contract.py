"""The accuracy contract: how far the fixed model may fall behind the float model, and the verdict.

A contract names one metric of the task (its primary one unless told otherwise), which way it is
better, and the largest drop allowed against the **float model** (not per round):

* ``drop_type="absolute"``: in the metric's own units, e.g. 0.5 points of top-1;
* ``drop_type="relative"``: as a share of the float model's value, e.g. 0.01 = 1 % more bits per
  character, 0.02 = 2 % more mean squared error.

Defaults by the metric's scale (:class:`pwfn.training.tasks.MetricInfo`): accuracies in percent may fall by
0.5 points; a mean squared error may rise by 2 % (its square root, the RMSE, by 1 %); any other loss,
error or bits by 1 %; a metric of unknown scale by 1 % of its value. The numbers are chosen so that
each is about one percent of the error's natural scale (half a point of top-1 is 10 % of a 5 % error
rate, the usual "lossless" bar in the quantisation literature).

:func:`resolve_contract` turns the config's ``contract`` section (or what ``compress``/``Fixer`` got)
into an :class:`AccuracyContract` for a task; :meth:`AccuracyContract.drop` measures a drop and
:meth:`AccuracyContract.holds` judges it. Nothing here trains or fixes: the round loop in
:class:`pwfn.Fixer` enforces it (docs/algorithm.md, "The accuracy contract").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..errors import ConfigError
from .tasks import METRIC_SCALES, MetricInfo, Task, add_sums

DROP_TYPES = ("absolute", "relative")

#: the default tolerance per metric scale: (max_drop, drop_type)
DEFAULT_DROPS: dict[str, tuple[float, str]] = {
    "percent": (0.5, "absolute"),
    "squared": (0.02, "relative"),
    "error": (0.01, "relative"),
    "other": (0.01, "relative"),
}

#: a relative drop is measured against max(|reference|, this): a float value of 0 has no share
_TINY = 1e-12


@dataclass(frozen=True)
class AccuracyContract:
    """The promise a run keeps: ``metric`` of the fixed model falls at most ``max_drop`` below the float model's.

    ``higher_is_better`` says which way ``metric`` is better; ``drop_type`` is ``"absolute"`` (metric units)
    or ``"relative"`` (a share of the float model's value). Build one directly, or let
    :func:`resolve_contract` fill in the task's defaults.
    """

    metric: str
    max_drop: float
    drop_type: str
    higher_is_better: bool
    #: the metric's scale (:data:`pwfn.training.tasks.METRIC_SCALES`): how many examples resolve the tolerance
    scale: str = "other"

    def __post_init__(self) -> None:
        if self.scale not in METRIC_SCALES:
            raise ConfigError(f"contract scale must be one of {METRIC_SCALES}, got {self.scale!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"contract.metric must be a metric name, got {self.metric!r}")
        if self.drop_type not in DROP_TYPES:
            raise ConfigError(f"contract.drop_type must be one of {DROP_TYPES}, got {self.drop_type!r}")
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"contract.higher_is_better must be true or false, got {self.higher_is_better!r}")
        d = self.max_drop
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(float(d)) or d < 0:
            raise ConfigError(f"contract.max_drop must be a finite number >= 0, got {d!r}")
        if self.drop_type == "relative" and self.higher_is_better and d >= 1:
            raise ConfigError(f"contract.max_drop = {d:g} relative lets {self.metric} fall to nothing or below: a "
                              "relative drop of a higher-is-better metric must be below 1 (e.g. 0.01 for 1 %)")
        object.__setattr__(self, "max_drop", float(d))

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than the float model's ``reference``, in the contract's units
        (negative: better). NaN when either is not finite."""
        if not (math.isfinite(reference) and math.isfinite(value)):
            return math.nan
        worse = (reference - value) if self.higher_is_better else (value - reference)
        return worse if self.drop_type == "absolute" else worse / max(abs(reference), _TINY)

    def holds(self, reference: float, value: float) -> bool:
        """Whether ``value`` keeps the contract against ``reference`` (a NaN never does)."""
        d = self.drop(reference, value)
        return math.isfinite(d) and d <= self.max_drop * (1 + 1e-9) + 1e-12

    def limit(self, reference: float) -> float:
        """The worst value of the metric the contract allows, given the float model's ``reference``."""
        allowed = self.max_drop if self.drop_type == "absolute" else self.max_drop * max(abs(reference), _TINY)
        return reference - allowed if self.higher_is_better else reference + allowed

    def examples_needed(self, minimum: int) -> int:
        """Examples the guard needs to tell the tolerance from one example's worth: for an accuracy in percent,
        enough that the tolerance is at least 5 examples (0.5 points: 1000), and never fewer than ``minimum``."""
        if self.scale == "percent" and self.drop_type == "absolute" and self.max_drop > 0:
            return max(int(minimum), math.ceil(500.0 / self.max_drop - 1e-9))
        return int(minimum)

    def text(self) -> str:
        """The promise in words: ``top1 at most 0.5 below the float model's``."""
        way = "below" if self.higher_is_better else "above"
        amount = (f"{self.max_drop:g}" if self.drop_type == "absolute" else f"{100 * self.max_drop:g} %")
        return f"{self.metric} at most {amount} {way} the float model's"

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "max_drop": self.max_drop, "drop_type": self.drop_type,
                "higher_is_better": self.higher_is_better, "scale": self.scale, "text": self.text()}


ContractSpec = Union[None, bool, AccuracyContract, Mapping[str, Any]]

_SPEC_KEYS = ("metric", "max_drop", "drop_type", "higher_is_better", "enforce")


def resolve_contract(task: Task, spec: ContractSpec = None, section: Any = None) -> Optional[AccuracyContract]:
    """The contract for ``task``: from ``spec`` (an :class:`AccuracyContract`, a dict of its fields, ``False``
    for none, ``None``/``True`` for the config section's) over the config's ``contract`` ``section``
    (:class:`pwfn.model.config.ContractConfig`), with the metric's defaults for what neither sets.

    Returns None when the contract is turned off (``enforce: false`` or ``spec=False``). Raises
    ``ConfigError`` for a tolerance that is negative, NaN or meaningless for the metric, a metric the task
    does not know whose direction is not given, or an unknown key.
    """
    if isinstance(spec, AccuracyContract):
        return spec
    fields: dict[str, Any] = {}
    if section is not None:
        fields.update({k: getattr(section, k) for k in _SPEC_KEYS if getattr(section, k, None) is not None})
    if spec is False:
        return None
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(f"unknown contract key(s) {unknown}; a contract takes {list(_SPEC_KEYS)}")
        fields.update({k: v for k, v in spec.items()})
    elif spec not in (None, True):
        raise ConfigError(f"contract must be a pwfn.AccuracyContract, a dict of its fields, True, False or None; "
                          f"got {type(spec).__name__}")
    if fields.get("enforce", True) is False:
        return None
    metric = fields.get("metric") or task.primary
    if not isinstance(metric, str):
        raise ConfigError(f"contract.metric must be a metric name, got {metric!r}")
    info: Optional[MetricInfo] = task.metric_info(metric)
    hib = fields.get("higher_is_better")
    if hib is None:
        if info is None:
            raise ConfigError(f"the contract names the metric {metric!r}, which the {task.name} task does not know "
                              f"(it knows {sorted(task.metrics)}): say which way it is better with "
                              "contract higher_is_better=true/false")
        hib = info.higher_is_better
    elif info is not None and hib != info.higher_is_better:
        raise ConfigError(f"contract.higher_is_better={hib} contradicts the {task.name} task's {metric!r}, which is "
                          f"{'higher' if info.higher_is_better else 'lower'}-is-better")
    scale = info.scale if info is not None else "other"
    default_drop, default_type = DEFAULT_DROPS[scale]
    drop_type = fields.get("drop_type") or default_type
    max_drop = fields.get("max_drop")
    if max_drop is None:
        if drop_type != default_type:
            raise ConfigError(f"contract.drop_type={drop_type} for {metric!r} needs a max_drop: the default "
                              f"({default_drop:g}) is {default_type}")
        max_drop = default_drop
    contract = AccuracyContract(metric=metric, max_drop=max_drop, drop_type=drop_type, higher_is_better=hib,
                                scale=scale)
    if scale == "percent" and drop_type == "absolute" and contract.max_drop >= 100:
        raise ConfigError(f"contract.max_drop = {contract.max_drop:g} points of {metric} (a percentage) allows "
                          "any result; choose a drop below 100 (e.g. 0.5)")
    return contract


def metric_value(metrics: Any, contract: AccuracyContract, where: str = "the evaluation") -> float:
    """The contract's metric out of an evaluation: a number, or a dict holding it (anything else is an error
    naming what came back)."""
    if isinstance(metrics, bool):
        raise ConfigError(f"{where} returned a bool; it must return {contract.metric} (a number) or a dict of "
                          "metrics holding it")
    if isinstance(metrics, numbers.Real):
        return float(metrics)
    if hasattr(metrics, "item") and getattr(metrics, "numel", lambda: 0)() == 1:  # a one-element tensor
        return float(metrics.item())
    if isinstance(metrics, Mapping):
        if contract.metric not in metrics:
            raise ConfigError(f"{where} returned the metrics {sorted(map(str, metrics))}, without the contract's "
                              f"metric {contract.metric!r}: return it, or name one of these in the contract "
                              "(contract metric=...)")
        return metric_value(metrics[contract.metric], contract, where)
    raise ConfigError(f"{where} must return {contract.metric} (a number) or a dict of metrics holding it; it "
                      f"returned a {type(metrics).__name__}"
                      + (" (evaluate= now returns the contract's metric, not a (score, loss) pair)"
                         if isinstance(metrics, tuple) else ""))


def paired_drop(contract: AccuracyContract, task: Task, reference_units: list, units: list) -> tuple[float, float, float]:
    """The contract's metric on ``units`` (a list of per-unit :meth:`Task.sums`), its drop against the same
    units' float-model sums ``reference_units``, and that drop's standard error, estimated by the jackknife
    over the units (leave one unit out: the paired difference's spread, for any metric the task computes
    from its sums). The error is 0 with fewer than two units."""
    def value(us: list, skip: Optional[int] = None) -> float:
        return metric_value(task.finish(add_sums(us, skip)), contract, "the contract's evaluation")

    ref, now = value(reference_units), value(units)
    drop = contract.drop(ref, now)
    b = len(units)
    if b < 2 or len(reference_units) != b or not math.isfinite(drop):
        return now, drop, 0.0
    leave_out = [contract.drop(value(reference_units, j), value(units, j)) for j in range(b)]
    mean = sum(leave_out) / b
    se = math.sqrt((b - 1) / b * sum((x - mean) ** 2 for x in leave_out))
    return now, drop, se if math.isfinite(se) else math.inf


def verdict(contract: Optional[AccuracyContract], reference: Optional[float], value: Optional[float],
            se: float = 0.0, margin: float = 0.0, **extra: Any) -> dict[str, Any]:
    """The report's ``contract`` record: the promise, the float model's and the fixed model's values, the drop,
    its standard error and the bound the guard judged (``drop + margin * se``), and whether it held: the bound
    within the contract (``held`` is None when nothing was measured)."""
    if contract is None:
        return {"enforced": False, "text": "no accuracy contract (turned off): the result was not checked",
                **extra}
    out: dict[str, Any] = {"enforced": True, **contract.describe(), "reference": reference, "value": value}
    if reference is not None and value is not None:
        drop = contract.drop(reference, value)
        bound = drop + margin * se
        out.update(drop=drop, drop_se=se, margin=margin, drop_bound=bound, limit=contract.limit(reference),
                   held=bool(math.isfinite(bound) and bound <= contract.max_drop * (1 + 1e-9) + 1e-12))
    else:
        out["held"] = None
    out.update(extra)
    return out


__all__ = ["AccuracyContract", "DEFAULT_DROPS", "DROP_TYPES", "metric_value", "paired_drop", "resolve_contract",
           "verdict"]
