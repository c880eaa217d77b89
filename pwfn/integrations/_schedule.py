"""The round schedule both trainer integrations share, in optimizer steps.

A trainer tells the schedule its optimizer steps per epoch when training starts; rounds are then due
after ``warmup_epochs`` and every ``epochs_per_round`` epochs (fractions allowed), counted in optimizer
steps exactly as ``pwfn.compress`` counts them (``ceil(epochs * steps_per_epoch)``), and the Fixer is
told each training phase's steps (PWFN's budget-aware regulariser). The defaults are the method's own
(``fixer.warmup_epochs``, ``fixer.round_epochs``), so a callback run trains as much as ``compress``.
The accuracy contract's evaluation and float reference are settled before the first optimizer step.
Gradients are clipped as ``compress`` clips them (the method's parameters: PWFN leaves sigma out).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Any, Optional

import torch

from ..errors import CheckpointError, ConfigError
from ..training.contract import ContractSpec
from ..training.fixer import Evaluation, Fixer, apply_batchnorm_policy

log = logging.getLogger(__name__)


def _epochs(value: Any, name: str, minimum: float) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < minimum:
        raise ConfigError(f"{name} must be a number >= {minimum:g} (epochs; fractions allowed) or None for the "
                          f"method's own, got {value!r}")
    return float(value)


class RoundSchedule:
    """Fix round 1 after ``warmup_epochs``, then one round every ``epochs_per_round`` (both in epochs,
    default the method's own), counted in optimizer steps; the contract judged on ``evaluate``."""

    def __init__(self, fixer: Fixer, epochs_per_round: Optional[float] = None,
                 warmup_epochs: Optional[float] = None, evaluate: Optional[Evaluation] = None,
                 contract: ContractSpec = None, clip_gradients: bool = True) -> None:
        if not isinstance(fixer, Fixer):
            raise ConfigError(f"expected a pwfn.Fixer, got {type(fixer).__name__}")
        every = _epochs(epochs_per_round, "epochs_per_round", 0.0)
        warm = _epochs(warmup_epochs, "warmup_epochs", 0.0)
        if not isinstance(clip_gradients, bool):
            raise ConfigError(f"clip_gradients must be True or False, got {clip_gradients!r}")
        self.fixer = fixer
        self.clip_gradients = clip_gradients
        self._clip_params: Optional[list] = None  # the tensors clip() clips
        self.epochs_per_round = fixer.round_epochs if every is None else every
        self.warmup_epochs = fixer.warmup_epochs if warm is None else warm
        if contract is not None:
            fixer.set_contract(contract)
        self.evaluate = evaluate
        self.steps_per_epoch: Optional[int] = None
        self.next_due: Optional[int] = None  # the optimizer step at which the next round is fixed
        self.round_steps = 0
        self.epochs = 0
        self._rows_at_epoch_start = 0
        self._eval = contextlib.ExitStack()

    def epochs_needed(self) -> int:
        """Training epochs for every planned round to be followed by its training (the last round needs none).
        A round the contract splits needs ``epochs_per_round`` more; give the trainer some headroom."""
        planned = self.warmup_epochs + self.epochs_per_round * max(len(self.fixer.fractions) - 1, 0)
        return max(1, math.ceil(planned - 1e-9))

    def begin(self, steps_per_epoch: Any, step: int, fallback: Optional[Evaluation] = None,
              train_loader: Any = None) -> None:
        """Training starts (no optimizer step taken yet in this fit): the contract's evaluation (topped up with
        ``train_loader``'s examples when the validation data is small, as ``compress`` does) and float
        reference, the steps per round, and round 1 when no warm-up is due."""
        fixer = self.fixer
        if fixer.contract is not None and not fixer.has_evaluation:
            evaluation = self.evaluate if self.evaluate is not None else fallback
            if evaluation is None:
                raise ConfigError(
                    f"{fixer.method}: the accuracy contract ({fixer.contract.text()}) judges every round and has no "
                    "evaluation: pass evaluate= (a validation DataLoader, or a callable returning "
                    f"{fixer.contract.metric}) to the Fixer or the callback, or give the trainer validation data; "
                    "or turn the contract off (Fixer(..., contract=False))")
            fixer.set_evaluation(evaluation, reference=fixer.reference, top_up=train_loader)
        elif fixer.contract is not None and train_loader is not None:
            fixer.top_up_guard(train_loader)
        try:
            spe = int(steps_per_epoch)
        except (TypeError, ValueError, OverflowError):
            spe = 0
        if spe < 1:
            raise ConfigError(f"the trainer cannot say how many optimizer steps an epoch has (got {steps_per_epoch!r}): "
                              "the rounds are scheduled in steps; use a training loader with a length")
        self.steps_per_epoch = spe
        self.round_steps = max(1, math.ceil(self.epochs_per_round * spe - 1e-9)) if self.epochs_per_round else 0
        if self.next_due is None:  # a fresh start (a resumed schedule keeps its own)
            warm = math.ceil(self.warmup_epochs * spe - 1e-9)
            self.next_due = step + warm
            if warm:
                fixer.set_training_steps(warm)
        self.step_end(step)

    def step_end(self, step: int) -> bool:
        """After an optimizer step (``step`` steps so far); fixes every round that is due. True once all are."""
        fixer = self.fixer
        while not fixer.done and self.next_due is not None and step >= self.next_due:
            self._fix()
            self.next_due = step + self.round_steps
            if self.round_steps and not fixer.done:
                fixer.set_training_steps(self.round_steps)
        return fixer.done

    def epoch_end(self, metrics: Optional[dict[str, Any]] = None) -> None:
        """After a training epoch: its metrics go into the row of the round the epoch trained after."""
        self.epochs += 1
        rows = self._rows_at_epoch_start
        if metrics and rows and rows <= len(self.fixer.history):
            self.fixer.history[rows - 1].setdefault("after_train", {}).update(metrics)

    def end(self) -> None:
        """Training ended: rounds still open are fixed now, without training between them (each judged by the
        contract; said in the log)."""
        if not self.fixer.done:
            log.warning("%s: training ended with %d of %d rounds done; fixing the rest without training between "
                        "them (the contract still judges each). Give the trainer at least %d epochs.",
                        self.fixer.method, self.fixer.round, len(self.fixer.fractions),
                        self.epochs_needed() + (0 if len(self.fixer.fractions) == len(self.fixer.method_impl.fractions)
                                                else math.ceil(self.epochs_per_round)))
            while not self.fixer.done:
                self._fix()

    def clip(self) -> None:
        """Before an optimizer step: clip the gradients the method clips (``fixer.clip_parameters()``: PWFN leaves
        sigma out) at ``fixer.grad_clip``, as ``pwfn.compress`` and the own-loop how-to do."""
        limit = self.fixer.grad_clip
        if self.clip_gradients and limit and not self.fixer.done:
            if self._clip_params is None:  # found once, not at every step (the method builds its list anew)
                chosen = self.fixer.clip_parameters()
                self._clip_params = list(self.fixer.model.parameters()) if chosen is None else chosen
            torch.nn.utils.clip_grad_norm_(self._clip_params, limit)

    def check_trainer_clipping(self, limit: Any, setting: str) -> None:
        """Warn when the trainer clips gradients too: it clips every parameter (PWFN's sigmas included), so the
        rounds would train differently from ``compress``."""
        try:
            on = limit is not None and float(limit) > 0
        except (TypeError, ValueError):
            on = False
        if on and self.clip_gradients and self.fixer.grad_clip:
            log.warning("%s: the trainer clips gradients itself (%s=%s), over every parameter%s; the callback already "
                        "clips as compress does (%s at %g). Turn the trainer's clipping off (%s) for the same result "
                        "as compress", self.fixer.method, setting, limit,
                        " (sigmas included)" if self.fixer.clip_parameters() is not None else "",
                        "the method's parameters", self.fixer.grad_clip,
                        "max_grad_norm=0" if setting == "max_grad_norm" else f"{setting}=None")

    def train_mode(self) -> None:
        """At a training epoch's start: the BatchNorm policy, and which round the epoch trains after."""
        self._rows_at_epoch_start = len(self.fixer.history)
        apply_batchnorm_policy(self.fixer.model, self.fixer.cfg.batchnorm)

    def eval_begin(self) -> None:
        self._eval.enter_context(self.fixer.evaluating())

    def eval_end(self) -> None:
        self._eval.close()
        self._eval = contextlib.ExitStack()

    def _fix(self) -> None:
        rnd = self.fixer.fix_next()
        c = rnd.row.get("contract") or {}
        log.info("%s round %d/%d: %.1f%% fixed, %s values, %.3f bits%s", self.fixer.method, rnd.index + 1,
                 len(self.fixer.fractions), 100 * rnd.row.get("fixed_fraction", 0.0), rnd.row.get("unique"),
                 rnd.row.get("entropy", float("nan")),
                 f", {self.fixer.contract.metric} {c['value']:.6g} (drop {c['drop']:.4g})"
                 if c and self.fixer.contract is not None else "")

    def state_dict(self) -> dict[str, Any]:
        state = self.fixer.state_dict()
        state.pop("model")  # the trainer's own checkpoint holds the weights
        return {"fixer": state, "epochs": self.epochs, "next_due": self.next_due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        where = "the trainer checkpoint's fixing state"
        if not isinstance(state, dict) or not isinstance(state.get("fixer"), dict):
            raise CheckpointError(f"{where} is not a pwfn fixing state (no 'fixer' mapping)")
        epochs, due = state.get("epochs", 0), state.get("next_due")
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise CheckpointError(f"{where} says {epochs!r} epochs were trained: not a whole number >= 0")
        if due is not None and (isinstance(due, bool) or not isinstance(due, numbers.Integral) or due < 0):
            raise CheckpointError(f"{where} says the next round is due at step {due!r}: not a whole number >= 0")
        fx = dict(state["fixer"])
        fx["model"] = self.fixer.model.state_dict()
        self.fixer.load_state_dict(fx, where)
        self.epochs = int(epochs)
        self.next_due = None if due is None else int(due)
