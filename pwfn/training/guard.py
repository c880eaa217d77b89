"""The accuracy contract's side of the :class:`pwfn.Fixer`: its evaluation and the float model's value.

The contract (:mod:`pwfn.training.contract`) is judged on guard data: a validation loader (topped up with training
examples when it is small) cut into units, so that a drop comes with its standard error, or a callable of
yours that returns the metric. This mixin holds that evaluation and measures the model against the float
model; :mod:`pwfn.training.contract_rounds` decides what a round does with the measurements. It works on the
Fixer's attributes (``model``, ``task``, ``adapter``, ``contract``, ``cfg``, ``round``, ``steps_taken``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Union

import torch

from ..errors import CheckpointError, ConfigError, ContractError
from .contract import ContractSpec, metric_value, paired_drop, resolve_contract, verdict
from .tasks import add_sums, evaluate_units, split_units
from .train import draw_examples, take_examples

log = logging.getLogger("pwfn.training.fixer")

#: what ``evaluate=`` may be: a callable returning the contract's metric (or a dict holding it), or an
#: iterable of validation batches (a DataLoader) that the Fixer scores with its task
Evaluation = Union[Callable[[], Any], Any]


class ContractGuard:
    """The evaluation the accuracy contract is judged on (a mixin of :class:`pwfn.Fixer`)."""

    def set_evaluation(self, evaluate: Evaluation, source: Optional[str] = None, *,
                       reference: Optional[float] = None, top_up: Any = None) -> None:
        """Judge the contract on ``evaluate`` from now on (see the class docstring), and measure the float
        model's value on it now unless ``reference`` gives it (a resumed run). ``source`` says in the report
        what the guard data is; ``top_up``: a training loader to add examples from when ``evaluate`` (a loader)
        holds fewer than the contract needs (:meth:`top_up_guard`)."""
        probe, info = self._make_probe(evaluate)
        if source is not None:
            info["source"] = source
        self._evaluate, self.guard_info = probe, info
        if top_up is not None:
            self._add_training_examples(top_up)
        if self.contract is None:
            return
        if reference is not None:
            self.reference = float(reference)
            if self._reference_units is not None and len(self._reference_units) != len(self._units):
                raise CheckpointError("the contract's guard data differs from the one the float model was measured on "
                                      f"({len(self._units)} units, then {len(self._reference_units)}): the validation "
                                      "data changed; start over")
        elif self.reference is None:
            self._measure_reference()

    def _measure_reference(self) -> None:
        assert self.contract is not None
        if self.round > 0 or self.steps_taken > 0:
            self.guard_info["reference_after_steps"] = self.steps_taken
            log.warning("%s: the float model's %s is measured after %d optimizer steps%s, not on the model as "
                        "given: the contract is judged against that. Give the evaluation when you create the "
                        "Fixer (evaluate=...) to judge against the float model itself", self.method,
                        self.contract.metric, self.steps_taken, f" and {self.round} rounds" if self.round else "")
        out = self._evaluation()
        self._reference_units = out if self._guard_batches is not None else None
        self.reference = self._value(out)
        if not math.isfinite(self.reference):
            raise ContractError(f"the float model's {self.contract.metric} on the guard data is {self.reference}: "
                                "the contract cannot be judged against it; check the evaluation")
        n = self.guard_info.get("examples")
        log.info("%s: accuracy contract: %s (float model: %s = %.6g on %s)", self.method, self.contract.text(),
                 self.contract.metric, self.reference, self.guard_info["source"] if n else "your evaluation")

    def top_up_guard(self, train_loader: Any) -> bool:
        """When the contract's guard (a validation loader given to ``evaluate=``) holds fewer examples than the
        contract needs to tell its tolerance from noise, add training examples from ``train_loader``, drawn
        reproducibly from the config's seed (``contract.guard_from_train``; they stay in training, so they
        understate what fixing costs on new data: more validation data judges better). Only before the first
        round and optimizer step (the float model is measured again on the larger set). Returns whether
        examples were added. ``pwfn.compress`` and both callbacks call it with their training loader."""
        if self._guard_batches is None or self.round > 0 or self.steps_taken > 0:
            return False
        added = self._add_training_examples(train_loader)
        if added and self.contract is not None:
            self.reference = None
            self._measure_reference()
        return added

    def _add_training_examples(self, train_loader: Any) -> bool:
        info, cc = self.guard_info, self.cfg.contract
        n, needed = info.get("examples") or 0, info.get("needed") or 0
        if self._guard_batches is None or n >= needed or not cc.guard_from_train or train_loader is None:
            return False
        extra, m = draw_examples(train_loader, needed - n, self.cfg.seed, self.adapter)
        if not m:
            return False
        self._guard_batches.extend(extra)
        self._units = split_units(self._guard_batches, self.adapter)
        info.update(examples=n + m, batches=len(self._guard_batches), training_examples=m,
                    source=f"{n} validation + {m} training examples")
        log.info("%s: the validation data holds %d examples and the contract's guard needs %d to tell its tolerance "
                 "from noise: it also scores %d training examples (drawn from seed %d; they stay in training, so "
                 "they understate what fixing costs on new data: more validation data judges better)",
                 self.method, n, needed, m, self.cfg.seed)
        return True

    @property
    def has_evaluation(self) -> bool:
        """Whether the contract has its evaluation (:meth:`set_evaluation`)."""
        return self._evaluate is not None

    def set_contract(self, contract: ContractSpec) -> None:
        """Replace the accuracy contract (as ``contract=`` of the constructor) before the float model is measured."""
        if self.reference is not None or self.round > 0:
            raise ConfigError("the contract can be changed only before its float reference is measured: pass "
                              "contract= when you create the Fixer (or the callback)")
        self.contract = resolve_contract(self.task, contract, self.cfg.contract)

    def _make_probe(self, evaluate: Evaluation) -> tuple[Callable[[], Any], dict[str, Any]]:
        """The contract's evaluation as a callable, and what it scores."""
        self._guard_batches = None
        if callable(evaluate) and not hasattr(evaluate, "__iter__"):
            return evaluate, {"source": "your evaluate() callable", "examples": None}
        if not hasattr(evaluate, "__iter__"):
            raise ConfigError(f"evaluate= must be a validation DataLoader (or any iterable of batches) or a callable "
                              f"returning the contract's metric; got a {type(evaluate).__name__}")
        needed = (self.contract.examples_needed(self.cfg.contract.guard_examples) if self.contract is not None
                  else self.cfg.contract.guard_examples)
        batches, n = take_examples(evaluate, needed, self.adapter)
        if not batches:
            raise ConfigError("evaluate= yielded no batch: the contract needs validation data")
        info: dict[str, Any] = {"source": f"{n} validation examples", "examples": n, "batches": len(batches),
                                "needed": needed}
        self._guard_batches = batches
        self._units = split_units(batches, self.adapter)

        def probe() -> list[dict[str, float]]:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            return evaluate_units(self.model, self._units, device, self.task, self.adapter, self.dist)

        return probe, info

    def _evaluation(self) -> Any:
        """The evaluation's raw result for the model now: per-unit sums (a loader) or what your callable returned
        (eval mode, the method's evaluating() context)."""
        if self.contract is None or self._evaluate is None:
            raise ConfigError("measuring needs a contract and an evaluation (set_evaluation)")
        was = self.model.training
        self.model.eval()
        try:
            with self.evaluating():
                return self._evaluate()
        finally:
            self.model.train(was)

    def _value(self, out: Any) -> float:
        assert self.contract is not None
        if self._guard_batches is not None:  # per-unit sums
            return metric_value(self.task.finish(add_sums(out)), self.contract, "the contract's evaluation")
        return metric_value(out, self.contract, "the contract's evaluation")

    def measure(self) -> float:
        """The contract's metric of the model now, on the guard data."""
        return self._value(self._evaluation())

    def assess(self) -> dict[str, float]:
        """The model now against the float model on the guard data: ``value``, ``drop``, its standard error
        ``se`` (over the guard data's units; 0 for an evaluate() callable) and ``bound`` = drop + margin * se,
        what the guard judges."""
        c = self.contract
        assert c is not None and self.reference is not None
        out = self._evaluation()
        if self._guard_batches is not None and self._reference_units is not None:
            value, drop, se = paired_drop(c, self.task, self._reference_units, out)
        else:
            value = self._value(out)
            drop, se = c.drop(self.reference, value), 0.0
        margin = self.cfg.contract.margin
        return {"value": value, "drop": drop, "se": se, "bound": drop + margin * se}

    def contract_report(self, **extra: Any) -> dict[str, Any]:
        """The report's ``contract`` section: the promise, the float model's and the fixed model's value on the
        guard data, the drop and whether it held (``held`` is None before the last round), and the guard data."""
        last = next((row["contract"] for row in reversed(self.history) if "contract" in row), {})
        value = last.get("value")
        out = verdict(self.contract, self.reference, value if self.done else None, se=last.get("se", 0.0),
                      margin=self.cfg.contract.margin, **extra)
        out["guard"] = dict(self.guard_info)
        if self.contract is not None:
            out["rounds_added"] = len(self.fractions) - len(self.method_impl.fractions)
            out["extra_terms"] = self.extra_terms
            if not self.done:
                out["last_value"] = value
        return out
