"""Fixing inside any training code: the :class:`Fixer` object.

In the spirit of torch.ao's prepare/convert and TF-MOT's cluster_weights/strip_clustering, one
object prepares the model (Bayesian for PWFN, the model itself for WFN), gives the method's
extra loss term, keeps fixed values bit-exact under any torch optimizer, runs the next fixing
round when asked, reports per round, saves and loads its state, and returns the plain
point-estimate model at the end::

    fixer = pwfn.Fixer(model, method="pwfn", evaluate=val_loader, steps_per_round=len(train_loader))
    for rnd in fixer.rounds():                      # fixes the next fraction of the weights
        if rnd.trains:                              # every round but the last
            my_train(fixer.model, extra_loss=fixer.loss_term)
    point = fixer.finalize()                        # plain module, every weight on the codebook

Every round is judged by the accuracy contract (:mod:`pwfn.contract`) against the float model on
the evaluation you give (``evaluate=``: a validation loader or a callable): a round that would
break it is undone and redone more cautiously, and when nothing keeps it a
:class:`~pwfn.errors.ContractError` is raised with the model left at its last state within it.

Fixed values stay exact without a wrapper to remember: a gradient hook on every quantised
tensor zeroes the fixed entries' gradients (so gradient clipping sees what the update will
use), and process-wide optimizer step hooks put the fixed entries back after every
``torch.optim.Optimizer.step`` that touches them — weight decay, momentum, Adam's moments and
your own optimizer included. ``pwfn.compress`` and the CLI run their rounds on this object.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import numbers
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import bayes

from .budget import plan_budget
from .checks import check_float_model, check_materialized
from .config import (
    RunConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    load_config,
)
from .contract import (
    AccuracyContract,
    ContractSpec,
    metric_value,
    paired_drop,
    resolve_contract,
    verdict,
)
from .distributed import tensor_checksum
from .engine import EngineCache, fix_round
from .errors import CheckpointError, ConfigError, ContractError, ModelError
from .io import load_state_dict_strict, to_jsonable
from .methods.base import Method, build_method
from .metrics import fixing_metrics, fixing_metrics_from_codebook
from .plumbing import FixedGuard, QuantSlot
from .presets import resolve_config as resolve_shipped
from .sharding import is_sharded
from .tasks import BatchAdapter, Task, add_sums, evaluate_units, resolve_task, split_units
from .train import apply_batchnorm_policy, draw_examples, rng_state, set_rng_state, take_examples

log = logging.getLogger(__name__)

STATE_FORMAT = 2

#: what ``evaluate=`` may be: a callable returning the contract's metric (or a dict holding it), or an
#: iterable of validation batches (a DataLoader) that the Fixer scores with its task
Evaluation = Union[Callable[[], Any], Any]


def resolve_config(config: Union[None, RunConfig, Mapping, str, Path], overrides: Optional[list[str]] = None) -> RunConfig:
    """A RunConfig from a RunConfig, a dict, a YAML path, a shipped config's name (``"paper_pwfn"``) or None
    (defaults), with ``--set``-style overrides."""
    if isinstance(config, RunConfig):
        cfg = copy.deepcopy(config)
        return config_from_dict(apply_overrides(config_to_dict(cfg), overrides)) if overrides else cfg
    if isinstance(config, Mapping):
        return config_from_dict(apply_overrides(copy.deepcopy(dict(config)), overrides or []))
    if config is None or isinstance(config, (str, Path)):
        if isinstance(config, str):  # a shipped config by name (e.g. the paper preset "paper_pwfn")
            config = resolve_shipped(config)
        return load_config(config, overrides)
    raise ConfigError(f"config must be a RunConfig, a dict, a YAML path or None, got {type(config).__name__}")


@dataclass
class Round:
    """One fixing round, as :meth:`Fixer.rounds` yields it."""

    index: int
    fraction: float
    #: training should follow (every round but the one that fixes the last weights)
    trains: bool
    #: the round's row of the history (fixed fraction, unique values, entropy, engine summary, ...)
    row: dict[str, Any] = field(default_factory=dict)
    #: this round redoes one whose training did not keep the contract (that try was undone: weights,
    #: masks, the optimizers' state and the RNG are as they were before it); train again as usual
    retry: bool = False


# --------------------------------------------------------------------------------------------
# one owner per model: the tensors every live Fixer holds

#: id(tensor) -> (weak reference to the tensor, weak reference to the Fixer holding it)
_HELD: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _holder(t: torch.Tensor) -> Optional[Fixer]:
    """The live (not closed) Fixer holding ``t``, or None."""
    entry = _HELD.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    fixer = entry[1]()
    return fixer if fixer is not None and not fixer._closed else None


def _refuse_held(model: nn.Module) -> None:
    """A model (or any of its tensors) a live Fixer holds cannot be taken by another (``inplace=True``)."""
    for name, p in model.named_parameters():
        other = _holder(p)
        if other is not None:
            raise ModelError(
                f"the model's tensor {name!r} is held by a live pwfn.Fixer ({other.method}, {other.round} of "
                f"{len(other.fractions)} rounds done): a second Fixer taking it (inplace=True) would move the weights "
                "the first one fixed. Finish or close the first Fixer (fixer.finalize() or fixer.close()) before "
                "giving the model to another, or let the second Fixer work on its own copy (inplace=False)")


def _within(bound: float, allowed: float) -> bool:
    """A drop (or its bound) within an allowance, with float rounding's slack; NaN never is."""
    return math.isfinite(bound) and bound <= allowed * (1 + 1e-9) + 1e-12


def _mask_grad(view_ref, slot: QuantSlot):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        view = view_ref()
        if view is None:
            return grad
        mask = view._mask(slot)
        if is_sharded(grad):  # a DTensor gradient (FSDP2 sets its sharded grads outside autograd)
            local = grad.to_local()
            if mask.shape != local.shape:
                return grad
            return type(grad).from_local(local.masked_fill(mask, 0), grad.device_mesh, grad.placements,
                                         shape=grad.shape, stride=grad.stride(), run_check=False)
        return grad.masked_fill(mask, 0) if mask.shape == grad.shape else grad

    return hook


