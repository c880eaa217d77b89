"""The protocol every fixing method implements, and what all methods share.

The round loop (:class:`pwfn.Fixer`, :class:`pwfn.run.pipeline.FixingRun`) asks a method, in order:

* ``prepare(float_model)``: the model it fixes (a copy; Bayesian for PWFN), with its
  :class:`~pwfn.model.coverage.Coverage` decided by :meth:`Method.plan`; ``view(model)``: the
  :class:`~pwfn.model.plumbing.QuantView` over the quantised tensors;
* ``engine_config()``, ``fractions``: the centre set and the share fixed after each round;
* each round, ``fix(view, round, fraction, engine_config)``: new values, fixed mask, sigma and the
  engine's summary (the loop writes them, keeps them exact, measures and logs);
* between rounds, ``pre_epochs()`` / ``round_epochs()``, ``optimizer(...)``, ``grad_clip()``,
  ``clip_parameters(model)``, ``extra_loss(view)`` and ``set_training_steps(steps)``;
* ``refresh_posterior(...)`` before each round (PWFN's post-training posterior), ``eval_context``
  for evaluations, ``sigma_summary`` for reports, and ``point_model(model)`` at the end;
* ``set_caution(level)``: the accuracy contract's lever. A round whose fixing would break the
  contract (:mod:`pwfn.training.contract`, enforced by :class:`pwfn.Fixer`) is undone and redone one caution
  level higher (PWFN: k halved; WFN: delta halved), as long as ``set_caution`` accepts it; then with
  fewer new weights, then with a finer codebook; ``contract_tip()`` says what the user can change.

Class attributes describe what the loop must know without asking a name: ``bayesian`` (weights
carry sigma: MC calibration and sigma summaries apply), ``keeps_optimizer`` (the optimizer state
runs across rounds, so a checkpoint restores it), ``needs_task_loss`` (the extra loss is scaled to
the task loss), ``supports_budget`` (budget mode applies), ``signed_terms`` (its centres are sums of
signed powers of two, e.g. 7/8 = 1 - 1/8; otherwise of positive ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

import bayes

from ..common.hints import setting
from ..core.engine import EngineConfig, fix_round
from ..errors import ConfigError, ModelError
from ..model.config import RunConfig
from ..model.coverage import Coverage, plan
from ..model.plumbing import QuantView, fold_norm_biases
from ..training.budget import budget_active
from . import get_method

log = logging.getLogger(__name__)

#: what a method's round returns: values, fixed mask, sigma (None for a point model) and the engine summary
FixResult = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], dict]


def engine_config_from(settings: Any, *, signed_terms: bool, **extra: Any) -> EngineConfig:
    """An :class:`EngineConfig` from a method section's ``engine`` settings."""
    return EngineConfig(b=settings.b, max_order=settings.max_order, signed_terms=signed_terms,
                        zero_fix=settings.zero_fix, inc=settings.inc, **extra)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(model)``: fixing works on it (compile the point model again after)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        log.info("fixing the module inside torch.compile(...): its state_dict keys have no '_orig_mod.' prefix")
        return inner
    return model


