"""The epoch schedule both trainer integrations share."""

from __future__ import annotations

import contextlib
import logging
import numbers
from typing import Any, Optional

from ..errors import CheckpointError, ConfigError
from ..fixer import Fixer, apply_batchnorm_policy

log = logging.getLogger(__name__)


def whole_epochs(name: str, value: Any, least: int) -> int:
    """``value`` as a whole number of epochs >= ``least``; anything else (a bool, a float, a string) is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < least:
        raise ConfigError(f"{name} must be a whole number of epochs >= {least}, got {value!r} "
                          f"({type(value).__name__})")
    return int(value)


class RoundSchedule:
    """Fix round 1 at the start (after ``warmup_epochs``), then one round every ``epochs_per_round``."""

    def __init__(self, fixer: Fixer, epochs_per_round: int = 1, warmup_epochs: int = 0) -> None:
        if not isinstance(fixer, Fixer):
            raise ConfigError(f"expected a pwfn.Fixer, got {type(fixer).__name__}")
        whole_epochs("epochs_per_round", epochs_per_round, 1)
        whole_epochs("warmup_epochs", warmup_epochs, 0)
        self.fixer = fixer
        self.epochs_per_round = int(epochs_per_round)
        self.warmup_epochs = int(warmup_epochs)
        self.epochs = 0
        self._eval = contextlib.ExitStack()

    def epochs_needed(self) -> int:
        """Training epochs for every round to be followed by its training (the last round needs none)."""
        return self.warmup_epochs + self.epochs_per_round * max(len(self.fixer.fractions) - 1, 0)

    def start(self) -> None:
        if self.warmup_epochs == 0 and self.fixer.round == 0:
            self._fix()

    def epoch_end(self, metrics: Optional[dict[str, Any]] = None) -> bool:
        """After a training epoch; returns True once every weight is fixed (training may stop)."""
        self.epochs += 1
        if metrics and self.fixer.history:
            self.fixer.record(after_train=metrics)
        due = self.epochs >= self.warmup_epochs and (self.epochs - self.warmup_epochs) % self.epochs_per_round == 0
        if due and not self.fixer.done:
            self._fix()
        return self.fixer.done

    def end(self) -> None:
        """Training ended: rounds still open are fixed now, without training between them (said in the log)."""
        if not self.fixer.done:
            log.warning("%s: training ended with %d of %d rounds done; fixing the rest without training between "
                        "them. Give the trainer at least %d epochs.", self.fixer.method, self.fixer.round,
                        len(self.fixer.fractions), self.epochs_needed())
            while not self.fixer.done:
                self.fixer.fix_next()

    def train_mode(self) -> None:
        apply_batchnorm_policy(self.fixer.model, self.fixer.cfg.batchnorm)

    def eval_begin(self) -> None:
        self._eval.enter_context(self.fixer.evaluating())

    def eval_end(self) -> None:
        self._eval.close()
        self._eval = contextlib.ExitStack()

    def _fix(self) -> None:
        rnd = self.fixer.fix_next()
        log.info("%s round %d/%d: %.1f%% fixed, %s values, %.3f bits", self.fixer.method, rnd.index + 1,
                 len(self.fixer.fractions), 100 * rnd.row.get("fixed_fraction", 0.0), rnd.row.get("unique"),
                 rnd.row.get("entropy", float("nan")))

    def state_dict(self) -> dict[str, Any]:
        state = self.fixer.state_dict()
        state.pop("model")  # the trainer's own checkpoint holds the weights
        return {"fixer": state, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        where = "the trainer checkpoint's fixing state"
        if not isinstance(state, dict) or not isinstance(state.get("fixer"), dict):
            raise CheckpointError(f"{where} is not a pwfn fixing state (no 'fixer' mapping)")
        epochs = state.get("epochs", 0)
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise CheckpointError(f"{where} says {epochs!r} epochs were trained: not a whole number >= 0")
        fx = dict(state["fixer"])
        fx["model"] = self.fixer.model.state_dict()
        self.fixer.load_state_dict(fx, where)
        self.epochs = int(epochs)