class Fixer:
    """Round-by-round fixing of one model with one method, driven by any training loop.

    ``model``: your trained ``nn.Module`` (copied unless ``inplace=True``, e.g. when a
    LightningModule holds it). ``method``: a registered method's name (``"pwfn"``, ``"wfn"``,
    ``"wfn_published"``, see :mod:`pwfn.methods`) or a :class:`~pwfn.methods.base.Method` subclass. ``config``: a RunConfig, a
    dict (``{"pwfn": {"k": 2}}``), a YAML path, a shipped config's name or None for the defaults;
    the method's section, ``quantise``, ``batchnorm``, ``budget``, ``task`` and ``contract`` matter
    here. ``dataset_size``: the training-set size (needed by ``pwfn.objective=elbo``).

    The accuracy contract: ``contract`` (an :class:`~pwfn.contract.AccuracyContract`, a dict such
    as ``{"max_drop": 1.0}``, ``None`` for the config's ``contract`` section, ``False`` for none)
    is judged on ``evaluate``: a validation DataLoader (or any iterable of batches), scored with
    ``task`` (a name, a :class:`pwfn.Task`; default the config's ``task``) through ``adapter``, or a
    callable returning the contract's metric (a number, or a dict holding it) for ``fixer.model`` —
    called inside ``fixer.evaluating()``. ``top_up``: your training loader, to add training examples
    from when the validation loader holds fewer than the contract needs (:meth:`top_up_guard`). The
    float model's value is measured as soon as the evaluation is known (here, before any training).
    A Fixer with a contract and no evaluation refuses to fix.

    ``steps_per_round``: the optimizer steps your loop takes between two rounds; PWFN's
    budget-aware regulariser scales ``lam`` by it (``pwfn.sigma_steps_reference``). Without it the
    Fixer counts your optimizer's steps and uses the last phase's count for the next one.
    """

    def __init__(self, model: nn.Module, method: Union[str, type] = "pwfn", config: Any = None, *,
                 device: Optional[Union[str, torch.device]] = None, inplace: bool = False,
                 dataset_size: Optional[int] = None, overrides: Optional[list[str]] = None,
                 steps_per_round: Optional[int] = None, contract: ContractSpec = None,
                 evaluate: Optional[Evaluation] = None, task: Optional[Union[str, Task]] = None,
                 adapter: Optional[BatchAdapter] = None, top_up: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._closed = True  # until the hooks are in place (close() and __del__ of a refused Fixer do nothing)
        # a Fixer sees no data: lazy modules must have run a forward pass (pwfn.compress runs the first batch)
        check_materialized(model, lazy_ok=False)
        if inplace:
            _refuse_held(model)
        self.cfg = resolve_config(config, overrides)
        #: the method object (:mod:`pwfn.methods`); the Fixer talks to it only through its protocol
        self.method_impl: Method = build_method(method, self.cfg)
        self.method: str = self.method_impl.name
        #: the task whose metrics judge the rounds (and whose loss a callback trains with)
        self.task: Task = resolve_task(task if task is not None else self.cfg.task)
        self.adapter = adapter or BatchAdapter()
        #: the accuracy contract (None: turned off)
        self.contract: Optional[AccuracyContract] = resolve_contract(self.task, contract, self.cfg.contract)
        if dataset_size is not None:
            self.method_impl.bind_data(dataset_size)
        check_float_model(model)
        prepared = self.method_impl.prepare(model, inplace=inplace)
        self.model: nn.Module = prepared.to(device) if device is not None else prepared
        # the tensors of the model this Fixer copied: an optimizer holding them (and none of fixer.model's)
        # trains the original, not the model being fixed, and is refused at its first step
        self._source: dict[int, weakref.ref] = {} if inplace else {id(p): weakref.ref(p) for p in model.parameters()}
        self.view = self.method_impl.view(self.model)
        self.coverage = self.method_impl.coverage
        self.engine_config = self.method_impl.engine_config()
        # budget mode: the allowed values are chosen from the prepared float model alone, so a
        # resumed run (a new Fixer whose state is then loaded) chooses the same
        self.budget = plan_budget(getattr(self.cfg, "budget", None), self.engine_config, self.view,
                                  lambda: self.method_impl.tolerance(self.view, 0))
        if self.budget is not None:
            self.engine_config = self.budget.engine_config
            if self.view.shards is not None:
                raise ConfigError("budget mode is not available for a sharded (FSDP2) model yet: its allowed values "
                                  "are chosen from the whole vector; turn budget off")
        if self.view.shards is not None and self.contract is not None:
            raise ConfigError("the accuracy contract cannot judge a sharded (FSDP2) model yet (undoing a round would "
                              "need every rank's snapshot of its shards): pass contract=False, and judge the fixed "
                              "model yourself; the report then says the contract was not checked")
        #: the share of the weights fixed after each round; a round the contract splits adds one
        self.fractions: list[float] = list(self.method_impl.fractions)
        #: for each round, the method's schedule round it belongs to (a split round repeats its index)
        self.schedule_index: list[int] = list(range(len(self.fractions)))
        self.method_impl.check_trainable(self.model)
        self.round = 0
        self._engine_cache = EngineCache()  # the candidate centres, built once for all rounds
        #: the contract's caution level reached so far (0: the method as configured)
        self.caution = 0
        #: power-of-two terms added to the codebook by the contract's last resort (0: as configured)
        self.extra_terms = 0
        self.history: list[dict[str, Any]] = []
        self._extra = None
        self._closed = False
        self._active: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved: dict[int, FixedGuard] = {}  # per optimizer, between its step's pre and post hooks
        # per optimizer: (weak ref, param-group sizes, _active version, the (tensor, mask) pairs it steps,
        # whether it steps this model at all)
        self._optimizers: dict[int, tuple[weakref.ref, tuple[int, ...], int, list, bool]] = {}
        self._version = 0
        self._held = [p for p in self.model.parameters()]
        me_ref = weakref.ref(self)
        for p in self._held:
            _HELD[id(p)] = (weakref.ref(p), me_ref)
        # optimizer steps on this model: counted, so a loop that never says its steps per round is learned
        self._param_ids = {id(p) for p in self._held}
        self.steps_taken = 0
        self._steps_at_round = 0
        self._steps_given = False
        self._steps_warned = False
        self._phase_steps: Optional[int] = None  # what the method was last told (set_training_steps)
        # the contract's evaluation and the float model's value on it
        self._evaluate: Optional[Callable[[], Any]] = None
        self._stepped: weakref.WeakSet = weakref.WeakSet()  # optimizers that stepped the model (a round undone)
        self._pending: Optional[dict[str, Any]] = None  # the last round, awaiting its verdict after training
        self._redo: Optional[dict[str, Any]] = None  # the round to redo, and where its tries go on
        self._settled: Optional[float] = None  # the metric measured by the last settle() that kept a round
        self._previous: Optional[dict[str, Any]] = None  # the last kept round's snapshot, for one backtrack
        self._backtracked: set[int] = set()  # planned rounds already redone by a backtrack
        #: how much of a round's immediate cost the training after it is expected to recover (learned per round)
        self._recovery = float(self.cfg.contract.recovery_factor)
        self._guard_batches: Optional[list] = None  # the guard's batches, when evaluate= was a loader
        self._units: list = []  # those batches cut into the units the drop's spread is estimated over
        self._reference_units: Optional[list] = None  # the float model's sums on each unit
        #: the process group the guard's evaluations reduce over (the built-in loop sets it under torchrun)
        self.dist: Any = None
        #: the float model's value of the contract's metric on the guard data (None until measured)
        self.reference: Optional[float] = None
        #: what the guard data is: examples, where from (the report's ``contract`` section)
        self.guard_info: dict[str, Any] = {}
        self._install_hooks()
        if steps_per_round is not None:  # PWFN's budget-aware regulariser (pwfn.sigma_steps_reference)
            self.set_training_steps(steps_per_round)
        if evaluate is not None:
            self.set_evaluation(evaluate, top_up=top_up)

    # -- fixed values stay fixed --------------------------------------------------------------
    def _install_hooks(self) -> None:
        view_ref = weakref.ref(self.view)
        self._grad_handles = []
        for slot in self.view.slots:
            for t in (slot.value, slot.sigma):
                if t is not None and t.requires_grad:
                    self._grad_handles.append(t.register_hook(_mask_grad(view_ref, slot)))
        me = weakref.ref(self)

        def pre(optimizer, args, kwargs):
            fixer = me()
            if fixer is not None and not fixer._closed:
                fixer._before_step(optimizer)

        def post(optimizer, args, kwargs):
            fixer = me()
            if fixer is not None and not fixer._closed:
                fixer._after_step(optimizer)

        self._opt_handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._refresh_active()

    def _refresh_active(self) -> None:
        """The (tensor, mask) pairs with fixed entries (mu and sigma); recomputed after every round."""
        self._active = [(p, m) for p, m in self.view.parameters_with_masks() if bool(m.any())]
        self._version += 1

    def _pairs_of(self, optimizer: torch.optim.Optimizer) -> tuple[list, bool]:
        """The fixed (tensor, mask) pairs ``optimizer`` steps, and whether it steps this model at all; worked
        out once per optimizer (again when its parameter groups or the fixed entries change), so the step hook
        costs a lookup."""
        key = id(optimizer)
        sizes = tuple(len(group["params"]) for group in optimizer.param_groups)
        entry = self._optimizers.get(key)
        if entry is not None and entry[0]() is optimizer and entry[1] == sizes and entry[2] == self._version:
            return entry[3], entry[4]
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if entry is None or entry[0]() is not optimizer or entry[1] != sizes:  # a new optimizer, or new groups
            self._check_optimizer(optimizer, ids)
        pairs = [(p, m) for p, m in self._active if id(p) in ids]
        holds = not self._param_ids.isdisjoint(ids)
        if len(self._optimizers) > 64:  # forget optimizers that are gone
            self._optimizers = {k: v for k, v in self._optimizers.items() if v[0]() is not None}
        self._optimizers[key] = (weakref.ref(optimizer), sizes, self._version, pairs, holds)
        return pairs, holds

    def _check_optimizer(self, optimizer: torch.optim.Optimizer, ids: set[int]) -> None:
        """Refuse an optimizer that steps the model this Fixer copied instead of ``fixer.model``."""
        stale = sum(1 for i in ids if i in self._source and self._source[i]() is not None)
        if not stale:
            return  # another model's optimizer (or this Fixer's own): not ours to judge
        mine = sum(1 for p in self.model.parameters() if id(p) in ids)
        raise ConfigError(
            f"{type(optimizer).__name__} steps {stale} tensor(s) of the model this {self.method} Fixer copied"
            + (f" (and {mine} of fixer.model's)" if mine else ", and none of fixer.model's")
            + ": its updates would train the original, not the model being fixed, and the fixing would see no "
            "training. Build the optimizer on the Fixer's model after creating the Fixer "
            "(torch.optim.SGD(fixer.model.parameters(), ...)), or create the Fixer with inplace=True to fix your "
            "model itself")

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        pairs, holds = self._pairs_of(optimizer)
        if holds:
            self.steps_taken += 1  # the loop's steps per round, learned (set_training_steps)
            self._stepped.add(optimizer)
            if self._phase_steps is None and not self._steps_warned and self.method_impl.wants_training_steps():
                self._warn_unknown_steps()
        if pairs:
            guard = FixedGuard(pairs)
            guard.before_step()
            self._saved[id(optimizer)] = guard

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        guard = self._saved.pop(id(optimizer), None)
        if guard is not None:
            guard.after_step()

    def close(self) -> None:
        """Remove the hooks (``finalize`` does it too); the model stays as it is."""
        if self._closed:
            return
        for h in self._grad_handles + self._opt_handles:
            h.remove()
        self._grad_handles, self._opt_handles = [], []
        self._closed = True
        for p in self._held:  # the model can be taken by another Fixer now
            entry = _HELD.get(id(p))
            if entry is not None and entry[1]() in (self, None):
                del _HELD[id(p)]
        self._held, self._optimizers = [], {}

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()

    # -- the method's loss term ---------------------------------------------------------------
    def loss_term(self, task_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The method's extra loss for the current step; add it to your task loss before ``backward``.

        PWFN: the sigma regulariser (or the KL of ``objective=elbo``), call it after the forward
        pass. WFN: the attraction of free weights towards the used centres, scaled to
        ``reg_ratio`` x ``task_loss`` (so pass the task loss); zero before the first round.
        """
        if self._extra is None:
            term = self.method_impl.extra_loss(self.view)
            if term is not None and self.view.shards is not None:
                raise ConfigError(f"{self.method}'s loss term is not available for a sharded (FSDP2) model yet "
                                  "(sharded fixing covers the rounds, the fixed-entry guard and checkpoints); "
                                  "for WFN set wfn.reg_ratio=0")
            self._extra = term or (lambda model, ce: None)
        if self.method_impl.needs_task_loss and task_loss is None and self.round > 0:
            raise ConfigError(f"{self.method}'s loss term is scaled to the task loss: call fixer.loss_term(task_loss)")
        base = task_loss if task_loss is not None else torch.zeros((), device=self.view.slots[0].value.device)
        term = self._extra(self.model, base.detach() if isinstance(base, torch.Tensor) else base)
        if term is None:
            return torch.zeros((), device=self.view.slots[0].value.device)
        return term

    def set_training_steps(self, steps: Optional[int]) -> None:
        """Tell the Fixer how many optimizer steps the training phase about to start takes.

        PWFN's budget-aware regulariser (``pwfn.sigma_steps_reference``) scales ``lam`` by it, so
        sigma moves as far in a short phase as in a long one; the built-in loop calls this before
        the warm-up and before every round's training. ``None``: unknown (``lam`` as given).
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, float))
                                  or not math.isfinite(steps) or int(steps) < 1):
            raise ConfigError(f"training steps must be an integer >= 1 (or None), got {steps!r}")
        self._phase_steps = None if steps is None else int(steps)
        self.method_impl.set_training_steps(self._phase_steps)
        self._steps_given = steps is not None
        self._extra = None

    def optimizer(self, previous: Optional[torch.optim.Optimizer] = None) -> torch.optim.Optimizer:
        """The optimizer ``pwfn.compress`` trains with between rounds (PWFN: SGD over mu and sigma, kept across
        rounds, so ``previous`` comes back; WFN: a fresh Adam every round). Any optimizer works (fixed values
        stay exact); this one gives the same results as ``compress``."""
        return self.method_impl.optimizer(self.model, self.view, previous)

    @property
    def grad_clip(self) -> Optional[float]:
        """The gradient-norm clip ``pwfn.compress`` applies to :meth:`clip_parameters` (None: no clipping)."""
        return self.method_impl.grad_clip()

    def clip_parameters(self) -> Optional[list]:
        """The tensors gradient clipping should see (None: all of the model's); PWFN leaves sigma out
        unless ``pwfn.clip_sigma``. Pass them to ``torch.nn.utils.clip_grad_norm_``."""
        return self.method_impl.clip_parameters(self.model)

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss + loss_term(task_loss)``."""
        return task_loss + self.loss_term(task_loss)

    # -- rounds ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.round >= len(self.fractions)

    @property
    def warmup_epochs(self) -> float:
        """Training the method wants before the first round (PWFN: sigma settles; 0 for WFN)."""
        return float(self.method_impl.pre_epochs())

    @property
    def round_epochs(self) -> float:
        """Training the method wants between two rounds (the built-in loop's budget)."""
        return float(self.method_impl.round_epochs())

    # -- the accuracy contract -------------------------------------------------------------------
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

    def _learn_steps(self) -> int:
        """The optimizer steps since the last round; tells the method the next phase's steps when the loop
        never said them (the last training phase's count; the one before round 1 is a warm-up)."""
        counted = self.steps_taken - self._steps_at_round
        self._steps_at_round = self.steps_taken
        if self._steps_given or not self.method_impl.wants_training_steps():
            return counted
        if self.round > 0 and counted > 0:
            self._phase_steps = counted
            self.method_impl.set_training_steps(counted)
            self._extra = None
        return counted

    def _warn_unknown_steps(self) -> None:
        """At an optimizer step of a phase whose length the method needs and nobody said (once)."""
        self._steps_warned = True
        log.warning("%s: the training between rounds is scaled to its number of optimizer steps "
                    "(pwfn.sigma_steps_reference), which this Fixer does not know yet: pass "
                    "Fixer(..., steps_per_round=len(train_loader) * epochs) or call set_training_steps(). Until it "
                    "has counted one round's steps it uses the regulariser as configured", self.method)

    # -- rounds ---------------------------------------------------------------------------------
    def fix_next(self, broadcast=None, evaluate: Optional[Evaluation] = None) -> Round:
        """Fix the next fraction of the weights (one engine round, judged by the contract); returns the round.

        ``broadcast`` (optional) is applied to each result tensor before it is written (the built-in loop
        passes DDP's broadcast so every rank writes rank 0's result). ``evaluate``: the contract's
        evaluation, when the Fixer was created without one (see :meth:`set_evaluation`).

        With a contract (docs/algorithm.md, "The accuracy contract"), the training since the last round is
        judged first (:meth:`settle`): when it did not bring the model back within the contract, that round is
        undone and redone more cautiously (the returned round has ``retry=True``; train again). A round's
        fixing is measured right after each try: a round that ends the schedule (or that no training
        follows) must keep the contract itself; one that training follows may cost up to
        ``contract.recovery_factor`` times the contract's allowance, and is judged against the contract
        after that training. A try beyond is undone and redone more cautiously: the method's caution levels
        (PWFN: k halved down to ``pwfn.k_min``; WFN: delta halved), then fewer new weights (the round's
        increment halved, up to ``contract.max_splits`` times; the rest follows in an extra round), then a
        finer codebook (up to ``contract.extra_terms`` more power-of-two terms). When nothing keeps the
        contract, :class:`~pwfn.errors.ContractError` is raised with the model at its last state within it.
        """
        if self.done:
            raise ConfigError(f"{self.method}: all {len(self.fractions)} rounds are done; call finalize()")
        if self._closed:
            raise ConfigError("this Fixer was finalized or closed")
        if evaluate is not None and self._evaluate is None:
            self.set_evaluation(evaluate)
        if self.contract is not None and self._evaluate is None:
            raise ConfigError(
                f"{self.method}: the accuracy contract ({self.contract.text()}) judges every round, and this Fixer "
                "has no evaluation: pass evaluate= (a validation DataLoader, or a callable returning "
                f"{self.contract.metric}) when you create the Fixer, so the float model is measured before any "
                "training; or turn the contract off with contract=False (nothing then checks the accuracy)")
        before = self._settled
        if self._pending is not None:
            self.settle()
            before = self._settled
        self._settled = None
        t = self.round
        redo = self._redo
        self._redo = None
        steps = self._learn_steps() if redo is None else 0
        record: Optional[dict[str, Any]] = None
        if self.contract is None:
            summary, _ = self._fix_once(t, self.fractions[t], broadcast)
        else:
            try:
                summary, record = self._contracted_round(t, broadcast, before, redo)
            except ContractError:
                if not self._backtrack({"fraction": self.fractions[t], "exhausted": "before training"}):
                    raise
                t, redo = self.round, self._redo  # the round before is redone, more cautiously
                self._redo = None
                summary, record = self._contracted_round(t, broadcast, redo["before"], redo)
        frac = self.fractions[t]  # a split round fixes less than planned
        view = self.view
        self.round += 1
        self._extra = None  # WFN's attraction centres changed
        self._refresh_active()
        row: dict[str, Any] = {"round": t, "fraction": frac,
                               "checksum": tensor_checksum(view.values(), view.fixed())}
        row.update(self._metrics())
        row["engine"] = to_jsonable(summary)
        row["steps_before"] = steps
        if record is not None:
            row["contract"] = record
        self.history.append(row)
        return Round(index=t, fraction=frac, trains=frac < 1.0 and not self.done, row=row, retry=redo is not None)

    def settle(self) -> bool:
        """Judge the training since the last round against the contract (``fix_next`` does it first; the
        built-in loop calls it right after training, before its checkpoint).

        Returns True when there is nothing to judge or the model is within the contract (the last round is
        then final). Otherwise that round is undone - the model's weights, masks and buffers, the state of
        every optimizer that stepped it, the budget and the RNG restored to just before it - and False is
        returned: the next :meth:`fix_next` redoes it more cautiously. Raises ContractError (with the model
        restored) when no more cautious setting is left.
        """
        pending = self._pending
        if pending is None or self.contract is None:
            return True
        self._pending = None
        c, ref = self.contract, self.reference
        now = self.assess()
        value, drop = now["value"], now["drop"]
        row = self.history[-1]
        row["contract"].update(after_training=value, drop_after_training=drop, se_after_training=now["se"])
        # paced: with a share f of the weights fixed, at most max(early_share, f) of the allowance may be spent,
        # so the last rounds (which no training follows) keep some; early rounds would otherwise spend it all
        allowed = c.max_drop * min(1.0, max(self.cfg.contract.early_share, self._fixed_count() / self.view.numel))
        row["contract"]["allowed_after_training"] = allowed
        # what training between rounds recovers here: the immediate check of the next rounds expects as much
        immediate = row["contract"]["bound"]
        if math.isfinite(immediate) and math.isfinite(now["bound"]):
            self._recovery = min(max(immediate / max(now["bound"], 1e-12 * max(c.max_drop, 1e-12)), 1.0),
                                 self.cfg.contract.recovery_factor)
        if _within(now["bound"], allowed):
            self._settled = value
            self.caution = pending["level"]
            # kept for one backtrack: when the next round cannot keep the contract at all, this one is redone
            self._previous = {key: pending[key] for key in ("snapshot", "ladder", "position", "undone", "before",
                                                            "setting", "target", "extra")}
            if pending["extra"]:
                log.warning("%s round %d: the contract was kept only with %d more power-of-two terms per value: the "
                            "codebook is finer from here on (max_order %d)", self.method, self.round, pending["extra"],
                            self.engine_config.max_order)
            return True
        self._restore(pending["snapshot"])
        self.history.pop()
        self.round -= 1
        failed = {"setting": pending["setting"], "fraction": pending["target"], "extra_terms": pending["extra"],
                  "after_fix": row["contract"]["value"], "after_training": value}
        nxt = pending["position"] + 1
        if nxt >= len(pending["ladder"]):
            self.method_impl.set_caution(self.caution)
            if self._backtrack(failed):  # the round before spent what this one needed: it is redone first
                return False
            raise ContractError(
                f"{self.method} round {self.round + 1}: even after training, fixing "
                f"{100 * pending['target']:.4g} % of the weights ({pending['setting']}) leaves {c.metric} at "
                f"{value:.6g} against the float model's {ref:.6g} on the guard data: a drop of {drop:.4g} (+- "
                f"{now['se']:.2g}), beyond the {allowed:.4g} the contract ({c.text()}) allows this far into the "
                f"schedule (contract.early_share, contract.margin), and no more cautious setting is left. The model is left as it was before this "
                f"round ({100 * self._fixed_count() / self.view.numel:.4g} % fixed, within the contract). To go on: "
                f"{self.method_impl.contract_tip()}, or allow a larger drop (contract.max_drop, now "
                f"{c.max_drop:g} {c.drop_type})")
        self._redo = {"ladder": pending["ladder"], "position": nxt, "undone": pending["undone"] + [failed],
                      "before": pending["before"]}
        log.info("%s round %d: after training %s is %.6g against the float model's %.6g (contract: %s): the round "
                 "is undone and redone more cautiously", self.method, self.round + 1, c.metric, value, ref, c.text())
        return False

    def _backtrack(self, failed: dict[str, Any]) -> bool:
        """When a round cannot keep the contract at any setting, undo the round before it too (its fixing and
        the training after it) and have it redone at its next, more cautious setting: it may have spent what
        this round needed. Once per planned round; False when there is none to go back to (or it has no setting
        left)."""
        prev = self._previous
        self._previous = None
        if prev is None or self.round < 1 or prev["position"] + 1 >= len(prev["ladder"]):
            return False
        origin = self.schedule_index[self.round - 1]
        if origin in self._backtracked:  # once per planned round: no going back and forth
            return False
        self._backtracked.add(origin)
        log.info("%s round %d cannot keep the contract at any setting: round %d is undone too and redone more "
                 "cautiously", self.method, self.round + 1, self.round)
        self._pending = None
        self._restore(prev["snapshot"])
        self.history.pop()
        self.round -= 1
        undone = {"setting": prev["setting"], "fraction": prev["target"], "extra_terms": prev["extra"],
                  "backtracked_for_next_round": failed}
        self._redo = {"ladder": prev["ladder"], "position": prev["position"] + 1,
                      "undone": prev["undone"] + [undone], "before": prev["before"]}
        return True

    def _fixed_count(self) -> int:
        return int(self.view.fixed().sum())

    def _max_caution(self) -> int:
        """The highest caution level the method accepts (its current level is left as it was)."""
        now, level = getattr(self.method_impl, "caution", 0), 0
        while level < 16 and self.method_impl.set_caution(level + 1):
            level += 1
        self.method_impl.set_caution(now)
        return level

    def _ladder(self, t: int) -> list[tuple[int, float, int]]:
        """Round ``t``'s tries in order, as (caution level, fraction to fix, extra power-of-two terms)."""
        cc, n = self.cfg.contract, self.view.numel
        fixed_now = self._fixed_count()
        prev, frac = fixed_now / n, self.fractions[t]
        origin = self.schedule_index[t]
        # each round may halve what is left of its increment up to max_splits times; one planned round grows
        # into at most 2 * max_splits extra rounds
        added = sum(1 for i in self.schedule_index if i == origin) - 1
        splits = cc.max_splits if added < 2 * cc.max_splits else 0
        targets = [frac] + [prev + (frac - prev) / 2.0**s for s in range(1, splits + 1)]
        targets = [x for i, x in enumerate(targets) if i == 0 or math.ceil(x * n - 1e-9) > fixed_now]
        top = self._max_caution()
        first = min(max(self.caution - 1, 0), top)
        # the first half of the method's caution levels (PWFN: k down to 0.5) at every size of the round, then
        # the deeper ones at the smallest size: fewer new weights keep the codebook smaller than a tiny tolerance
        half = math.ceil((top + 1) / 2)
        if first < half:
            ladder = [(level, x, 0) for x in targets for level in range(first, half)]
            ladder += [(level, targets[-1], 0) for level in range(half, top + 1)]
        else:
            ladder = [(level, x, 0) for x in targets for level in range(first, top + 1)]
        base = self.engine_config.max_order
        if self.budget is None:  # the last resort: a finer codebook, never a lossy one
            ladder += [(top, targets[-1], e) for e in range(1, cc.extra_terms + 1) if base + e <= 32]
        return ladder

    def _contracted_round(self, t: int, broadcast, before: Optional[float],
                          redo: Optional[dict]) -> tuple[dict, dict[str, Any]]:
        """Round ``t`` under the contract: the first try of its ladder (from ``redo``'s position when a try was
        undone after training) that the immediate check keeps; ContractError (model restored) when none does."""
        c, view = self.contract, self.view
        assert c is not None and self.reference is not None
        ref = self.reference
        info = self.guard_info
        if t == 0 and redo is None and info.get("examples") is not None and info["examples"] < info.get("needed", 0):
            log.warning("%s: the contract's guard scores only %d examples; telling %s from noise needs %d, so small "
                        "losses can pass unseen. Give it more validation data, or training examples to add "
                        "(fixer.top_up_guard(train_loader); pwfn.compress and the callbacks do it unless "
                        "contract.guard_from_train=false)", self.method, info["examples"], c.text(), info["needed"])
        if redo is not None:
            ladder, position, undone, before = redo["ladder"], redo["position"], redo["undone"], redo["before"]
        else:
            ladder, position, undone = self._ladder(t), 0, []
            if before is None:
                before = self.measure()
            if not c.holds(ref, before):  # the measured drop itself: no margin for a state already kept
                raise ContractError(
                    f"{self.method}: before round {t + 1} fixes anything, {c.metric} on the guard data is {before:.6g} "
                    f"against the float model's {ref:.6g}: the training since "
                    f"{'the last round' if t else 'the start'} already breaks the contract ({c.text()}). The model is "
                    "left as it is. Train more gently (a lower learning rate) or allow a larger drop "
                    "(contract.max_drop)")
        saved = (view.values(), view.fixed(), view.sigmas() if view.has_sigma else None)
        frac, origin, n = self.fractions[t], self.schedule_index[t], view.numel
        extra_before = self.extra_terms
        base_engine = self.engine_config
        tries: list[dict[str, Any]] = []
        kept = None
        start = position
        level, target, extra = ladder[start]
        snapshot = None
        for at in range(start, len(ladder)):
            position = at
            level, target, extra = ladder[at]
            follows = target < 1.0  # training follows a round that leaves weights free
            if follows and snapshot is None:
                snapshot = self._snapshot()
            self.method_impl.set_caution(level)
            self.engine_config = (dataclasses.replace(base_engine, max_order=base_engine.max_order + extra)
                                  if extra else base_engine)
            summary, merged = self._fix_once(t, target, broadcast)
            now = self.assess()
            allowed = c.max_drop * (self._recovery if follows else 1.0)
            tries.append({"caution": level, "setting": self.method_impl.caution_text(), "fraction": target,
                          "extra_terms": extra, "value": now["value"], "drop": now["drop"], "se": now["se"],
                          "bound": now["bound"]})
            if _within(now["bound"], allowed):
                kept = summary
                break
            view.write(*saved)  # undo the try: nothing trained since it
            if self.budget is not None:
                self.budget.merged_weights -= merged
                self.budget.merges_per_round.pop()
        if kept is None:
            self.engine_config = base_engine
            most = self.method_impl.caution_text()
            self.method_impl.set_caution(self.caution)
            best = min(tries, key=lambda r: r["drop"] if math.isfinite(r["drop"]) else math.inf)
            raise ContractError(
                f"{self.method} round {t + 1}: fixing {100 * frac:.4g} % of the weights breaks the accuracy contract "
                f"({c.text()}): at best {c.metric} = {best['value']:.6g} ({best['setting']}, "
                f"{100 * best['fraction']:.4g} % fixed, {best['extra_terms']} more terms) against the float model's "
                f"{ref:.6g} on the guard data, after {len(tries) + len(undone)} tries (down to "
                f"{most}, {len({x for _, x, _ in ladder}) - 1} smaller steps, "
                f"{max((e for _, _, e in ladder), default=0)} more power-of-two terms). The model is left as it was "
                f"before this round ({100 * self._fixed_count() / n:.4g} % fixed, within the contract). To go on: "
                f"{self.method_impl.contract_tip()}, or allow a larger drop (contract.max_drop, now "
                f"{c.max_drop:g} {c.drop_type})")
        if extra:
            self.extra_terms = extra_before + extra
            log.info("%s round %d: fixing with %d more power-of-two terms per value (max_order %d)%s", self.method,
                     t + 1, extra, self.engine_config.max_order,
                     ", kept if the training after it keeps the contract" if target < 1.0 else "")
        if target != frac:  # the rest of this round's weights follow in an extra round, after training
            self.fractions.insert(t, target)
            self.schedule_index.insert(t, origin)
            log.info("%s round %d: the contract kept fixing only %.4g %% instead of %.4g %% (%s); the rest follows "
                     "in an extra round", self.method, t + 1, 100 * target, 100 * frac,
                     self.method_impl.caution_text())
        if snapshot is not None and target < 1.0:  # judged again after the training that follows
            if target != frac:  # a split: the redo ladder continues within this (now smaller) round
                ladder = [(lv, x, e) for lv, x, e in ladder if x <= target]
                position = ladder.index((level, target, extra))
            self._pending = {"snapshot": snapshot, "ladder": ladder, "position": position, "level": level,
                             "target": target, "extra": extra, "setting": self.method_impl.caution_text(),
                             "undone": undone, "before": before}
        else:
            self.caution = level
            if extra:
                log.warning("%s round %d: the contract was kept only with %d more power-of-two terms per value: the "
                            "codebook is finer from here on (max_order %d)", self.method, t + 1, extra,
                            self.engine_config.max_order)
        value = tries[-1]["value"]
        record = {"reference": ref, "before": before, "value": value, "drop": c.drop(ref, value),
                  "se": tries[-1]["se"], "bound": tries[-1]["bound"],
                  "caution": level, "setting": self.method_impl.caution_text(), "split": target != frac,
                  "extra_terms": extra, "tries": tries}
        if undone:
            record["undone_after_training"] = undone
        return kept, record

    # -- snapshots: a round undone after its training -------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """What a round undone after its training restores: the model's state (weights, sigmas, buffers),
        the masks, every optimizer that stepped the model, the budget, the caution and the RNG."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "masks": self.view.mask_state(),
                "optimizers": [{"optimizer": opt, "state": copy.deepcopy(opt.state_dict())}
                               for opt in list(self._stepped)],
                "budget": None if self.budget is None else (self.budget.merged_weights,
                                                           list(self.budget.merges_per_round)),
                "fractions": (list(self.fractions), list(self.schedule_index)),
                "max_order": self.engine_config.max_order, "extra_terms": self.extra_terms,
                "rng": rng_state(), "steps": (self.steps_taken, self._steps_at_round)}

    @torch.no_grad()
    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.view.load_mask_state(snap["masks"], "snapshot")
        known, unbound = set(), []
        for entry in snap["optimizers"]:
            if entry["optimizer"] is None:  # a snapshot that went through a checkpoint: its optimizers are new
                unbound.append(entry["state"])
                continue
            entry["optimizer"].load_state_dict(entry["state"])
            known.add(id(entry["optimizer"]))
        others = [opt for opt in list(self._stepped) if id(opt) not in known]
        if len(unbound) == 1 and len(others) == 1:  # the run's one optimizer, recreated on resume
            try:
                others[0].load_state_dict(unbound[0])
                others = []
            except (ValueError, KeyError):
                pass
        for opt in others:  # first stepped after the snapshot: back to no state at all
            opt.state.clear()
        if self.budget is not None and snap["budget"] is not None:
            self.budget.merged_weights, merges = snap["budget"]
            self.budget.merges_per_round = list(merges)
        self.fractions, self.schedule_index = (list(x) for x in snap["fractions"])
        self.engine_config = dataclasses.replace(self.engine_config, max_order=int(snap["max_order"]))
        self.extra_terms = int(snap["extra_terms"])
        set_rng_state(snap["rng"])
        self._refresh_active()
        self._extra = None

    def _fix_once(self, t: int, frac: float, broadcast) -> tuple[dict, int]:
        """One try of round ``t``: the method's fixing written into the view (and merged to the budget);
        returns the engine summary and the weights the budget merged."""
        new_values, new_fixed, new_sigma, summary = self.method_impl.fix(self.view, self.schedule_index[t], frac,
                                                                      self.engine_config,
                                                                      engine=functools.partial(
                                                                          fix_round, cache=self._engine_cache,
                                                                          shards=self.view.shards))
        if broadcast is not None:
            for tensor in (new_values, new_fixed) + ((new_sigma,) if new_sigma is not None else ()):
                broadcast(tensor)
        self.view.write(new_values, new_fixed, new_sigma)
        merged = self.budget.enforce(self.view) if self.budget is not None else 0  # budget mode: merge down
        return summary, merged

    def rounds(self, evaluate: Optional[Evaluation] = None) -> Iterator[Round]:
        """Yield each remaining round right after fixing it; train between the yields. ``evaluate``: the
        contract's evaluation, when the Fixer was created without one."""
        while not self.done:
            yield self.fix_next(evaluate=evaluate)

    def record(self, **metrics: Any) -> None:
        """Attach your evaluation (e.g. ``after_train={"top1": ...}``) to the last round's report."""
        if not self.history:
            raise ConfigError("no round has run yet")
        self.history[-1].update(metrics)

    # -- modes ----------------------------------------------------------------------------------
    def train(self) -> nn.Module:
        """``model.train()``, with BatchNorm statistics frozen (eval mode) when ``batchnorm=frozen``."""
        self.model.train()
        apply_batchnorm_policy(self.model, self.cfg.batchnorm)
        return self.model

    def evaluating(self):
        """Context for evaluations: PWFN's mean (point-estimate) mode, eval mode for both methods."""
        return self.method_impl.eval_context(self.model)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: model weights (and sigmas), fixed masks, rounds done (and the rounds the
        contract added), history, config, the contract's float reference and caution.

        A sharded (FSDP2) model's state is for ``torch.distributed.checkpoint``: weights and masks are
        DTensors, and the history (which grows with the rounds) is one JSON string, so the state a
        fresh Fixer gives has the same keys to load into."""
        history: Any = copy.deepcopy(self.history)
        if self.view.shards is not None:
            history = json.dumps(to_jsonable(history))
        return {"format": STATE_FORMAT, "method": self.method, "round": self.round,
                "model": self.model.state_dict(), "masks": self.view.mask_state(),
                "history": history, "config": config_to_dict(self.cfg),
                "fractions": list(self.fractions), "schedule_index": list(self.schedule_index),
                "caution": self.caution, "extra_terms": self.extra_terms, "reference": self.reference,
                "reference_units": self._reference_units,
                "contract": None if self.contract is None else self.contract.describe(),
                "steps": {"taken": self.steps_taken, "at_round": self._steps_at_round, "phase": self._phase_steps,
                          "given": self._steps_given},
                # the last kept round's snapshot (a later round may go back to it), without optimizer objects
                "previous": None if self._previous is None else {
                    **self._previous, "snapshot": {**self._previous["snapshot"], "optimizers": [
                        {"optimizer": None, "state": e["state"]} for e in self._previous["snapshot"]["optimizers"]]}},
                "backtracked": sorted(self._backtracked)}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "fixer state") -> None:
        """Restore :meth:`state_dict`; a state of another method, fixing config or contract is refused."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{where} is not a pwfn Fixer state (format {STATE_FORMAT}); a state written by an "
                                  "older pwfn cannot be resumed: start over")
        if state.get("method") != self.method:
            raise CheckpointError(f"{where} is a {state.get('method')!r} state; this Fixer runs {self.method!r}")
        sections = (self.method_impl.section_name, "quantise", "budget", "contract")
        diff = config_diff(state.get("config") or {}, config_to_dict(self.cfg), sections)
        mine = None if self.contract is None else self.contract.describe()
        if not diff and state.get("contract") != mine:
            diff = [f"contract: {state.get('contract')} -> {mine}"]
        if diff:
            raise CheckpointError(f"{where} was written under other fixing settings ({'; '.join(diff[:4])}); "
                                  "resume with the same config or start over")
        if isinstance(state.get("history"), str):  # a sharded Fixer's history travels as one JSON string
            try:
                state = {**state, "history": json.loads(state["history"])}
            except ValueError as exc:
                raise CheckpointError(f"{where}: its round history is not valid JSON ({exc})") from exc
        rounds = self._check_state(state, where)  # everything checked before anything is loaded
        load_state_dict_strict(self.model, state["model"], where)
        self.view.load_mask_state(state["masks"], where)
        self.fractions, self.schedule_index = list(state["fractions"]), list(state["schedule_index"])
        self.round = rounds
        self.history = list(state["history"])
        self.caution = int(state.get("caution") or 0)
        self.method_impl.set_caution(self.caution)
        extra = int(state.get("extra_terms") or 0)
        if extra != self.extra_terms:
            self.engine_config = dataclasses.replace(self.engine_config,
                                                     max_order=self.engine_config.max_order + extra - self.extra_terms)
            self.extra_terms = extra
        if state.get("reference") is not None:
            self.reference = float(state["reference"])
        units = state.get("reference_units")
        if units is not None and (not isinstance(units, (list, tuple)) or not all(
                isinstance(u, Mapping) and all(isinstance(v, (int, float)) for v in u.values()) for u in units)):
            raise CheckpointError(f"{where}: the float model's sums on the guard data are damaged")
        self._reference_units = None if units is None else [dict(u) for u in units]
        previous = state.get("previous")
        if previous is not None and not (isinstance(previous, Mapping) and isinstance(previous.get("snapshot"), Mapping)
                                         and {"ladder", "position", "undone", "before"} <= set(previous)):
            raise CheckpointError(f"{where}: the snapshot of the last kept round is damaged")
        self._previous = None if previous is None else dict(previous)
        self._backtracked = {int(i) for i in state.get("backtracked") or []}
        steps = state.get("steps") or {}
        self.steps_taken, self._steps_at_round = int(steps.get("taken") or 0), int(steps.get("at_round") or 0)
        self._steps_given = bool(steps.get("given"))
        self._phase_steps = None if steps.get("phase") is None else int(steps["phase"])
        self.method_impl.set_training_steps(self._phase_steps)
        self._extra = None
        self._refresh_active()

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

    def _check_state(self, state: Mapping[str, Any], where: str) -> int:
        """The rounds done a state says, once its rounds, fractions, history, masks and weights fit this
        Fixer; a state that cannot be resumed (hand-edited, another run's) raises CheckpointError."""
        planned = list(self.method_impl.fractions)
        fractions, index = state.get("fractions"), state.get("schedule_index")
        if (not isinstance(fractions, (list, tuple)) or not isinstance(index, (list, tuple)) or not fractions
                or len(fractions) != len(index)
                or any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in fractions)
                or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in index)):
            raise CheckpointError(f"{where} holds no schedule (fractions and the planned round of each): it was "
                                  "written by an older pwfn or edited")
        if (float(fractions[-1]) != 1.0 or any(b <= a for a, b in zip(fractions, fractions[1:]))
                or any(b < a for a, b in zip(index, index[1:])) or sorted(set(index)) != list(range(len(planned)))
                or any(float(fractions[k]) > planned[j] + 1e-9 for k, j in enumerate(index))
                or any(abs(float(fractions[k]) - planned[j]) > 1e-9 for k, j in enumerate(index)
                       if k + 1 == len(index) or index[k + 1] != j)):
            raise CheckpointError(f"{where} was written for the fractions {list(fractions)!r}, which do not fit this "
                                  f"Fixer's schedule {planned} (split rounds aside): resume with the same fractions "
                                  "or start over")
        n = len(fractions)
        rounds = state.get("round")
        if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or not 0 <= rounds <= n:
            raise CheckpointError(f"{where} says {rounds!r} rounds are done, but its schedule has {n} rounds "
                                  f"({list(fractions)}): not a state it can resume")
        rounds = int(rounds)
        history = state.get("history") or []
        if not isinstance(history, (list, tuple)) or not all(isinstance(r, Mapping) for r in history) \
                or len(history) != rounds:
            shown = len(history) if isinstance(history, (list, tuple)) else type(history).__name__
            raise CheckpointError(f"{where} holds a history of {shown} round rows for {rounds} rounds done: "
                                  "it was edited or is damaged")
        if not isinstance(state.get("model"), Mapping):
            raise CheckpointError(f"{where} holds no model weights")
        params = {name for name, _ in self.model.named_parameters()}
        for key, t in state["model"].items():
            if key in params and isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) \
                    and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: the weight {key!r} holds NaN/inf values: it cannot be resumed")
        masks = state.get("masks")
        if not isinstance(masks, Mapping) or not all(isinstance(m, torch.Tensor) for m in masks.values()):
            raise CheckpointError(f"{where} holds no fixed masks (a mapping of tensor name to a bool mask)")
        slots = {slot.name: slot for slot in self.view.slots}
        if set(masks) != set(slots):
            extra, missing = sorted(set(masks) - set(slots)), sorted(set(slots) - set(masks))
            raise CheckpointError(f"{where}'s fixed masks do not fit this model's quantised tensors (unexpected "
                                  f"{extra[:3]}, missing {missing[:3]})")
        fixed = total = 0
        for name, m in masks.items():
            want = tuple(slots[name].value.shape)
            if m.dtype != torch.bool or tuple(m.shape) != want:
                raise CheckpointError(f"{where}'s fixed mask for {name} has shape {tuple(m.shape)} / {m.dtype}, "
                                      f"expected {want} / bool")
            fixed += int(m.sum())
            total += m.numel()
        if (rounds == 0 and fixed) or (rounds == n and fixed != total):
            raise CheckpointError(f"{where} says {rounds} of {n} rounds are done but fixes {fixed} of {total} "
                                  "weights: its masks and rounds disagree (edited or damaged)")
        return rounds

    # -- the end ------------------------------------------------------------------------------
    def finalize(self) -> nn.Module:
        """The plain point-estimate model (your module classes, no sigma, no hooks), every weight fixed.

        A sharded (FSDP2) model is not copied: its hooks are removed and ``self.model`` itself, still
        sharded, is returned (save it with ``torch.distributed.checkpoint``)."""
        free = self.view.global_numel - self.view.n_fixed()
        if not self.done or free:
            raise ModelError(f"{self.method}: {free} weights are not fixed yet "
                             f"({self.round} of {len(self.fractions)} rounds done); run the remaining rounds first")
        if self.view.shards is not None:
            if bayes.is_bayesian(self.model):
                raise ConfigError("finalize() cannot strip the Gaussians of a sharded (FSDP2) model yet; save "
                                  "fixer.model with torch.distributed.checkpoint and convert it unsharded")
            self.close()
            return self.model
        point = self.method_impl.point_model(self.model)
        self.close()
        return point

    def _metrics(self) -> dict[str, Any]:
        """Unique values, entropy, term shares and codebook of the weights fixed so far."""
        if self.view.shards is not None:  # network-wide, from the merged codebooks of the shards
            return fixing_metrics_from_codebook(*self.view.fixed_codebook(), self.view.global_numel,
                                                self.engine_config.b, self.engine_config.signed_terms)
        return fixing_metrics(self.view.values(), self.view.fixed(), self.engine_config.b,
                              self.engine_config.signed_terms)

    def report(self) -> dict[str, Any]:
        """Per-round history, coverage and the quantised tensors (the built-in loop adds evaluations)."""
        out = {"method": self.method, "fractions": list(self.fractions), "rounds": copy.deepcopy(self.history),
               "final": self._metrics(),
               "quantised_tensors": self.view.names(),
               "coverage": self.method_impl.coverage_report(),
               "contract": self.contract_report()}
        if self.budget is not None:
            out["budget"] = self.budget.report(self.view)
        return out