class Method:
    """Base class of the fixing methods: shared planning and the defaults of the protocol.

    ``cfg`` is the run's :class:`~pwfn.model.config.RunConfig`; the method reads its own section
    (``section``, by default its name) through :attr:`settings`, and ``quantise`` for coverage.
    """

    #: the registered name (set by :func:`pwfn.methods.register_method`)
    name: ClassVar[str] = ""
    #: the config section holding the method's settings (None: the method's name)
    section: ClassVar[Optional[str]] = None
    bayesian: ClassVar[bool] = False
    keeps_optimizer: ClassVar[bool] = False
    needs_task_loss: ClassVar[bool] = False
    supports_budget: ClassVar[bool] = True
    signed_terms: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.coverage: Optional[Coverage] = None
        self.folded: list[str] = []
        self.norm_biases: list[str] = []
        self.dataset_size: Optional[int] = None
        if not hasattr(cfg, self.section_name):
            raise ConfigError(f"method {self.name!r} reads the config section {self.section_name!r}, which the "
                              "config does not have; set the method's `section` to an existing one")
        if not self.supports_budget and budget_active(cfg.budget):
            raise ConfigError(f"budget mode does not work with the {self.name} method")

    # -- settings -------------------------------------------------------------------------------
    @property
    def section_name(self) -> str:
        return self.section or self.name

    @property
    def settings(self) -> Any:
        """This method's config section."""
        return getattr(self.cfg, self.section_name)

    @property
    def quantise_norms(self) -> bool:
        return bool(getattr(self.settings, "quantise_norms", False))

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        """The config sections whose values shape this method's results (a resume under others is refused)."""
        return (cls.section or cls.name, "budget", "batchnorm")

    # -- the model ------------------------------------------------------------------------------
    def plan(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        """A copy of the float model (the model itself with ``inplace``) with foreign parametrizations
        folded, and the coverage decided."""
        model = unwrap_compiled(float_model)
        if not inplace:
            model = bayes.copy_model(model)
        self.folded = bayes.fold_parametrizations(model)
        for item in self.folded:
            log.warning("%s: folded %s into a plain parameter: its effective value is what gets fixed, and the "
                        "point model holds it as a plain weight", self.name, item)
        q = self.cfg.quantise
        self.norm_biases = fold_norm_biases(model) if q.fold_norm_biases else []
        for item in self.norm_biases:
            log.info("%s: folded %s (a bias in front of a BatchNorm, which cancels it, moved into the norm's "
                     "running mean; the function is unchanged; quantise.fold_norm_biases=false keeps it)",
                     self.name, item)
        self.coverage = plan(model, quantise_norms=self.quantise_norms, include=q.include, exclude=q.exclude,
                             norms_option=f"{self.section_name}.quantise_norms")
        if not self.coverage.names:
            left = "; ".join(f"{t.name}: {t.reason}" for t in self.coverage.left_float[:3])
            raise ModelError(f"{self.name}: the model has no quantisable tensor (no floating-point parameter is chosen"
                             + (f"; {left}" if left else "") + "); nothing to fix")
        if q.strict:
            self.coverage.require_complete(self.name)
        return model

    def coverage_report(self) -> dict[str, Any]:
        """The report's ``coverage`` section: what is fixed, what stays float, and what was folded first."""
        if self.coverage is None:
            raise ModelError("prepare() must run before coverage_report()")
        return {**self.coverage.summary(), "folded_parametrizations": list(self.folded),
                "folded_norm_biases": list(self.norm_biases)}

    def prepare(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        """The model this method fixes (default: the planned copy itself)."""
        return self.plan(float_model, inplace)

    def view(self, model: nn.Module) -> QuantView:
        if self.coverage is None:
            raise ModelError("prepare() must run before view()")
        return QuantView(model, self.coverage.names)

    def point_model(self, model: nn.Module) -> nn.Module:
        """The plain point-estimate copy of the fixed ``model``."""
        return bayes.copy_model(model)

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse a model with no trainable parameter when this method trains between rounds."""
        trains = self.pre_epochs() > 0 or self.round_epochs() > 0
        if trains and not any(p.requires_grad for p in model.parameters()):
            raise ModelError(
                f"every parameter of the model is frozen (requires_grad=False), so {self.name}'s training between "
                f"rounds has nothing to train. Unfreeze the parameters to train, or fix without retraining: "
                + self.no_training_hint())

    def no_training_hint(self) -> str:
        """The settings that turn this method's training off."""
        return setting(f"{self.section_name}.round_epochs", 0)

    def bind_data(self, dataset_size: Optional[int]) -> None:
        """The training-set size (None: unknown), before the first round."""
        self.dataset_size = None if dataset_size is None else int(dataset_size)

    # -- fixing ---------------------------------------------------------------------------------
    def engine_config(self) -> EngineConfig:
        raise NotImplementedError

    def tolerance(self, view: QuantView, round_index: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fractions(self) -> list[float]:
        return list(self.settings.fractions)

    def fix(self, view: QuantView, round_index: int, fraction: float, engine_config: EngineConfig,
            engine: Callable = fix_round) -> FixResult:
        """One fixing round on the view's flat values: ``(values, fixed, sigma or None, summary)``.

        ``engine`` is the greedy round (``pwfn.core.engine.fix_round`` unless the caller passes another).
        """
        values, fixed = view.values(), view.fixed()
        sigma = view.sigmas() if view.has_sigma else None
        result = engine(values, self.tolerance(view, round_index), fixed, fraction, sigma=sigma,
                        config=self.cautious_engine(engine_config))
        return result.values, result.fixed, result.sigma if sigma is not None else None, result.summary

    def refresh_posterior(self, model: nn.Module, view: QuantView, loader: Any, device: Any, task: Any,
                          adapter: Any) -> Optional[dict]:
        """Before a round: update the free weights' uncertainty from data (default: nothing, None)."""
        return None

    def set_caution(self, level: int) -> bool:
        """Make :meth:`fix` ``level`` steps more cautious than configured (0: as configured; PWFN halves
        k per level, WFN delta). Returns False (and changes nothing) when the method cannot be that
        cautious; the default knows level 0 only."""
        return level == 0

    def caution_text(self) -> str:
        """The current caution level in the method's own terms (``k = 0.5``), for logs and errors."""
        return "as configured"

    #: the caution levels' last step turned the engine's zero pass off (see :meth:`cautious_engine`)
    no_zero_pass: bool = False

    def cautious_engine(self, engine_config: EngineConfig) -> EngineConfig:
        """The engine settings of the current caution level: as given, or without the zero pass (``zero_fix``:
        every weight below 2^-b joins zero whatever its tolerance) once the method's own tolerance is as small
        as it goes; the built-in methods' last caution level."""
        return dataclasses.replace(engine_config, zero_fix=False) if self.no_zero_pass else engine_config

    # -- training between rounds ----------------------------------------------------------------
    def pre_epochs(self) -> float:
        return 0.0

    def round_epochs(self) -> float:
        return float(self.settings.round_epochs)

    def optimizer(self, model: nn.Module, view: QuantView,
                  previous: Optional[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def grad_clip(self) -> Optional[float]:
        return self.settings.grad_clip

    def clip_parameters(self, model: nn.Module) -> Optional[list]:
        """The tensors gradient clipping sees (None: all of the model's)."""
        return None

    def extra_loss(self, view: QuantView) -> Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
        """The method's term added to the task loss, as ``f(model, task_loss) -> tensor`` (None: none)."""
        return None

    def set_training_steps(self, steps: Optional[int]) -> None:
        """The optimizer steps of the training phase about to start (None: unknown)."""

    def wants_training_steps(self) -> bool:
        """Whether the method's training depends on knowing each phase's steps (PWFN's budget-aware regulariser)."""
        return False

    def divergence_tips(self) -> list[str]:
        """Settings to turn when this method's training diverges, besides lr and grad_clip."""
        return []

    def contract_tip(self) -> str:
        """What to change in this method when the accuracy contract cannot be kept."""
        return "fix with smaller tolerances from the start"

    # -- evaluation and reports -----------------------------------------------------------------
    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sigma_summary(self, model: nn.Module) -> Optional[dict]:
        return None


def build_method(method: Any, cfg: RunConfig) -> Method:
    """The method object for ``method``: a registered name (``"pwfn"``) or a :class:`Method` subclass."""
    if isinstance(method, type) and issubclass(method, Method):
        if not method.name:
            raise ConfigError(f"{method.__qualname__} has no name: register it with @register_method(name)")
        return method(cfg)
    return get_method(method)(cfg)
