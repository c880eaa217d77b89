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

Every round is judged by the accuracy contract (:mod:`pwfn.training.contract`) against the float model on
the evaluation you give (``evaluate=``: a validation loader or a callable): a round that would
break it is undone and redone more cautiously, and when nothing keeps it a
:class:`~pwfn.errors.ContractError` is raised with the model left at its last state within it.

Fixed values stay exact without a wrapper to remember: a gradient hook on every quantised
tensor zeroes the fixed entries' gradients (so gradient clipping sees what the update will
use), and process-wide optimizer step hooks put the fixed entries back after every
``torch.optim.Optimizer.step`` that touches them — weight decay, momentum, Adam's moments and
your own optimizer included. ``pwfn.compress`` and the CLI run their rounds on this object.

Why one module of this length: it is one idea, the :class:`Fixer` object (one class of about
600 lines): its rounds, the hooks that keep fixed weights fixed, and its checkpoint state all
act on the same tensors and masks. The accuracy contract's evaluation
(:mod:`pwfn.training.guard`) and its rounds (:mod:`pwfn.training.contract_rounds`) are
already split off as mixins.
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

from ..common.io import load_state_dict_strict, to_jsonable
from ..core.engine import EngineCache, fix_round
from ..core.metrics import fixing_metrics, fixing_metrics_from_codebook
from ..core.sharding import is_sharded
from ..errors import CheckpointError, ConfigError, ContractError, ModelError
from ..methods.base import Method, build_method
from ..model.config import (
    RunConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    load_config,
)
from ..model.plumbing import FixedGuard, QuantSlot
from ..model.presets import resolve_config as resolve_shipped
from .budget import plan_budget
from .checks import check_float_model, check_materialized
from .contract import (
    AccuracyContract,
    ContractSpec,
    resolve_contract,
)
from .contract_rounds import ContractRounds
from .distributed import tensor_checksum
from .guard import ContractGuard, Evaluation
from .tasks import BatchAdapter, Task, resolve_task
from .train import apply_batchnorm_policy

log = logging.getLogger(__name__)

STATE_FORMAT = 2



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


class Fixer(ContractGuard, ContractRounds):
    """Round-by-round fixing of one model with one method, driven by any training loop.

    ``model``: your trained ``nn.Module`` (copied unless ``inplace=True``, e.g. when a
    LightningModule holds it). ``method``: a registered method's name (``"pwfn"``, ``"wfn"``,
    ``"wfn_published"``, see :mod:`pwfn.methods`) or a :class:`~pwfn.methods.base.Method` subclass. ``config``: a RunConfig, a
    dict (``{"pwfn": {"k": 2}}``), a YAML path, a shipped config's name or None for the defaults;
    the method's section, ``quantise``, ``batchnorm``, ``budget``, ``task`` and ``contract`` matter
    here. ``dataset_size``: the training-set size (needed by ``pwfn.objective=elbo``).

    The accuracy contract: ``contract`` (an :class:`~pwfn.training.contract.AccuracyContract`, a dict such
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
