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
import logging
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

import bayes

from .config import RunConfig, config_diff, config_from_dict, config_to_dict, load_config
from .engine import fix_round
from .errors import CheckpointError, ConfigError, ModelError
from .plumbing import FixedGuard, QuantSlot

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def resolve_config(config: Union[None, RunConfig, Mapping, str, Path], overrides: Optional[list[str]] = None) -> RunConfig:
    """A RunConfig from a RunConfig, a dict, a YAML path, a shipped config's name (``"paper_pwfn"``) or None
    (defaults), with ``--set``-style overrides."""
    from .config import apply_overrides

    if isinstance(config, RunConfig):
        cfg = copy.deepcopy(config)
        return config_from_dict(apply_overrides(config_to_dict(cfg), overrides)) if overrides else cfg
    if isinstance(config, Mapping):
        return config_from_dict(apply_overrides(copy.deepcopy(dict(config)), overrides or []))
    if config is None or isinstance(config, (str, Path)):
        if isinstance(config, str):  # a shipped config by name (e.g. the paper preset "paper_pwfn")
            from .presets import resolve_config as resolve_shipped

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


def _mask_grad(view_ref, slot: QuantSlot):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        view = view_ref()
        if view is None:
            return grad
        mask = view._mask(slot)
        return grad.masked_fill(mask, 0) if mask.shape == grad.shape else grad

    return hook


