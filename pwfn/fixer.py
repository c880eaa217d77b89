"""Fixing inside any training code: the :class:`Fixer` object.

In the spirit of torch.ao's prepare/convert and TF-MOT's cluster_weights/strip_clustering, one
object prepares the model (Bayesian for PWFN, the model itself for WFN), gives the method's
extra loss term, keeps fixed values bit-exact under any torch optimizer, runs the next fixing
round when asked, reports per round, saves and loads its state, and returns the plain
point-estimate model at the end::

    fixer = pwfn.Fixer(model, method="pwfn", config=cfg)
    for rnd in fixer.rounds():                      # fixes the next fraction of the weights
        if rnd.trains:                              # every round but the last
            my_train(fixer.model, extra_loss=fixer.loss_term)
    point = fixer.finalize()                        # plain module, every weight on the codebook

Fixed values stay exact without a wrapper to remember: a gradient hook on every quantised
tensor zeroes the fixed entries' gradients (so gradient clipping sees what the update will
use), and process-wide optimizer step hooks put the fixed entries back after every
``torch.optim.Optimizer.step`` that touches them — weight decay, momentum, Adam's moments and
your own optimizer included. ``pwfn.compress`` and the CLI run their rounds on this object.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
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
from .distributed import tensor_checksum
from .engine import EngineCache, fix_round
from .errors import CheckpointError, ConfigError, ModelError
from .io import load_state_dict_strict, to_jsonable
from .methods.base import Method, RoundGuard, build_method
from .metrics import fixing_metrics, fixing_metrics_from_codebook
from .plumbing import FixedGuard, QuantSlot
from .presets import resolve_config as resolve_shipped
from .sharding import is_sharded
from .train import apply_batchnorm_policy

log = logging.getLogger(__name__)

STATE_FORMAT = 1


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


class Fixer:
    """Round-by-round fixing of one model with one method, driven by any training loop.

    ``model``: your trained ``nn.Module`` (copied unless ``inplace=True``, e.g. when a
    LightningModule holds it). ``method``: a registered method's name (``"pwfn"``, ``"wfn"``,
    ``"wfn_published"``, see :mod:`pwfn.methods`) or a :class:`~pwfn.methods.base.Method` subclass. ``config``: a RunConfig, a
    dict (``{"pwfn": {"k": 2}}``), a YAML path or None for the defaults; only the method's
    section, ``quantise`` and ``batchnorm`` matter here. ``dataset_size``: the training-set size
    (needed by ``pwfn.objective=elbo``). ``steps_per_round``: the optimizer steps your loop takes
    between two rounds; PWFN's budget-aware regulariser scales ``lam`` by it
    (``pwfn.sigma_steps_reference``; without it ``lam`` is used as given).
    """

    def __init__(self, model: nn.Module, method: Union[str, type] = "pwfn", config: Any = None, *,
                 device: Optional[Union[str, torch.device]] = None, inplace: bool = False,
                 dataset_size: Optional[int] = None, overrides: Optional[list[str]] = None,
                 steps_per_round: Optional[int] = None) -> None:
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
        self.fractions: list[float] = list(self.method_impl.fractions)
        self.method_impl.check_trainable(self.model)
        self.round = 0
        self._engine_cache = EngineCache()  # the candidate centres, built once for all rounds
        #: the accuracy guard's caution level reached so far (0: the method as configured)
        self.caution = 0
        self.history: list[dict[str, Any]] = []
        self._extra = None
        self._guard_warned = False
        self._active: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved: dict[int, FixedGuard] = {}  # per optimizer, between its step's pre and post hooks
        # per optimizer: (weak ref, param-group sizes, _active version, the (tensor, mask) pairs it steps)
        self._optimizers: dict[int, tuple[weakref.ref, tuple[int, ...], int, list]] = {}
        self._version = 0
        self._closed = False
        self._held = [p for p in self.model.parameters()]
        me_ref = weakref.ref(self)
        for p in self._held:
            _HELD[id(p)] = (weakref.ref(p), me_ref)
        self._install_hooks()
        if steps_per_round is not None:  # PWFN's budget-aware regulariser (pwfn.sigma_steps_reference)
            self.set_training_steps(steps_per_round)

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

    def _pairs_of(self, optimizer: torch.optim.Optimizer) -> list:
        """The fixed (tensor, mask) pairs ``optimizer`` steps; worked out once per optimizer (again when its
        parameter groups or the fixed entries change), so the step hook costs a lookup."""
        key = id(optimizer)
        sizes = tuple(len(group["params"]) for group in optimizer.param_groups)
        entry = self._optimizers.get(key)
        if entry is not None and entry[0]() is optimizer and entry[1] == sizes and entry[2] == self._version:
            return entry[3]
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if entry is None or entry[0]() is not optimizer or entry[1] != sizes:  # a new optimizer, or new groups
            self._check_optimizer(optimizer, ids)
        pairs = [(p, m) for p, m in self._active if id(p) in ids]
        if len(self._optimizers) > 64:  # forget optimizers that are gone
            self._optimizers = {k: v for k, v in self._optimizers.items() if v[0]() is not None}
        self._optimizers[key] = (weakref.ref(optimizer), sizes, self._version, pairs)
        return pairs

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
        pairs = self._pairs_of(optimizer)
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
        if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
            raise ConfigError(f"training steps must be >= 1 (or None), got {steps!r}")
        self.method_impl.set_training_steps(None if steps is None else int(steps))
        self._extra = None

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

    def fix_next(self, broadcast=None, evaluate: Optional[Callable[[], tuple[float, float]]] = None) -> Round:
        """Fix the next fraction of the weights (one engine round); returns the round's report.

        ``broadcast`` (optional) is applied to each result tensor before it is written (the
        built-in loop passes DDP's broadcast so every rank writes rank 0's result).

        ``evaluate`` (optional) turns on the method's accuracy guard (PWFN: ``pwfn.guard_drop``): a
        callable returning ``(score, loss)`` of the model on a few fixed validation batches, in the
        method's ``evaluating()`` mode: a score where higher is better (e.g. top-1) and the task
        loss. It is called before the round and after each try; a try that costs more than the guard
        allows is undone (values, fixed masks and sigma restored) and redone more cautiously (PWFN:
        k halved, not below ``pwfn.k_min``). The built-in loop (``pwfn.compress``, the CLI) passes one.
        """
        if self.done:
            raise ConfigError(f"{self.method}: all {len(self.fractions)} rounds are done; call finalize()")
        if self._closed:
            raise ConfigError("this Fixer was finalized or closed")
        t = self.round
        frac = self.fractions[t]
        view = self.view
        configured = self.method_impl.round_guard()
        guard = configured if evaluate is not None else None
        unguarded = evaluate is None and configured is not None
        if unguarded and not self._guard_warned:
            self._guard_warned = True
            log.warning("%s: the accuracy guard is configured but fix_next() got no evaluate=, so every round runs at "
                        "the guard's most cautious setting (PWFN: k = pwfn.k_min), which keeps accuracy but fixes "
                        "onto more values. Pass evaluate=lambda: (score, loss) on a few validation batches "
                        "(fixer.rounds(evaluate=...)), or turn the guard off and choose the tolerance yourself "
                        "(PWFN: pwfn.guard_drop=null and pwfn.k)", self.method)
        record: Optional[dict[str, Any]] = None
        if guard is None:
            level = self.caution
            while unguarded and self.method_impl.set_caution(level + 1):  # no evaluation: the most cautious level
                level += 1
            self.caution = level
            self.method_impl.set_caution(level)
            summary, _ = self._fix_once(t, frac, broadcast)
        else:
            summary, record = self._guarded_round(t, frac, broadcast, guard, evaluate)
        self.round += 1
        self._extra = None  # WFN's attraction centres changed
        self._refresh_active()
        row: dict[str, Any] = {"round": t, "fraction": frac,
                               "checksum": tensor_checksum(view.values(), view.fixed())}
        row.update(self._metrics())
        row["engine"] = to_jsonable(summary)
        if record is not None:
            row["guard"] = record
        self.history.append(row)
        return Round(index=t, fraction=frac, trains=frac < 1.0 and not self.done, row=row)

    def _guarded_round(self, t: int, frac: float, broadcast, guard: RoundGuard,
                       evaluate: Callable[[], tuple[float, float]]) -> tuple[dict, dict[str, Any]]:
        """Round ``t`` under the method's accuracy guard; returns the engine summary and the guard's record.

        The first try is one caution level below where the last round ended (so one sensitive round
        does not hold k down for the rest of the run); a try that lowers the score by more than
        ``guard.max_drop`` or raises the loss by more than ``guard.max_loss_rise`` (both relative to
        before the round) is undone and the round redone one level higher, until the method refuses
        a higher level (then the last try is kept).
        """
        view = self.view
        score0, loss0 = (float(x) for x in evaluate())
        saved = (view.values(), view.fixed(), view.sigmas() if view.has_sigma else None)
        level = max(self.caution - 1, 0)
        tries: list[dict[str, Any]] = []
        while True:
            self.method_impl.set_caution(level)
            summary, merged = self._fix_once(t, frac, broadcast)
            score, loss = (float(x) for x in evaluate())
            drop = (score0 - score) / max(abs(score0), 1e-12)
            rise = (loss - loss0) / max(abs(loss0), 1e-12)
            tries.append({"caution": level, "score": score, "loss": loss, "drop": drop, "loss_rise": rise})
            kept = drop <= guard.max_drop and rise <= guard.max_loss_rise  # NaN: not kept
            if kept or not self.method_impl.set_caution(level + 1):
                break
            view.write(*saved)  # undo the try: nothing trained since it
            if self.budget is not None:
                self.budget.merged_weights -= merged
                self.budget.merges_per_round.pop()
            level += 1
        self.caution = level
        if not kept:  # never silently: the round costs more than the guard allows even at its most cautious
            log.warning("%s round %d: the accuracy guard could not keep this round within its limits even at its "
                        "most cautious setting (score %+.2f %%, loss %+.0f %% against before the round); the round "
                        "is kept and the run goes on. If the final accuracy falls short, %s", self.method, t + 1,
                        -100 * drop, 100 * rise, self.method_impl.guard_tip())
        return summary, {"score_before": score0, "loss_before": loss0, "tries": tries, "caution": level,
                         "kept_within_limits": bool(kept)}

    def _fix_once(self, t: int, frac: float, broadcast) -> tuple[dict, int]:
        """One try of round ``t``: the method's fixing written into the view (and merged to the budget);
        returns the engine summary and the weights the budget merged."""
        new_values, new_fixed, new_sigma, summary = self.method_impl.fix(self.view, t, frac, self.engine_config,
                                                                      engine=functools.partial(
                                                                          fix_round, cache=self._engine_cache,
                                                                          shards=self.view.shards))
        if broadcast is not None:
            for tensor in (new_values, new_fixed) + ((new_sigma,) if new_sigma is not None else ()):
                broadcast(tensor)
        self.view.write(new_values, new_fixed, new_sigma)
        merged = self.budget.enforce(self.view) if self.budget is not None else 0  # budget mode: merge down
        return summary, merged

    def rounds(self, evaluate: Optional[Callable[[], tuple[float, float]]] = None) -> Iterator[Round]:
        """Yield each remaining round right after fixing it; train between the yields. ``evaluate``: the
        accuracy guard's ``(score, loss)`` callable, as in :meth:`fix_next`."""
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
        """Everything to resume: model weights (and sigmas), fixed masks, rounds done, history, config.

        A sharded (FSDP2) model's state is for ``torch.distributed.checkpoint``: weights and masks are
        DTensors, and the history (which grows with the rounds) is one JSON string, so the state a
        fresh Fixer gives has the same keys to load into."""
        history: Any = copy.deepcopy(self.history)
        if self.view.shards is not None:
            history = json.dumps(to_jsonable(history))
        return {"format": STATE_FORMAT, "method": self.method, "round": self.round,
                "model": self.model.state_dict(), "masks": self.view.mask_state(),
                "history": history, "config": config_to_dict(self.cfg),
                "fractions": list(self.fractions)}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "fixer state") -> None:
        """Restore :meth:`state_dict`; a state of another method or fixing config is refused."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{where} is not a pwfn Fixer state (format {STATE_FORMAT})")
        if state.get("method") != self.method:
            raise CheckpointError(f"{where} is a {state.get('method')!r} state; this Fixer runs {self.method!r}")
        sections = (self.method_impl.section_name, "quantise", "budget")
        diff = config_diff(state.get("config") or {}, config_to_dict(self.cfg), sections)
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
        self.round = rounds
        self.history = list(state["history"])
        self.caution = next((int(row["guard"]["caution"]) for row in reversed(self.history) if "guard" in row), 0)
        self._extra = None
        self._refresh_active()

    def _check_state(self, state: Mapping[str, Any], where: str) -> int:
        """The rounds done a state says, once its rounds, fractions, history, masks and weights fit this
        Fixer; a state that cannot be resumed (hand-edited, another run's) raises CheckpointError."""
        n = len(self.fractions)
        rounds = state.get("round")
        if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or not 0 <= rounds <= n:
            raise CheckpointError(f"{where} says {rounds!r} rounds are done, but this Fixer runs {n} rounds "
                                  f"({self.fractions}): not a state it can resume")
        rounds = int(rounds)
        saved = state.get("fractions")
        if saved is not None and (not isinstance(saved, (list, tuple)) or len(saved) != n
                                  or any(isinstance(f, bool) or not isinstance(f, numbers.Real)
                                         or abs(float(f) - g) > 1e-9 for f, g in zip(saved, self.fractions))):
            raise CheckpointError(f"{where} was written for the fractions {saved!r}, this Fixer runs {self.fractions}: "
                                  "resume with the same fractions or start over")
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
               "coverage": self.method_impl.coverage_report()}
        if self.budget is not None:
            out["budget"] = self.budget.report(self.view)
        return out
