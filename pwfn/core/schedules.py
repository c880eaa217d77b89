"""Fixing schedules as plain data: which fraction is fixed after each round, and how wide
the tolerance is in that round.

PWFN (NeurIPS 2023): 20, 40, 60, 70, 80, 90, 95, 97.5, 99, 100 % with tolerance
``k * sigma`` (k = 1 in the paper).  WFN (ECCV 2022): 30, 60, 80, 90, 95, 97.5, 99, 99.75,
99.9, 100 % with the relative tolerance ``delta_t * |w|``, ``delta_t = delta * (T - t)`` for
round ``t = 0 .. T-1`` - wide early, ``delta`` itself in the last round.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pwfn.errors import ConfigError

if TYPE_CHECKING:  # torch only in annotations: configs (and so the CLI) load without it
    import torch

__all__ = [
    "PWFN_FRACTIONS",
    "WFN_FRACTIONS",
    "Schedule",
    "pwfn_schedule",
    "tolerance_for_round",
    "wfn_schedule",
]

PWFN_FRACTIONS = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
WFN_FRACTIONS = (0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0)

_KEYS = ("fractions", "delta", "delta_multipliers", "k")
_PRESETS = ("pwfn", "wfn")


def _real(name: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ConfigError(f"schedule.{name}: expected a finite number, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class Schedule:
    """Fractions fixed after each round, plus the tolerance rule.

    ``delta is None``: PWFN-style tolerance ``k * sigma``.  Otherwise WFN-style relative
    tolerance ``delta * delta_multipliers[t] * |w|`` (multipliers default to 1).
    Validated on construction: fractions strictly increasing in (0, 1], ending at 1.
    """

    fractions: tuple
    delta: float | None = None
    delta_multipliers: tuple | None = None
    k: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.fractions, (str, bytes)) or not isinstance(self.fractions, Sequence):
            raise ConfigError(f"schedule.fractions: expected a list, got {self.fractions!r}")
        fr = tuple(_real("fractions", f) for f in self.fractions)
        if not fr:
            raise ConfigError("schedule.fractions: empty")
        if any(not 0.0 < f <= 1.0 for f in fr):
            raise ConfigError(f"schedule.fractions: every fraction must be in (0, 1], got {fr}")
        if any(b <= a for a, b in zip(fr, fr[1:])):
            raise ConfigError(f"schedule.fractions: must be strictly increasing, got {fr}")
        if fr[-1] != 1.0:
            raise ConfigError(f"schedule.fractions: the last round must fix 1.0, got {fr[-1]}")
        object.__setattr__(self, "fractions", fr)
        k = _real("k", self.k)
        if k <= 0:
            raise ConfigError(f"schedule.k: must be > 0, got {k}")
        object.__setattr__(self, "k", k)
        if self.delta is not None:
            d = _real("delta", self.delta)
            if d <= 0:
                raise ConfigError(f"schedule.delta: must be > 0, got {d}")
            object.__setattr__(self, "delta", d)
        if self.delta_multipliers is not None:
            if self.delta is None:
                raise ConfigError("schedule.delta_multipliers: given without schedule.delta")
            if (isinstance(self.delta_multipliers, (str, bytes))
                    or not isinstance(self.delta_multipliers, Sequence)):
                raise ConfigError("schedule.delta_multipliers: expected a list")
            dm = tuple(_real("delta_multipliers", m) for m in self.delta_multipliers)
            if len(dm) != len(fr):
                raise ConfigError(
                    f"schedule.delta_multipliers: {len(dm)} entries for {len(fr)} rounds"
                )
            if any(m <= 0 for m in dm):
                raise ConfigError(f"schedule.delta_multipliers: must be > 0, got {dm}")
            object.__setattr__(self, "delta_multipliers", dm)

    def __len__(self) -> int:
        return len(self.fractions)

    @property
    def relative(self) -> bool:
        """True for a WFN-style (relative, ``delta * |w|``) tolerance."""
        return self.delta is not None

    def delta_for_round(self, round_index: int) -> float:
        """``delta_t`` of round ``round_index`` (WFN schedules only)."""
        self._check_round(round_index)
        if self.delta is None:
            raise ConfigError("schedule has no delta (it is a sigma-based PWFN schedule)")
        mult = 1.0 if self.delta_multipliers is None else self.delta_multipliers[round_index]
        return self.delta * mult

    def _check_round(self, round_index: int) -> None:
        if (isinstance(round_index, bool) or not isinstance(round_index, int)
                or not 0 <= round_index < len(self.fractions)):
            raise ConfigError(
                f"round index must be an int in [0, {len(self.fractions)}), got {round_index!r}"
            )

    def to_dict(self) -> dict:
        """Plain-data form (YAML/JSON friendly); ``from_dict`` inverts it."""
        out: dict = {"fractions": list(self.fractions), "k": self.k}
        if self.delta is not None:
            out["delta"] = self.delta
        if self.delta_multipliers is not None:
            out["delta_multipliers"] = list(self.delta_multipliers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Build from config data: explicit keys, or ``{"preset": "pwfn"|"wfn", ...}``.

        Why: configs are YAML; unknown keys are an error rather than silently ignored.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"schedule: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", None)
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ConfigError(f"schedule: unknown keys {unknown}; allowed: preset, {_KEYS}")
        if preset is not None:
            if preset not in _PRESETS:
                raise ConfigError(f"schedule.preset: must be one of {_PRESETS}, got {preset!r}")
            if "fractions" in data or "delta_multipliers" in data:
                raise ConfigError("schedule: preset cannot be combined with explicit fractions")
            if preset == "pwfn":
                if "delta" in data:
                    raise ConfigError("schedule: the pwfn preset takes no delta")
                return pwfn_schedule(k=data.get("k", 1.0))
            if "delta" not in data:
                raise ConfigError("schedule: the wfn preset needs a delta")
            if "k" in data:
                raise ConfigError("schedule: the wfn preset takes no k")
            return wfn_schedule(data["delta"])
        if "fractions" not in data:
            raise ConfigError("schedule: needs 'fractions' or a 'preset'")
        return cls(fractions=data["fractions"], delta=data.get("delta"),
                   delta_multipliers=data.get("delta_multipliers"), k=data.get("k", 1.0))


def pwfn_schedule(k: float = 1.0, fractions: Sequence[float] = PWFN_FRACTIONS) -> Schedule:
    """The PWFN schedule (the paper's fractions by default); tolerance ``k * sigma``."""
    return Schedule(fractions=fractions, k=k)


def wfn_schedule(delta: float, fractions: Sequence[float] = WFN_FRACTIONS) -> Schedule:
    """The WFN schedule (the paper's fractions by default); ``delta_t = delta * (T - t)``, so the
    last round uses delta."""
    n = len(fractions)
    return Schedule(fractions=fractions, delta=delta,
                    delta_multipliers=tuple(float(n - t) for t in range(n)))


def tolerance_for_round(schedule: Schedule, round_index: int, *,
                        values: torch.Tensor | None = None,
                        sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight tolerance for round ``round_index``: the engine's ``tolerance`` input.

    PWFN schedules need ``sigma`` (returns ``k * sigma``); WFN schedules need ``values``
    (returns ``delta_t * |values|``).  Same dtype/device as the tensor given.
    """
    schedule._check_round(round_index)
    if schedule.relative:
        if values is None:
            raise ConfigError("tolerance_for_round: a delta (WFN) schedule needs values")
        return values.detach().abs() * schedule.delta_for_round(round_index)
    if sigma is None:
        raise ConfigError("tolerance_for_round: a sigma (PWFN) schedule needs sigma")
    s = sigma.detach()
    return s.clone() if schedule.k == 1.0 else s * schedule.k