class Fixer:
    """Round-by-round fixing of one model with one method, driven by any training loop.

    ``model``: your trained ``nn.Module`` (copied unless ``inplace=True``, e.g. when a
    LightningModule holds it). ``method``: ``"pwfn"``, ``"wfn"`` or ``"wfn_published"``. ``config``: a RunConfig, a
    dict (``{"pwfn": {"k": 2}}``), a YAML path or None for the defaults; only the method's
    section, ``quantise`` and ``batchnorm`` matter here. ``dataset_size``: the training-set size
    (needed by ``pwfn.objective=elbo``). ``steps_per_round``: the optimizer steps your loop takes
    between two rounds; PWFN's budget-aware regulariser scales ``lam`` by it
    (``pwfn.sigma_steps_reference``; without it ``lam`` is used as given).
    """

    def __init__(self, model: nn.Module, method: str = "pwfn", config: Any = None, *,
                 device: Optional[Union[str, torch.device]] = None, inplace: bool = False,
                 dataset_size: Optional[int] = None, overrides: Optional[list[str]] = None,
                 steps_per_round: Optional[int] = None) -> None:
        from .pipeline import STRATEGIES, _check_float_model, _check_trainable

        if method not in STRATEGIES:
            raise ConfigError(f"unknown method {method!r}; choose one of {list(STRATEGIES)}")
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.method = method
        self.cfg = resolve_config(config, overrides)
        self.strategy = STRATEGIES[method](self.cfg)
        if dataset_size is not None:
            self.strategy._dataset_size = int(dataset_size)
        if method == "wfn_published" and self.cfg.budget != type(self.cfg.budget)():
            raise ConfigError("budget mode works with the pwfn and wfn methods, not wfn_published")
        _check_float_model(model)
        prepared = self.strategy.prepare(model, inplace=inplace)
        self.model: nn.Module = prepared.to(device) if device is not None else prepared
        self.view = self.strategy.view(self.model)
        self.coverage = self.strategy.coverage
        self.engine_config = self.strategy.engine_config()
        # budget mode: the allowed values are chosen from the prepared float model alone, so a
        # resumed run (a new Fixer whose state is then loaded) chooses the same
        from .budget import plan_budget

        self.budget = plan_budget(getattr(self.cfg, "budget", None), self.engine_config, self.view,
                                  lambda: self.strategy.tolerance(self.view, 0))
        if self.budget is not None:
            self.engine_config = self.budget.engine_config
        self.fractions: list[float] = list(self.strategy.fractions)
        _check_trainable(method, self.strategy, self.model)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._extra = None
        self._closed = False
        self._active: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved: dict[int, FixedGuard] = {}  # per optimizer, between its step's pre and post hooks
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

        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._opt_handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._refresh_active()

    def _refresh_active(self) -> None:
        """The (tensor, mask) pairs with fixed entries (mu and sigma); recomputed after every round."""
        self._active = [(p, m) for p, m in self.view.parameters_with_masks() if bool(m.any())]

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        pairs = [(p, m) for p, m in self._active if id(p) in ids]
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
            self._extra = self.strategy.extra_loss(self.view) or (lambda model, ce: None)
        if self.method == "wfn" and task_loss is None and self.round > 0:
            raise ConfigError("WFN's loss term is scaled to the task loss: call fixer.loss_term(task_loss)")
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
        if hasattr(self.strategy, "phase_steps"):
            self.strategy.phase_steps = None if steps is None else int(steps)
            self._extra = None

    def clip_parameters(self) -> Optional[list]:
        """The tensors gradient clipping should see (None: all of the model's); PWFN leaves sigma out
        unless ``pwfn.clip_sigma``. Pass them to ``torch.nn.utils.clip_grad_norm_``."""
        fn = getattr(self.strategy, "clip_parameters", None)
        return fn(self.model) if fn is not None else None

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
        return float(self.strategy.pre_epochs())

    @property
    def round_epochs(self) -> float:
        """Training the method wants between two rounds (the built-in loop's budget)."""
        return float(self.strategy.round_epochs())

    def fix_next(self, broadcast=None) -> Round:
        """Fix the next fraction of the weights (one engine round); returns the round's report.

        ``broadcast`` (optional) is applied to each result tensor before it is written (the
        built-in loop passes DDP's broadcast so every rank writes rank 0's result).
        """
        from .distributed import tensor_checksum
        from .pipeline import quant_metrics

        if self.done:
            raise ConfigError(f"{self.method}: all {len(self.fractions)} rounds are done; call finalize()")
        if self._closed:
            raise ConfigError("this Fixer was finalized or closed")
        t = self.round
        frac = self.fractions[t]
        view = self.view
        new_values, new_fixed, new_sigma, summary = self.strategy.fix(view, t, frac, self.engine_config,
                                                                      engine=fix_round)
        if broadcast is not None:
            for tensor in (new_values, new_fixed) + ((new_sigma,) if new_sigma is not None else ()):
                broadcast(tensor)
        view.write(new_values, new_fixed, new_sigma)
        if self.budget is not None:
            self.budget.enforce(view)  # budget mode: merge fixed values down to the limits
        self.round += 1
        self._extra = None  # WFN's attraction centres changed
        self._refresh_active()
        row: dict[str, Any] = {"round": t, "fraction": frac,
                               "checksum": tensor_checksum(view.values(), view.fixed())}
        row.update(quant_metrics(view, self.engine_config.b, self.engine_config.signed_terms))
        from .io import to_jsonable

        row["engine"] = to_jsonable(summary)
        self.history.append(row)
        return Round(index=t, fraction=frac, trains=frac < 1.0 and not self.done, row=row)

    def rounds(self) -> Iterator[Round]:
        """Yield each remaining round right after fixing it; train between the yields."""
        while not self.done:
            yield self.fix_next()

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
        return self.strategy.eval_context(self.model)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: model weights (and sigmas), fixed masks, rounds done, history, config."""
        return {"format": STATE_FORMAT, "method": self.method, "round": self.round,
                "model": self.model.state_dict(), "masks": self.view.mask_state(),
                "history": copy.deepcopy(self.history), "config": config_to_dict(self.cfg),
                "fractions": list(self.fractions)}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "fixer state") -> None:
        """Restore :meth:`state_dict`; a state of another method or fixing config is refused."""
        from .io import load_state_dict_strict

        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{where} is not a pwfn Fixer state (format {STATE_FORMAT})")
        if state.get("method") != self.method:
            raise CheckpointError(f"{where} is a {state.get('method')!r} state; this Fixer runs {self.method!r}")
        sections = (self.method, "quantise", "budget")
        diff = config_diff(state.get("config") or {}, config_to_dict(self.cfg), sections)
        if diff:
            raise CheckpointError(f"{where} was written under other fixing settings ({'; '.join(diff[:4])}); "
                                  "resume with the same config or start over")
        load_state_dict_strict(self.model, state["model"], where)
        self.view.load_mask_state(state["masks"], where)
        self.round = int(state["round"])
        self.history = list(state.get("history") or [])
        self._extra = None
        self._refresh_active()

    # -- the end ------------------------------------------------------------------------------
    def finalize(self) -> nn.Module:
        """The plain point-estimate model (your module classes, no sigma, no hooks), every weight fixed."""
        if not self.done or not bool(self.view.fixed().all()):
            raise ModelError(f"{self.method}: {int((~self.view.fixed()).sum())} weights are not fixed yet "
                             f"({self.round} of {len(self.fractions)} rounds done); run the remaining rounds first")
        point = bayes.to_point_estimate(self.model) if self.method == "pwfn" else bayes.copy_model(self.model)
        self.close()
        return point

    def report(self) -> dict[str, Any]:
        """Per-round history, coverage and the quantised tensors (the built-in loop adds evaluations)."""
        from .pipeline import quant_metrics

        out = {"method": self.method, "fractions": list(self.fractions), "rounds": copy.deepcopy(self.history),
               "final": quant_metrics(self.view, self.engine_config.b, self.engine_config.signed_terms),
               "quantised_tensors": self.view.names(),
               "coverage": {**self.coverage.summary(), "folded_parametrizations": list(self.strategy.folded)}}
        if self.budget is not None:
            out["budget"] = self.budget.report(self.view)
        return out


BATCHNORM_POLICIES = ("train", "frozen")


def apply_batchnorm_policy(model: nn.Module, policy: str) -> None:
    """``frozen``: every BatchNorm layer in eval mode (running statistics used and kept) while the rest trains."""
    if policy not in BATCHNORM_POLICIES:
        raise ConfigError(f"batchnorm = {policy!r}: choose one of {list(BATCHNORM_POLICIES)}")
    if policy == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
