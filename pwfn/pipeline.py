"""End to end: float baseline -> PWFN or WFN fixing rounds -> evaluation, report, point model.

One loop serves both methods; what differs (the model they fix, the tolerance, the centre set,
the optimizer and the training objective) lives in two small strategy classes. A run writes
into its folder: ``config.yaml``, ``metrics.jsonl`` (one row per round), ``report.json``,
``checkpoint.pt`` (after every completed round, for resume) and the point-estimate model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

import bayes

from . import metrics as M
from .config import METHODS as _METHOD_NAMES
from .config import RunConfig, config_diff, config_to_dict, dump_config
from .coverage import Coverage, plan
from .distributed import (
    ContiguousShard,
    DistContext,
    GlobalBatchShard,
    init_distributed,
)
from .engine import EngineConfig, fix_round
from .errors import (
    CheckpointError,
    ConfigError,
    ModelError,
    PwfnError,
    TrainingDivergedError,
)
from .fixer import Fixer
from .io import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    load_state_dict_strict,
    remove_stale_temp_files,
    save_checkpoint,
    to_jsonable,
    write_jsonl,
)
from .lock import RunLock, acquire, check_free
from .manifest import (
    data_fingerprint,
    file_fingerprint,
    load_manifest,
    model_fingerprint,
    new_manifest,
    quantised_tensors,
    read_point_model,
    read_report,
    refuse_changed_inputs,
    regular_file_problem,
    splits_fingerprint,
    write_manifest,
    write_point_model,
)
from .models import create_model
from .plumbing import QuantView
from .regularizers import cluster_attraction, unfixed_values
from .report import format_table  # the comparison table lives in the torch-free report module
from .runlog import open_tensorboard, round_line, write_metrics_csv
from .schedules import Schedule, pwfn_schedule, tolerance_for_round, wfn_schedule
from .tasks import (
    BatchAdapter,
    ClassificationTask,
    CustomTask,
    Task,
    map_tensors,
    resolve_task,
    to_device,
)
from .train import (
    EpochCounter,
    evaluate,
    first_nonfinite_weight,
    make_optimizer,
    predict_mc,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    train_epochs,
)

log = logging.getLogger(__name__)

METHODS = tuple(_METHOD_NAMES)


# --------------------------------------------------------------------------------------------
# strategies


class _Strategy:
    name: str

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.coverage: Optional[Coverage] = None
        self.folded: list[str] = []

    @property
    def quantise_norms(self) -> bool:
        return bool(getattr(self.cfg, self.name).quantise_norms)

    def plan(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        """A copy of the float model (the model itself with ``inplace``) with foreign parametrizations
        folded, and the coverage decided."""
        model = _unwrap_compiled(float_model)
        if not inplace:
            model = bayes.copy_model(model)
        self.folded = bayes.fold_parametrizations(model)
        for item in self.folded:
            log.warning("%s: folded %s into a plain parameter: its effective value is what gets fixed, and the "
                        "point model holds it as a plain weight", self.name, item)
        q = self.cfg.quantise
        self.coverage = plan(model, quantise_norms=self.quantise_norms, include=q.include, exclude=q.exclude,
                             norms_option=f"{self.name}.quantise_norms")
        if not self.coverage.names:
            left = "; ".join(f"{t.name}: {t.reason}" for t in self.coverage.left_float[:3])
            raise ModelError(f"{self.name}: the model has no quantisable tensor (no floating-point parameter is chosen"
                             + (f"; {left}" if left else "") + "); nothing to fix")
        if q.strict:
            self.coverage.require_complete(self.name)
        return model

    def prepare(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        raise NotImplementedError

    def view(self, model: nn.Module) -> QuantView:
        if self.coverage is None:
            raise ModelError("prepare() must run before view()")
        return QuantView(model, self.coverage.names)

    def engine_config(self) -> EngineConfig:
        raise NotImplementedError

    def tolerance(self, view: QuantView, round_index: int) -> torch.Tensor:
        raise NotImplementedError

    def fix(self, view: QuantView, round_index: int, fraction: float, engine_config: EngineConfig,
            engine: Callable = fix_round):
        """One fixing round on the view's flat values: ``(values, fixed, sigma or None, summary)``.

        ``engine`` is the greedy round (``pwfn.engine.fix_round``; the Fixer passes its own reference).
        """
        values, fixed = view.values(), view.fixed()
        sigma = view.sigmas() if view.has_sigma else None
        result = engine(values, self.tolerance(view, round_index), fixed, fraction, sigma=sigma,
                        config=engine_config)
        return result.values, result.fixed, result.sigma if sigma is not None else None, result.summary

    @property
    def fractions(self) -> list[float]:
        raise NotImplementedError

    def pre_epochs(self) -> float:
        return 0.0

    def round_epochs(self) -> float:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, view: QuantView, previous: Optional[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def grad_clip(self) -> Optional[float]:
        raise NotImplementedError

    def extra_loss(self, view: QuantView) -> Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
        return None

    def eval_context(self, model: nn.Module):
        return contextlib.nullcontext()

    def sigma_summary(self, model: nn.Module) -> Optional[dict]:
        return None


def effective_steps(steps: float, momentum: float) -> float:
    """How far ``steps`` SGD steps with heavy-ball ``momentum`` move a parameter under a constant gradient,
    in steady-state steps (``lr * g / (1 - m)`` each): ``sum_{t=1..S} (1 - m^t) = S - m (1 - m^S) / (1 - m)``.

    Why: the budget-aware regulariser scales ``lam`` by ``effective(reference) / effective(steps)``,
    so a 10-step round (in which momentum has not yet built up) moves sigma as far as a long one.
    """
    s = float(steps)
    if momentum <= 0:
        return s
    return max(s - momentum * (1.0 - momentum**s) / (1.0 - momentum), 1e-12)


#: the PWFN paper's SGD learning rate, the reference of the budget-aware regulariser
PAPER_LR = 1e-3

#: ``pwfn.scale: tensor`` shifts a tensor for the engine only when its mean |mu| is above 2^REFERENCE_EXP,
#: about the mean |w| of the papers' trained ImageNet networks (std 0.02-0.05)
REFERENCE_EXP = -5


def _budget_on(cfg: RunConfig) -> bool:
    b = getattr(cfg, "budget", None)
    return b is not None and any(getattr(b, k) is not None
                                 for k in ("max_values", "max_entropy_bits", "max_values_per_tensor"))


def _phase_steps(loader, epochs: float) -> Optional[int]:
    """SGD steps ``train_epochs`` takes for ``epochs`` over ``loader`` (None for an unsized loader)."""
    try:
        per_epoch = len(loader)
    except TypeError:
        return None
    return max(1, math.ceil(epochs * per_epoch)) if per_epoch and epochs > 0 else None


def _engine_config(settings, *, signed_terms: bool, **extra: Any) -> EngineConfig:
    return EngineConfig(b=settings.b, max_order=settings.max_order, signed_terms=signed_terms,
                        zero_fix=settings.zero_fix, inc=settings.inc, **extra)


class PWFNStrategy(_Strategy):
    """Bayesian model; tolerance k*sigma; positive-term centres; SGD kept across rounds."""

    name = "pwfn"

    #: momentum-weighted SGD steps of the training phase in progress (None: unknown, lam unscaled)
    phase_steps: Optional[int] = None

    def _unit(self, mu: torch.Tensor) -> float:
        """What 1.0 of `sigma_init_scale`, `sigma_init_max`, `tau`, `laplace_prior` means for this tensor."""
        return bayes.tensor_scale(mu) if self.cfg.pwfn.scale == "tensor" else 1.0

    def prepare(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        p = self.cfg.pwfn
        unit = self._unit

        def init(mu: torch.Tensor) -> torch.Tensor:  # the config's rule and constants, in `scale` units
            u = unit(mu)
            if u <= 0:  # an all-zero tensor: nothing to scale by
                return torch.full_like(mu, p.sigma_floor)
            if p.sigma_init == "power_of_two":
                return bayes.power_of_two_sigma(mu, scale=p.sigma_init_scale * u, ceiling=p.sigma_init_max * u,
                                                floor=p.sigma_floor)
            if p.sigma_init == "constant":
                return bayes.constant_sigma(mu, p.sigma_init_scale * u, floor=p.sigma_floor)
            return bayes.moped_sigma(mu, p.sigma_init_scale, floor=p.sigma_floor)  # already relative to |mu|

        model = self.plan(float_model, inplace)
        try:
            model = bayes.bayesianize(model, params=self.coverage.names, sigma_init=init, sigma_floor=p.sigma_floor,
                                      mode=p.forward_mode, inplace=True)
        except bayes.ConversionError as exc:
            raise ModelError(f"cannot make the model Bayesian: {exc}") from exc
        # each tensor's unit, fixed at the start (mu moves later): per-tensor tau and Laplace prior
        self.units = {slot.name: unit(slot.value) for slot in QuantView(model, self.coverage.names).slots}
        if p.posterior == "laplace":  # sigma comes from the curvature, never from training
            for prm in bayes.sigma_parameters(model):
                prm.requires_grad_(False)
        return model

    def engine_config(self) -> EngineConfig:
        """The engine's settings; with tensors shifted down (``shift_exponents`` < 0) ``b`` is what the reports
        and exports need (the engine itself runs each round at ``pwfn.engine.b`` in the shifted space)."""
        p = self.cfg.pwfn
        cfg = _engine_config(p.engine, signed_terms=False, sigma_update=p.sigma_update,
                             sigma_divisor=p.sigma_divisor, sigma_floor=p.sigma_floor)
        lowest = min(self.shift_exponents().values(), default=0)
        return dataclasses.replace(cfg, b=cfg.b - lowest) if lowest < 0 else cfg

    def shift_exponents(self) -> dict[str, int]:
        """``scale: tensor``: each tensor's power-of-two shift ``e_T >= 0`` for the engine (empty otherwise).

        A tensor whose mean |mu| is ``s_T`` is fixed as ``values / 2^e_T`` with ``e_T =
        round(log2(s_T / 2^REFERENCE_EXP))``, then multiplied back: its codebook grid (smallest term
        ``2^-b``) and zero threshold sit at the same place relative to its own scale, so scaling the
        tensor by ``2^k`` gives exactly the same engine input and its fixed values scale by exactly
        ``2^k``. The values stay sums of the same number of powers of two (terms down to
        ``2^-(b - e_T)``; ``e_T >= b - 24`` keeps them within what run files record). Tensors near the
        reference scale (the papers' networks) are not shifted. Budget mode (its allowed values are
        absolute) turns the shift off.
        """
        if self.cfg.pwfn.scale != "tensor" or _budget_on(self.cfg):
            return {}
        low = self.cfg.pwfn.engine.b - 24
        out = {}
        for name, unit in getattr(self, "units", {}).items():
            if unit > 0:
                out[name] = max(low, int(round(math.log2(unit) - REFERENCE_EXP)))
        return {k: v for k, v in out.items() if v != 0}

    def fix(self, view: QuantView, round_index: int, fraction: float, engine_config: EngineConfig,
            engine: Callable = fix_round):
        shifts = self.shift_exponents()
        if not shifts:
            return super().fix(view, round_index, fraction, engine_config, engine)
        dtype, dev = view.slots[0].value.dtype, view.slots[0].value.device
        factor = torch.cat([torch.full((sl.numel,), 2.0 ** -shifts.get(sl.name, 0), dtype=dtype, device=dev)
                            for sl in view.slots])  # exact powers of two: scaling is exact
        values, fixed, sigma = view.values(), view.fixed(), view.sigmas()
        tol = self.tolerance(view, round_index)
        base = dataclasses.replace(engine_config, b=self.cfg.pwfn.engine.b)  # the grid of the shifted space
        result = engine(values * factor, tol * factor, fixed, fraction, sigma=sigma * factor, config=base)
        summary = dict(result.summary)
        summary["tensor_shift_exponents"] = dict(shifts)
        return result.values / factor, result.fixed, result.sigma / factor, summary

    def tolerance(self, view: QuantView, round_index: int) -> torch.Tensor:
        sigma = view.sigmas().clamp_min(self.cfg.pwfn.sigma_floor)
        return tolerance_for_round(self.schedule, round_index, sigma=sigma)

    @functools.cached_property
    def schedule(self) -> Schedule:
        return pwfn_schedule(self.cfg.pwfn.k, self.cfg.pwfn.fractions)

    @property
    def fractions(self) -> list[float]:
        return self.cfg.pwfn.fractions

    def pre_epochs(self) -> float:
        return self.cfg.pwfn.first_round_epochs

    def round_epochs(self) -> float:
        return self.cfg.pwfn.round_epochs

    def optimizer(self, model, view, previous):
        if previous is not None:
            return previous
        p = self.cfg.pwfn
        sigmas = bayes.sigma_parameters(model)
        sigma_ids = {id(prm) for prm in sigmas}
        mus = [prm for prm in model.parameters() if id(prm) not in sigma_ids]
        # weight decay pulls mu towards 0 as in the paper; on sigma it would fight the regulariser.
        groups = [{"params": mus, "weight_decay": p.weight_decay}]
        if p.posterior == "trained":
            groups.append({"params": sigmas, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum)

    def grad_clip(self):
        return self.cfg.pwfn.grad_clip

    def clip_parameters(self, model: nn.Module):
        """The parameters gradient clipping sees: all (the paper's, ``clip_sigma``) or all but sigma."""
        if self.cfg.pwfn.clip_sigma:
            return None
        sigma_ids = {id(prm) for prm in bayes.sigma_parameters(model)}
        return [prm for prm in model.parameters() if id(prm) not in sigma_ids]

    def lam_factor(self) -> float:
        """How much the budget-aware regulariser multiplies ``lam`` by in the phase in progress."""
        ref = self.cfg.pwfn.sigma_steps_reference
        if ref is None or not self.phase_steps:
            return 1.0
        m = self.cfg.pwfn.momentum
        # the reference is the paper's round: `ref` steps at lr 1e-3; a larger lr already moves sigma further
        return effective_steps(ref, m) / effective_steps(self.phase_steps, m) * (PAPER_LR / self.cfg.pwfn.lr)

    def extra_loss(self, view):
        p = self.cfg.pwfn
        frozen = view.frozen_sigma_masks()
        if p.posterior == "laplace":
            return None
        if p.objective == "regulariser":
            lam = p.lam * self.lam_factor()
            units = self.units if p.scale == "tensor" else None
            return lambda model, ce: bayes.sigma_regularizer(model, tau=p.tau, lam=lam, frozen=frozen,
                                                             tau_scale=units)
        n = self._dataset_size
        return lambda model, ce: bayes.kl_divergence(model, prior_sigma=p.prior_sigma, dataset_size=n, frozen=frozen)

    _dataset_size: Optional[int] = None

    @torch.no_grad()
    def _write_free_sigma(self, view: QuantView, sigma: dict[str, torch.Tensor]) -> None:
        for slot in view.slots:
            if slot.name in sigma and slot.sigma is not None:
                mask = view._mask(slot)
                slot.sigma.copy_(torch.where(mask, slot.sigma, sigma[slot.name].to(slot.sigma)))

    def laplace_update(self, model: nn.Module, view: QuantView, loader, device, task, adapter,
                       dataset_size: Optional[int]) -> dict[str, float]:
        """``posterior: laplace``: every free weight's sigma from a diagonal Laplace posterior at mu.

        The empirical Fisher of the per-example loss is estimated from ``laplace_batches`` training
        batches as ``B * g_B^2`` (``g_B`` a batch-mean gradient at the posterior mean, eval mode), and
        sigma = 1 / sqrt(N F + 1 / prior^2) with the prior ``laplace_prior`` in ``scale`` units.
        Fixed weights keep their sigma. Returns a small summary.
        """
        p = self.cfg.pwfn
        slots = [sl for sl in view.slots if sl.sigma is not None]
        fisher = {sl.name: torch.zeros_like(sl.value, dtype=torch.float64) for sl in slots}
        was_training = model.training
        model.eval()
        batches = 0
        n_seen = 0
        try:
            with bayes.forward_mode(model, "mean"), torch.enable_grad():
                for batch in loader:
                    x, y = adapter.split(to_device(batch, device, non_blocking=True))
                    out = adapter.call(model, x).float()
                    loss = task.loss(out, y)
                    n = int(adapter.size(y))
                    grads = torch.autograd.grad(loss, [sl.value for sl in slots], allow_unused=True)
                    for sl, g in zip(slots, grads):
                        if g is not None:
                            fisher[sl.name] += g.detach().to(torch.float64).square() * n
                    batches += 1
                    n_seen += n
                    if batches >= p.laplace_batches:
                        break
        finally:
            model.train(was_training)
        if batches == 0:
            raise ConfigError("pwfn.posterior=laplace needs at least one training batch")
        size = int(dataset_size) if dataset_size else n_seen
        sigma = {}
        for sl in slots:
            prior = p.laplace_prior * self.units.get(sl.name, 1.0) if p.scale == "tensor" else p.laplace_prior
            sigma[sl.name] = bayes.laplace_sigma(fisher[sl.name] / batches, size, max(prior, p.sigma_floor),
                                                 floor=p.sigma_floor)
        self._write_free_sigma(view, sigma)
        free = ~view.fixed()
        s = view.sigmas()[free]
        return {"batches": batches, "dataset_size": size,
                "mean_sigma_free": float(s.mean()) if s.numel() else float("nan")}

    def eval_context(self, model):
        return bayes.forward_mode(model, "mean")

    def sigma_summary(self, model):
        return bayes.summarize_sigma(model)


class WFNStrategy(_Strategy):
    """Point model; tolerance delta_t*|w|; signed-term centres; fresh Adam every round."""

    name = "wfn"

    @property
    def settings(self):
        """This method's config section (``cfg.wfn``; a subclass reads its own)."""
        return getattr(self.cfg, self.name)

    def prepare(self, float_model: nn.Module, inplace: bool = False) -> nn.Module:
        return self.plan(float_model, inplace)

    def engine_config(self) -> EngineConfig:
        return _engine_config(self.settings.engine, signed_terms=True, sigma_update="keep")

    def tolerance(self, view: QuantView, round_index: int) -> torch.Tensor:
        return tolerance_for_round(self.schedule, round_index, values=view.values())

    @functools.cached_property
    def schedule(self) -> Schedule:
        return wfn_schedule(self.settings.delta, self.settings.fractions)

    @property
    def fractions(self) -> list[float]:
        return self.settings.fractions

    def round_epochs(self) -> float:
        return self.settings.round_epochs

    def optimizer(self, model, view, previous):
        return torch.optim.Adam(model.parameters(), lr=self.settings.lr)

    def grad_clip(self):
        return self.settings.grad_clip

    def extra_loss(self, view):
        return _attraction_loss(self.settings, view)


def _attraction_loss(w, view: QuantView):
    """WFN's "cosy up to clusters" term for the settings section ``w`` (None before any value is fixed)."""
    values, fixed = view.values(), view.fixed()
    centres = torch.unique(values[fixed])
    if centres.numel() == 0 or w.reg_ratio == 0:
        return None
    pairs = view.parameters_with_masks()

    def loss(model: nn.Module, ce: torch.Tensor) -> torch.Tensor:
        free = unfixed_values(pairs)
        if free is None:
            return ce * 0.0
        reg = cluster_attraction(free, centres, temperature=w.reg_temperature)
        # rescaled every step so the term is reg_ratio x the cross-entropy
        scale = w.reg_ratio * ce.detach() / reg.detach().clamp_min(1e-12)
        return scale * reg

    return loss


class PublishedWFNStrategy(WFNStrategy):
    """WFN's training between rounds with the published WFN clustering (ALGORITHM.md 2b) instead of
    pwfn's greedy: ``pwfn.wfn_published.published_wfn_round``; settings in ``cfg.wfn_published``."""

    name = "wfn_published"

    def engine_config(self) -> EngineConfig:
        # the clustering's smallest term is 2^-(8 + order), at most 2^-24: reports count terms down to it
        e = self.settings.engine
        return EngineConfig(b=24, max_order=32, signed_terms=True, zero_fix=e.zero_fix, inc=e.inc,
                            sigma_update="keep")

    def fix(self, view, round_index, fraction, engine_config, engine=None):
        # its own clustering: ``engine`` is not used
        from .wfn_published import published_wfn_round

        values, fixed, summary = published_wfn_round(view.values(), view.fixed(),
                                                     self.schedule.delta_for_round(round_index), fraction)
        return values, fixed, None, summary


STRATEGIES = {"pwfn": PWFNStrategy, "wfn": WFNStrategy, "wfn_published": PublishedWFNStrategy}


def divergence_advice(cfg: RunConfig, section: str) -> str:
    """Which settings to turn when training under ``section`` ("baseline", "pwfn", "wfn") diverges."""
    s = getattr(cfg, section)
    tips = [f"lower the learning rate (--set {section}.lr=..., now {s.lr:g})"]
    if section == "pwfn":
        tips.append(f"raise the sigma floor (--set pwfn.sigma_floor=..., now {s.sigma_floor:g})")
    clip = "off" if s.grad_clip is None else f"{s.grad_clip:g}"
    tips.append(f"clip gradients harder (--set {section}.grad_clip=..., now {clip})")
    return "To fix it, " + ", ".join(tips[:-1]) + " or " + tips[-1] + "."


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(model)``: fixing works on it (compile the point model again after)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        log.info("fixing the module inside torch.compile(...): its state_dict keys have no '_orig_mod.' prefix")
        return inner
    return model


def check_model(method: str, cfg: RunConfig, float_model: nn.Module) -> nn.Module:
    """Everything about ``float_model`` that would stop ``method`` later, checked before anything is written.

    Models without a (non-empty) quantisable tensor are refused; shared and tied tensors are fixed once. Frozen
    parameters (``requires_grad=False``) are quantised like the others but never trained, by
    both methods; a model with no trainable parameter at all is refused unless the method's
    training epochs are 0 (fixing without retraining). Zero-sized tensors hold no weight and
    are skipped. Leaves the RNG state untouched. Returns the model ``method`` would fix.
    """
    _check_float_model(float_model)
    strategy = STRATEGIES[method](cfg)
    state = rng_state()
    try:
        model = strategy.prepare(float_model)
        strategy.view(model)
    finally:
        set_rng_state(state)
    _check_trainable(method, strategy, model)
    return model


def load_run_checkpoint(ckpt: Path, method: str, device: Any = "cpu") -> dict:
    """A method's ``checkpoint.pt``, checked; a damaged or foreign one raises ``CheckpointError`` saying what to do."""
    try:
        state = load_checkpoint(ckpt, kind=f"run-{method}", map_location=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Cannot resume {method} from it: restore the file, or start this method "
                              "over with --fresh (or delete the file)") from exc
    missing = [k for k in ("next_round", "model", "epoch_counter", "history", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{str(ckpt)!r} lacks {missing}: it was not written by this version of pwfn; "
                              "start this method over with --fresh")
    return state


def _check_float_model(float_model: nn.Module) -> None:
    bad = first_nonfinite_weight(float_model)
    if bad is not None:
        raise ModelError(f"the model to fix is not finite: {bad}. Fix the float model (or its checkpoint) first")


def _check_trainable(method: str, strategy: _Strategy, model: nn.Module) -> None:
    trains = strategy.pre_epochs() > 0 or strategy.round_epochs() > 0
    if trains and not any(p.requires_grad for p in model.parameters()):
        raise ModelError(
            f"every parameter of the model is frozen (requires_grad=False), so {method}'s training between "
            f"rounds has nothing to train. Unfreeze the parameters to train, or fix without retraining: "
            + ("--set pwfn.first_round_epochs=0 --set pwfn.round_epochs=0" if method == "pwfn"
               else "--set wfn.round_epochs=0")
        )


# --------------------------------------------------------------------------------------------
# metrics of a (partly) fixed network


def quant_metrics(view: QuantView, b: int, signed_terms: bool) -> dict[str, Any]:
    """Unique values, entropy (with and without zero), order shares and codebook of the fixed weights."""
    values, fixed = view.values(), view.fixed()
    fv = values[fixed]
    out: dict[str, Any] = {"fixed_fraction": float(fixed.float().mean()), "n_weights": view.numel}
    if fv.numel() == 0:
        return out
    out.update(
        unique=M.unique_count(fv, include_zero=True),
        unique_nonzero=M.unique_count(fv, include_zero=False),
        entropy=M.entropy_bits(fv, include_zero=True),
        entropy_nonzero=M.entropy_bits(fv, include_zero=False),
        order_shares={str(k): v for k, v in M.order_shares(M.term_counts(fv, b=b, signed_terms=signed_terms)).items()},
    )
    cb, counts = M.codebook(fv)
    out["codebook"] = [float(v) for v in cb.tolist()]
    out["codebook_counts"] = [int(c) for c in counts.tolist()]
    return out


# --------------------------------------------------------------------------------------------
# the fixing run


@dataclass
class FixingResult:
    """What :func:`compress` returns: the fixed model, its plain copy, the report and the rounds.

    ``model`` is the fixed model as trained (Bayesian layers for PWFN, with the fixed masks);
    ``point_model`` holds plain torch layers with every quantised weight on the codebook;
    ``report`` is what ``report.json`` holds; ``history`` the per-round rows of ``metrics.jsonl``.
    """

    method: str
    model: nn.Module  # the fixed model (Bayesian for PWFN, with masks)
    point_model: nn.Module  # plain layers, no masks
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class FixingRun:
    """Round-by-round fixing of one model with one method, resumable from its folder."""

    def __init__(
        self,
        method: str,
        cfg: RunConfig,
        float_model: nn.Module,
        train_loader,
        val_loader,
        test_loader=None,
        *,
        device: Optional[torch.device] = None,
        run_dir: Optional[Union[str, Path]] = None,
        recipe: Optional[dict] = None,
        on_round_end: Optional[Callable[[int], None]] = None,
        dist: Optional[DistContext] = None,
        inputs: Optional[dict] = None,
        task: Optional[Union[str, Task]] = None,
        adapter: Optional[BatchAdapter] = None,
    ) -> None:
        if method not in STRATEGIES:
            raise ConfigError(f"unknown method {method!r}; choose one of {list(STRATEGIES)}")
        self.method = method
        self.cfg = cfg
        self.strategy = STRATEGIES[method](cfg)
        self.float_model = float_model
        self.train_loader = train_loader
        self.val_loader = val_loader if val_loader is not None else test_loader
        self.test_loader = test_loader if test_loader is not None else val_loader
        if self.val_loader is None:
            raise ConfigError("an evaluation loader (val or test) is required")
        self.dist = dist or DistContext(device=device or resolve_device(cfg.device))
        self.device = device or self.dist.device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"run_dir {str(self.run_dir)!r} is a file, not a folder: choose another run_dir")
        self.recipe = recipe
        self.on_round_end = on_round_end
        self.task = resolve_task(task if task is not None else cfg.task)
        self.adapter = adapter or BatchAdapter()
        self.fixer: Optional[Fixer] = None
        # fingerprints of the inputs (data, model.checkpoint) a config run computed; a Python-API
        # run fingerprints its loaders itself. The float model's are added when the run starts.
        self._given_inputs = inputs
        self.inputs: dict[str, Any] = {}
        self._lock: Optional[RunLock] = None
        self._manifest: Optional[dict] = None
        self._previous_manifest: Optional[dict] = None
        if method == "pwfn" and cfg.pwfn.objective == "elbo" and _dataset_size(train_loader) is None:
            # without it the KL would not be scaled per example and would swamp the cross-entropy
            raise ConfigError("pwfn.objective=elbo scales the KL by the training-set size, but the train loader has "
                              "no sized .dataset; use a DataLoader over a sized dataset, or objective=regulariser")
        self._rounds_done = 0

    # -- helpers ----------------------------------------------------------------------------
    def _eval(self, model: nn.Module, loader) -> dict[str, float]:
        with self.strategy.eval_context(model):
            return evaluate(model, loader, self.device, self.dist, self.task, self.adapter)

    def _checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    def _save(self, model, optimizer, counter, history, next_round, pre_metrics) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        # every rank checks (weights are identical across ranks) so all raise together, none hangs
        bad = first_nonfinite_weight(model)
        if bad is not None:  # never replace a good checkpoint with a broken model
            raise TrainingDivergedError(f"{self.method}: refusing to checkpoint a non-finite model: {bad}. "
                                        f"{divergence_advice(self.cfg, self.method)} {self._kept_note()}")
        if not self.dist.is_main:  # rank 0 writes; the others wait so nobody runs ahead of a checkpoint
            self.dist.barrier()
            return
        save_checkpoint(
            path,
            {
                "method": self.method,
                "next_round": next_round,
                "model": model.state_dict(),
                "masks": self._view.mask_state(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "epoch_counter": counter.value,
                "history": history,
                "pre_metrics": pre_metrics,
                "rng": rng_state(),
                "fractions": self.strategy.fractions,
                "config": config_to_dict(self.cfg),
                "inputs": self.inputs,
            },
            kind=f"run-{self.method}",
        )
        write_jsonl(self.run_dir / "metrics.jsonl", history)
        write_metrics_csv(self.run_dir / "metrics.csv", history)
        self._rounds_done = next_round
        self.dist.barrier()

    def _kept_note(self) -> str:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return "No checkpoint of this method was written yet."
        return (f"The last good checkpoint {str(path)!r} ({self._rounds_done} of {len(self.strategy.fractions)} "
                "rounds done) is kept unchanged; a changed setting starts the method over (--fresh, or "
                "another --set name=...).")

    def _train(self, train_model, model, optimizer, epochs, counter, desc):
        s, fixer = self.strategy, self.fixer
        assert fixer is not None
        fixer.set_training_steps(_phase_steps(self.train_loader, epochs))  # PWFN's budget-aware regulariser
        clip_params = fixer.clip_parameters()
        try:
            # fixed entries stay exact through the Fixer's gradient and optimizer-step hooks
            return train_epochs(train_model, self.train_loader, optimizer, epochs, self.device, counter=counter,
                                extra_loss=lambda _model, ce: fixer.loss_term(ce), grad_clip=s.grad_clip(),
                                clip_parameters=clip_params, desc=desc,
                                progress=self.cfg.progress and self.dist.is_main, dist=self.dist, inner=model,
                                bf16=self.cfg.precision == "bf16", advice=divergence_advice(self.cfg, self.method),
                                task=self.task, adapter=self.adapter, batchnorm=self.cfg.batchnorm)
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(f"{exc} {self._kept_note()}") from exc

    def _laplace(self) -> Optional[dict]:
        """``pwfn.posterior=laplace``: refresh the free weights' sigma from the curvature (None otherwise)."""
        s = self.strategy
        if not isinstance(s, PWFNStrategy) or self.cfg.pwfn.posterior != "laplace":
            return None
        return s.laplace_update(self.fixer.model, self._view, self.train_loader, self.device, self.task,
                                self.adapter, _dataset_size(self.train_loader))

    def _load_resume_state(self, ckpt: Path) -> dict:
        return load_run_checkpoint(ckpt, self.method, self.device)

    # -- main -------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> FixingResult:
        """Fix the model round by round (resuming from ``run_dir`` when it holds a checkpoint).

        With a ``run_dir`` the folder's lock is held from the first write to the end; a second
        writer fails at once. A resume whose inputs (data, float model, model.checkpoint) differ
        from the checkpoint's raises ``InputsChangedError`` naming them, before anything is written.
        """
        try:
            return self._run(resume)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _check_inputs(self) -> None:
        """Loaders yield batches the model accepts; fingerprint the data and the float model."""
        s = self.strategy
        trains = s.pre_epochs() > 0 or s.round_epochs() > 0
        first = {"train": check_first_batch(self.float_model, self.train_loader, self.device, "training loader",
                                            required=trains, task=self.task, adapter=self.adapter),
                 "val": check_first_batch(self.float_model, self.val_loader, self.device, "evaluation loader",
                                          required=True, task=self.task, adapter=self.adapter)}
        if self._given_inputs is not None:
            inputs = dict(self._given_inputs)
        else:
            inputs = {"data": data_fingerprint(self.train_loader, self.val_loader,
                                               self.test_loader if self.test_loader is not self.val_loader else None,
                                               first_batches=first)}
        inputs["model"] = model_fingerprint(self.float_model)
        self.inputs = inputs

    def _run(self, resume: bool) -> FixingResult:
        s = self.strategy
        started = time.perf_counter()
        _check_float_model(self.float_model)
        if self.run_dir is not None and self.dist.is_main:
            check_free(self.run_dir)  # another writer: fail now, before any work
        self._check_inputs()
        self._previous_manifest = _manifest_or_none(self.run_dir) if self.run_dir is not None else None
        # the Fixer prepares the model (and budget mode's allowed values) and keeps fixed values exact
        fixer = Fixer(self.float_model, self.method, self.cfg, device=self.device,
                      dataset_size=_dataset_size(self.train_loader))
        self.fixer, self.strategy = fixer, fixer.strategy
        s = self.strategy
        model, view = fixer.model, fixer.view
        self._view = view
        if self.dist.is_main:
            s.coverage.log(self.method)
        train_model = _wrap_ddp(model, self.dist)
        engine_cfg = fixer.engine_config
        self._budget = fixer.budget
        counter = EpochCounter()
        history: list[dict[str, Any]] = []
        optimizer: Optional[torch.optim.Optimizer] = None
        start_round = 0
        pre_metrics: dict[str, Any] = {}
        ckpt = self._checkpoint_path()

        if resume and ckpt is not None and ckpt.exists():
            state = self._load_resume_state(ckpt)
            _refuse_changed_config(state.get("config"), self.cfg, ckpt, RUN_SECTIONS[self.method])
            saved_inputs = state.get("inputs") or (self._previous_manifest or {}).get("inputs")
            refuse_changed_inputs(saved_inputs, self.inputs, ckpt, api=self._given_inputs is None)
            if not isinstance(state.get("masks"), dict):
                raise CheckpointError(f"{str(ckpt)!r} holds no fixed masks: it was written by an older pwfn; "
                                      "start this method over with --fresh")
            fixer.load_state_dict({"format": 1, "method": self.method, "round": int(state["next_round"]),
                                   "model": state["model"], "masks": state["masks"], "history": state["history"],
                                   "config": state.get("config") or config_to_dict(self.cfg)}, str(ckpt))
            optimizer = s.optimizer(model, view, None)
            if state.get("optimizer") is not None and self.method == "pwfn":
                optimizer.load_state_dict(state["optimizer"])
            counter.value = int(state["epoch_counter"])
            history = fixer.history
            pre_metrics = dict(state.get("pre_metrics") or {})
            start_round = int(state["next_round"])
            set_rng_state(state["rng"])
            self._rounds_done = start_round
            self._write_config(view, engine_cfg)
            if self.dist.is_main:  # the round log may lag the checkpoint when a run was killed between the two
                write_jsonl(ckpt.parent / "metrics.jsonl", history)
                write_metrics_csv(ckpt.parent / "metrics.csv", history)
            log.info("%s: resuming at round %d of %d from %s", self.method, start_round, len(s.fractions), ckpt)
        else:
            self._write_config(view, engine_cfg)
            optimizer = s.optimizer(model, view, None)
            pre_metrics = {"initial": self._eval(model, self.val_loader)}
            laplace = self._laplace()
            if laplace is not None:
                pre_metrics["laplace"] = laplace
            if s.pre_epochs() > 0:
                stats = self._train(train_model, model, optimizer, s.pre_epochs(), counter, f"{self.method} warm-up")
                pre_metrics["after_warmup"] = {**self._eval(model, self.val_loader), "train": stats}
            history = fixer.history
            self._save(model, optimizer, counter, history, 0, pre_metrics)

        fractions = s.fractions
        tb = open_tensorboard(self.cfg.tensorboard, self.run_dir, self.dist.is_main)
        for t in range(start_round, len(fractions)):
            t0 = time.perf_counter()
            frac = fractions[t]
            laplace = self._laplace() if t > 0 or start_round > 0 else None  # round 0: done before warm-up
            # one engine round on every rank; rank 0's result is broadcast so all ranks agree bit for bit
            row = fixer.fix_next(broadcast=self.dist.broadcast_ if self.dist.enabled else None).row
            fix_seconds = time.perf_counter() - t0
            log.debug("%s round %d: values+masks checksum %s (rank %d)", self.method, t + 1, row["checksum"],
                      self.dist.rank)
            if laplace is not None:
                row["laplace"] = laplace
            row["after_fix"] = self._eval(model, self.val_loader)
            if frac < 1.0 and s.round_epochs() > 0:
                optimizer = s.optimizer(model, view, optimizer)
                stats = self._train(train_model, model, optimizer, s.round_epochs(), counter,
                                    f"{self.method} round {t + 1}/{len(fractions)}")
                row["after_train"] = {**self._eval(model, self.val_loader), "train": stats}
            sig = s.sigma_summary(model)
            if sig is not None:
                row["sigma"] = sig
            row["fix_seconds"] = fix_seconds
            row["wall_seconds"] = time.perf_counter() - t0
            if self.dist.is_main:
                log.info("%s", round_line(self.method, row, len(fractions), self.task.primary))
            if tb is not None:
                tb.log_round(row)
            self._save(model, optimizer, counter, history, t + 1, pre_metrics)
            if self.on_round_end is not None:
                self.on_round_end(t)

        if tb is not None:
            tb.close()
        return self._finish(model, view, engine_cfg, history, pre_metrics, time.perf_counter() - started)

    def _write_config(self, view: QuantView, engine_cfg: EngineConfig) -> None:
        """The run folder's lock, config.yaml and manifest, once every check passed (a refused run
        changes nothing)."""
        if self.run_dir is not None and self.dist.is_main:
            if self._lock is None:
                self._lock = acquire(self.run_dir)
            remove_stale_temp_files(self.run_dir)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            self._manifest = new_manifest(
                method=self.method, engine=_engine_record(engine_cfg), recipe=self.recipe, inputs=self.inputs,
                quantised=quantised_tensors(view, self.strategy.coverage), config=config_to_dict(self.cfg))
            write_manifest(self.run_dir, self._manifest)

    def _finish(self, model, view, engine_cfg, history, pre_metrics, seconds) -> FixingResult:
        s = self.strategy
        if not bool(view.fixed().all()):
            raise ModelError(f"{self.method}: the final round left {int((~view.fixed()).sum())} weights unfixed")
        final: dict[str, Any] = {"test": self._eval(model, self.test_loader), "val": self._eval(model, self.val_loader)}
        final.update(quant_metrics(view, engine_cfg.b, engine_cfg.signed_terms))
        if self.method == "pwfn" and self.task.calibrated:  # MC calibration only where it means something
            probs, labels = predict_mc(model, self.test_loader, self.device, self.cfg.pwfn.mc_samples,
                                       seed=self.cfg.seed, dist=self.dist, adapter=self.adapter)
            final["mc"] = {
                "samples": self.cfg.pwfn.mc_samples,
                "nll": M.nll(probs, labels),
                "ece": M.expected_calibration_error(probs, labels),
                "top1": 100.0 * float((probs.argmax(1) == labels).float().mean()),
            }
        if self.method == "pwfn":
            final["sigma"] = s.sigma_summary(model)
        point = self.fixer.finalize() if self.fixer is not None else bayes.to_point_estimate(model)
        point_eval = evaluate(point, self.test_loader, self.device, self.dist, self.task, self.adapter)
        final["point_model_test"] = point_eval
        report = {
            "method": self.method,
            "fractions": s.fractions,
            "pre": pre_metrics,
            "rounds": history,
            "final": final,
            "task": self.task.describe(),
            "quantised_tensors": view.names(),
            "coverage": {**s.coverage.summary(), "folded_parametrizations": list(s.folded)},
            "seconds_this_session": seconds,
        }
        if getattr(self, "_budget", None) is not None:
            report["budget"] = self._budget.report(view)
        if self.run_dir is not None and self.dist.is_main:
            # point model, then the manifest that vouches for it, then the report
            record = save_point_model(point, self.run_dir, self.recipe, method=self.method, b=engine_cfg.b,
                                      signed_terms=engine_cfg.signed_terms, quantised_tensors=view.names(),
                                      codebook=final.get("codebook", []))
            manifest = dict(self._manifest or {})
            manifest.update(status="finished", codebook=final.get("codebook", []), point_model=record)
            write_manifest(self.run_dir, manifest)
            _carry_export_sections(report, self.run_dir, self._previous_manifest, record)
            atomic_write_json(self.run_dir / "report.json", to_jsonable(report))
        self.dist.barrier()
        return FixingResult(self.method, model, point, report, history)


#: config sections whose values shape each stage's results (a resume under other values is refused);
#: ``precision`` (bf16 autocast) trains the baseline and both methods differently
BASELINE_SECTIONS = ("seed", "precision", "data", "model", "baseline", "quantise", "task")
RUN_SECTIONS = {m: BASELINE_SECTIONS + (m, "budget", "batchnorm") for m in METHODS}


def _refuse_changed_config(saved: Optional[dict], cfg: RunConfig, path: Path, sections: tuple[str, ...]) -> None:
    if saved is None:
        return
    diff = config_diff(saved, config_to_dict(cfg), sections)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} in all)" if len(diff) > 6 else "")
        raise ConfigError(
            f"{path} was written under a different config ({shown}). Resuming would mix two runs: "
            "use --fresh to start over, or another name (--set name=...) to keep both"
        )


def _wrap_ddp(model: nn.Module, dist: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun, else ``model`` itself."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _dataset_size(loader) -> Optional[int]:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def save_point_model(model: nn.Module, folder: Path, recipe: Optional[dict], **description: Any) -> dict:
    """The point-estimate model as safetensors plus its checksummed description (recipe, tensor
    order, SHA-256; ``description`` adds method, b, codebook ...); returns the manifest's record."""
    from .export import shared_keys

    full = model.state_dict()
    shared = shared_keys(full)  # a tied tensor is stored once; the description records its other names
    state = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in shared}
    return write_point_model(folder, state, recipe, shared=shared, **description)


def _engine_record(engine_cfg: EngineConfig) -> dict[str, Any]:
    return {"b": int(engine_cfg.b), "max_order": int(engine_cfg.max_order), "signed_terms": bool(engine_cfg.signed_terms)}


def _manifest_or_none(folder: Path) -> Optional[dict]:
    """The folder's manifest, or None when it has none or it is unreadable (it is rewritten by this run)."""
    try:
        return load_manifest(folder)
    except PwfnError as exc:
        log.warning("%s; this run rewrites it", exc)
        return None


def _carry_export_sections(report: dict, folder: Path, previous: Optional[dict], record: dict) -> None:
    """A finished run rerun to the same point model keeps the size/export sections its export added."""
    old_pm = (previous or {}).get("point_model") or {}
    if old_pm.get("sha256") != record["sha256"] or not (folder / "report.json").exists():
        return
    try:
        old = read_report(folder / "report.json")
    except PwfnError:
        return
    for key in ("size", "export"):
        if key in old:
            report[key] = old[key]


def check_first_batch(model: nn.Module, loader, device, what: str, *, required: bool = True,
                      num_classes: Optional[int] = None, task: Optional[Task] = None,
                      adapter: Optional[BatchAdapter] = None) -> Optional[tuple]:
    """The loader's first batch, after checking that ``model`` accepts it and outputs enough classes.

    Raises ``ConfigError`` for an empty loader (when ``required``), a batch the model cannot take,
    or outputs and targets the ``task`` cannot work with (probability targets for the
    classification loss, labels beyond the model's outputs, per-token outputs for a classifier...),
    naming the problem and the option to use. ``adapter`` reads any batch layout (tuples, dicts).
    Leaves the RNG state, the loader's epoch and the model's mode and buffers as they were.
    """
    if loader is None:
        return None
    state = rng_state()
    epoch = getattr(loader, "epoch", None)
    try:
        try:
            batch = next(iter(loader), None)
        except PwfnError:
            raise
        except Exception as exc:  # a user loader can fail in any way
            raise ConfigError(f"the {what} fails to produce a batch: {type(exc).__name__}: {exc}") from exc
    finally:
        set_rng_state(state)
        if isinstance(epoch, int) and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
    if batch is None:
        if required:
            raise ConfigError(f"the {what} yields no batch (its dataset is empty): there is nothing to "
                              "train or evaluate on")
        return None
    task = task or ClassificationTask()
    adapter = adapter or BatchAdapter()
    head = _batch_head(batch, 16)
    inputs, targets = adapter.split(head)
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        model.eval()
        with torch.no_grad():
            out = adapter.call(model, to_device(inputs, device))
    except PwfnError:
        raise
    except Exception as exc:  # shape mismatches and the like: the model's settings do not fit the data
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ConfigError(f"the model cannot take the {what}'s batches (inputs: {shape}): "
                          f"{type(exc).__name__}: {exc}. Check the model's settings (model.kwargs) against the "
                          "data") from exc
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])
        set_rng_state(state)
    targets = to_device(targets, device)
    task.validate(out, targets, what)
    if isinstance(task, ClassificationTask) and num_classes and int(out.shape[1]) < num_classes:
        raise ConfigError(f"the model outputs {int(out.shape[1])} classes but the data has {num_classes}: the "
                          "model's settings do not fit the data; fix model.kwargs (e.g. num_classes) or leave "
                          "num_classes out to take it from the data")
    return batch if isinstance(batch, tuple) else tuple(batch) if isinstance(batch, list) else (inputs, targets)


def _batch_head(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a (nested) batch: every tensor with a batch dimension is cut."""
    return map_tensors(batch, lambda t: t[:n] if t.dim() else t)


def load_point_model(folder: Union[str, Path]) -> nn.Module:
    """Rebuild a plain torch model from ``point_model.safetensors`` and its recipe.

    The file is checked against its description's SHA-256 and, when the folder has a manifest,
    against the manifest (checksum, recipe, finite values, codebook): a damaged point model
    raises ``DamagedPointModelError``.
    """
    folder = Path(folder)
    desc, state = read_point_model(folder, load_manifest(folder))
    recipe = desc.get("recipe")
    if not recipe:
        raise ModelError(f"{folder} holds no model recipe (the model was passed in from Python); "
                         "load the safetensors into your own model instead")
    model = _create({"name": recipe["name"], "kwargs": recipe.get("kwargs", {})})
    load_state_dict_strict(model, state, str(folder / "point_model.safetensors"))
    return model


# --------------------------------------------------------------------------------------------
# building data and models from a config


def build_loaders(cfg: RunConfig, dist: Optional[DistContext] = None):
    """The config's loaders; under DDP each rank gets its shard of every global batch."""
    from .data import _STREAM_SHUFFLE, _torch_generator, make_loaders

    d = cfg.data
    kwargs: dict[str, Any] = dict(
        batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, seed=d.seed, num_workers=d.num_workers,
        pin_memory=d.pin_memory, augment=d.augment, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
        train_subset=d.train_subset, val_subset=d.eval_subset, test_subset=d.eval_subset,
    )
    if dist is not None and dist.enabled:
        world, rank, seed = dist.world_size, dist.rank, d.seed

        def order(n: int):
            # the single-process order of each epoch (same stream as the unsharded loader)
            return lambda epoch: torch.randperm(n, generator=_torch_generator(seed, _STREAM_SHUFFLE, epoch))

        kwargs["batch_size"] = d.batch_size // world if d.batch_size % world == 0 else d.batch_size
        kwargs["sampler"] = lambda ds: GlobalBatchShard(order(len(ds)), len(ds), d.batch_size, rank, world)
        kwargs["eval_sampler"] = lambda ds: ContiguousShard(len(ds), rank, world)
    options = dict(d.options)
    if d.image_size is not None:
        options.setdefault("image_size", d.image_size)
    return make_loaders(d.name, d.root, **kwargs, **options)


def model_recipe(cfg: RunConfig, loaders) -> dict:
    """The model's name and keyword arguments, with shape arguments filled from the data."""
    from .models import _REGISTRY

    kwargs = dict(cfg.model.kwargs)
    if cfg.model.name in _REGISTRY:
        params = inspect.signature(_REGISTRY[cfg.model.name]).parameters
        swallow = [p for p in params.values() if p.kind == inspect.Parameter.VAR_KEYWORD and p.name.startswith("_")]
        if swallow:  # the constructor would silently ignore a misspelt key: refuse it instead
            import difflib

            named = [n for n, p in params.items()
                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
            for key in kwargs:
                if key not in named:
                    close = difflib.get_close_matches(str(key).split(":")[0], named, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    yaml_hint = " (YAML needs a space after ':' in {key: value})" if ":" in str(key) else ""
                    raise ConfigError(f"model.kwargs has the key {key!r}, which model {cfg.model.name!r} does not "
                                      f"take{yaml_hint}.{hint} It takes: {', '.join(named)}")
        c, h, w = loaders.input_shape
        derived = {"num_classes": loaders.num_classes, "in_channels": c, "in_features": c * h * w, "input_size": h}
        for key, value in derived.items():
            if key in params and params[key].kind != inspect.Parameter.VAR_KEYWORD:
                kwargs.setdefault(key, value)
    return {"name": cfg.model.name, "kwargs": kwargs}


def train_baseline(cfg: RunConfig, model: nn.Module, loaders, dist: DistContext) -> dict[str, Any]:
    b = cfg.baseline
    opt = make_optimizer(model.parameters(), b.optimizer, b.lr, b.momentum, b.weight_decay)
    steps = max(1, math.ceil(b.epochs * len(loaders.train)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if b.cosine else None
    stats = train_epochs(_wrap_ddp(model, dist), loaders.train, opt, b.epochs, dist.device, counter=EpochCounter(),
                         grad_clip=b.grad_clip, scheduler=sched, desc="float baseline",
                         progress=cfg.progress and dist.is_main, dist=dist, inner=model,
                         bf16=cfg.precision == "bf16", advice=divergence_advice(cfg, "baseline"))
    return stats


def _folder(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


@dataclass
class Prepared:
    """What every command needs before fixing: process group, data, recipe and float baseline."""

    dist: DistContext
    loaders: Any
    recipe: dict
    model: nn.Module
    baseline: dict
    inputs: dict = field(default_factory=dict)  # fingerprints of the data and model.checkpoint
    lock: Optional[RunLock] = None  # the run folder's lock, held until release()

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def release(self) -> None:
        """Release the run folder's lock (the command is done with the folder)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __iter__(self):
        # unpacks like the earlier tuple: device, loaders, recipe, model, baseline
        return iter((self.device, self.loaders, self.recipe, self.model, self.baseline))


def prepare_run(cfg: RunConfig, methods: tuple[str, ...] = (), *, resume: bool = True,
                fresh: bool = False) -> Prepared:
    """Seed, threads, device (and process group under torchrun), data, and the float baseline
    (from ``model.checkpoint``, reused from the run folder, or trained).

    Everything that can be checked before writing is checked first: the data, the model
    recipe, ``model.checkpoint``, the saved baseline and, for ``methods`` (with ``resume``),
    their checkpoints and whether the model suits them. Only then is the run folder touched:
    a refused run creates no folder and changes no file in an existing one. ``fresh`` deletes
    the run folder at that point (after the checks, so a refused ``--fresh`` deletes nothing).
    """
    folder = _folder(cfg)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"the run folder {str(folder)!r} is a file, not a folder: choose another name or --out")
    dist = init_distributed(cfg.device)
    if dist.is_main:
        check_free(folder)  # another process writes this run folder: fail now, before loading anything
    seed_everything(cfg.seed)  # identical on every rank: weight noise must agree across ranks
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaders = build_loaders(cfg, dist)
    if loaders.val is None and loaders.test is None:
        raise ConfigError(f"data {cfg.data.name!r} leaves no evaluation split (val_fraction = "
                          f"{cfg.data.val_fraction}, test_fraction = {cfg.data.test_fraction}): set "
                          "data.val_fraction or data.test_fraction above 0")
    recipe = model_recipe(cfg, loaders)
    model = _create(recipe).to(dist.device)
    # the model's settings must fit the data (e.g. num_classes): checked on the first batch
    check_first_batch(model, loaders.train, dist.device, "training data", required=True,
                      num_classes=loaders.num_classes)
    inputs: dict[str, Any] = {"data": splits_fingerprint(loaders)}
    if cfg.model.checkpoint:
        problem = regular_file_problem(cfg.model.checkpoint)
        if problem is not None:  # a FIFO or /dev/zero would block or never end
            raise ConfigError(f"model.checkpoint {cfg.model.checkpoint!r} {problem}")
        try:
            inputs["checkpoint"] = file_fingerprint(cfg.model.checkpoint)
        except OSError as exc:
            raise ConfigError(f"model.checkpoint {cfg.model.checkpoint!r} cannot be read: {exc}") from exc
    base_path = folder / "baseline.pt"
    resume = resume and not fresh
    info: dict[str, Any] = {}
    base_state: Optional[dict] = None
    if cfg.model.checkpoint:
        state = _load_user_checkpoint(cfg.model.checkpoint)
        load_state_dict_strict(model, state, cfg.model.checkpoint)
        bad = first_nonfinite_weight(model)
        if bad is not None:
            raise CheckpointError(f"model.checkpoint {cfg.model.checkpoint!r} is not finite: {bad}")
        info["source"] = f"checkpoint {cfg.model.checkpoint}"
    elif resume and base_path.exists():
        try:
            base_state = load_checkpoint(base_path, kind="baseline", map_location=dist.device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. Delete it to retrain the float baseline, or start over with "
                                  "--fresh") from exc
        _refuse_changed_config(base_state.get("config"), cfg, base_path, BASELINE_SECTIONS)
        refuse_changed_inputs(base_state.get("inputs"), inputs, base_path, keys=("data",))
        load_state_dict_strict(model, base_state["model"], str(base_path))
    known = dict(inputs)
    if cfg.model.checkpoint or base_state is not None:  # the float model is known before training
        known["model"] = model_fingerprint(model)
    for method in methods:
        fixed_model = check_model(method, cfg, model)
        ckpt = folder / method / "checkpoint.pt"
        if resume and ckpt.exists():
            saved = load_run_checkpoint(ckpt, method)
            _refuse_changed_config(saved.get("config"), cfg, ckpt, RUN_SECTIONS[method])
            saved_inputs = saved.get("inputs") or (_manifest_or_none(folder / method) or {}).get("inputs")
            refuse_changed_inputs(saved_inputs, known, ckpt)
            try:
                load_state_dict_strict(fixed_model, saved["model"], str(ckpt))
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}. Start this method over with --fresh (or delete the file)") from exc
    # every check passed: from here on the run folder is written, under its lock
    lock = acquire(folder) if dist.is_main else None
    try:
        return _prepare_in_folder(cfg, dist, loaders, recipe, model, folder, base_state, info, inputs, lock, fresh)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _clear_folder(folder: Path) -> None:
    """Delete everything in a run folder but its lock file (``--fresh``; the lock stays held)."""
    from .lock import LOCK_FILE

    for child in folder.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _prepare_in_folder(cfg: RunConfig, dist: DistContext, loaders, recipe: dict, model: nn.Module, folder: Path,
                       base_state: Optional[dict], info: dict[str, Any], inputs: dict[str, Any],
                       lock: Optional[RunLock], fresh: bool) -> Prepared:
    base_path = folder / "baseline.pt"
    if dist.is_main:
        if fresh:
            _clear_folder(folder)
        remove_stale_temp_files(folder)
        atomic_write_text(folder / "config.yaml", dump_config(cfg))
    if base_state is not None:
        set_rng_state(base_state["rng"])
        info = dict(base_state["info"])
        info["reused"] = True
    elif not cfg.model.checkpoint:
        t0 = time.perf_counter()
        info["train"] = train_baseline(cfg, model, loaders, dist)
        info["source"] = "trained"
        info["seconds"] = time.perf_counter() - t0
        if dist.is_main:
            save_checkpoint(base_path, {"model": model.state_dict(), "rng": rng_state(), "info": info,
                                        "config": config_to_dict(cfg), "inputs": {"data": inputs["data"]}},
                            kind="baseline")
        dist.barrier()
    eval_loader = loaders.test or loaders.val
    info["test"] = evaluate(model, eval_loader, dist.device, dist)
    if loaders.val is not None:
        info["val"] = evaluate(model, loaders.val, dist.device, dist)
    if dist.is_main:
        how = "reused from " + str(base_path) if info.get("reused") else info.get("source", "trained")
        log.info("float baseline (%s): test top-1 %.2f%%", how, info["test"]["top1"])
    return Prepared(dist, loaders, recipe, model, info, inputs=inputs, lock=lock)


def _create(recipe: dict) -> nn.Module:
    """``create_model`` whose every failure on bad ``model.kwargs`` is a ConfigError."""
    try:
        return create_model(recipe["name"], **recipe["kwargs"])
    except PwfnError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise ConfigError(f"cannot build model {recipe['name']!r} with model.kwargs {recipe['kwargs']!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _load_user_checkpoint(path: str) -> dict:
    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:  # a FIFO or /dev/zero would block or never end
        raise ConfigError(f"model.checkpoint {path!r} {problem}")
    try:
        with p.open("rb") as fh:
            head = fh.read(4100)
    except OSError as exc:
        raise ConfigError(f"model.checkpoint {path!r} cannot be read: {exc}") from exc
    if b'"pwfn-checkpoint"' in head:  # one of our own checkpoints: a float baseline is fine, a run is not
        kind = head.split(b'"kind": "', 1)[-1].split(b'"', 1)[0].decode("utf-8", "replace")
        if kind != "baseline":
            raise ConfigError(f"model.checkpoint {path!r} is a pwfn {kind!r} checkpoint, not a float model: "
                              "give a plain torch state_dict or a run folder's baseline.pt")
        state = load_checkpoint(p, kind="baseline")
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(f"model.checkpoint {path!r} holds no model state")
        return state["model"]
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.checkpoint {path!r} could not be read as a torch state_dict: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"model.checkpoint {path!r} does not hold a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"model.checkpoint {path!r} is not a state_dict of tensors: {bad[:3]} are not tensors")
    return obj


def _run_one(cfg: RunConfig, prep: Prepared, method: str, resume: bool,
             on_round_end: Optional[Callable[[int], None]] = None) -> FixingResult:
    run_dir = _folder(cfg) / method
    res = FixingRun(method, cfg, prep.model, prep.loaders.train, prep.loaders.val, prep.loaders.test,
                    device=prep.device, run_dir=run_dir, recipe=prep.recipe, on_round_end=on_round_end,
                    dist=prep.dist, inputs=prep.inputs).run(resume=resume)
    res.report["baseline"] = prep.baseline
    if prep.dist.is_main:
        atomic_write_json(run_dir / "report.json", to_jsonable(res.report))
    return res


def run_method(cfg: RunConfig, method: Optional[str] = None, *, resume: bool = True,
               on_round_end: Optional[Callable[[int], None]] = None, fresh: bool = False) -> dict[str, Any]:
    """`pwfn run`: float baseline, then one method; returns the report.

    ``fresh`` deletes the run folder (once every check passed) and starts over.
    """
    method = method or cfg.method
    if method not in STRATEGIES:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(STRATEGIES)}")
    resume = resume and not fresh
    prep = prepare_run(cfg, (method,), resume=resume, fresh=fresh)
    try:
        return _run_one(cfg, prep, method, resume, on_round_end).report
    finally:
        prep.release()


def compare(cfg: RunConfig, *, resume: bool = True, fresh: bool = False) -> dict[str, Any]:
    """`pwfn compare`: one float baseline, then WFN and PWFN from it; returns the comparison."""
    resume = resume and not fresh
    prep = prepare_run(cfg, ("wfn", "pwfn"), resume=resume, fresh=fresh)
    try:
        out: dict[str, Any] = {"baseline": prep.baseline, "methods": {}}
        earlier = _earlier_comparison(_folder(cfg)) if resume else {}
        for method in ("wfn", "pwfn"):
            done_before = _rounds_on_disk(_folder(cfg) / method) if resume else []
            t0 = time.perf_counter()
            res = _run_one(cfg, prep, method, resume)
            out["methods"][method] = {"final": res.report["final"],
                                      "seconds": _method_seconds(time.perf_counter() - t0, done_before, len(res.history),
                                                                 (earlier.get("methods") or {}).get(method))}
        out["table"] = comparison_rows(out)
        if prep.dist.is_main:
            atomic_write_json(_folder(cfg) / "compare.json", to_jsonable(out))
            atomic_write_text(_folder(cfg) / "compare.md", format_table(out["table"]) + "\n")
        return out
    finally:
        prep.release()


def _earlier_comparison(folder: Path) -> dict[str, Any]:
    """The compare.json of an earlier, finished comparison in this folder ({} when none or unreadable)."""
    from .manifest import load_json

    if not (folder / "compare.json").exists():
        return {}
    try:  # bounded and depth-checked: a hand-edited file is ignored, never a traceback
        data = load_json(folder / "compare.json", "comparison")
    except PwfnError:
        return {}
    return data if isinstance(data, dict) else {}


def _rounds_on_disk(method_dir: Path) -> list[dict[str, Any]]:
    """The round rows an earlier session left in ``metrics.jsonl`` ([] when none)."""
    rows = []
    try:
        text = (method_dir / "metrics.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    from .manifest import parse_json

    for line in text.splitlines():
        try:
            row = parse_json(line, "round log")
        except PwfnError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def _method_seconds(session: float, done_before: list[dict[str, Any]], rounds_now: int,
                    earlier: Optional[dict[str, Any]]) -> float:
    """A method's own compute time across sessions, for compare.json.

    A rerun that found the method finished (no round left to do) keeps the time the earlier
    comparison recorded instead of the seconds spent reloading and re-evaluating it; a resumed
    method adds the wall time of the rounds finished in earlier sessions to this session's.
    """
    if done_before and len(done_before) >= rounds_now and earlier and earlier.get("seconds") is not None:
        return float(earlier["seconds"])
    before = sum(float(r.get("wall_seconds") or 0.0) for r in done_before[:rounds_now])
    return before + session


def comparison_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    base = out["baseline"]
    rows = [{"method": "float", "top1": base["test"]["top1"], "top5": base["test"].get("top5"),
             "unique": None, "unique_nonzero": None, "entropy": None, "entropy_nonzero": None, "seconds": base.get("seconds")}]
    for name, m in out["methods"].items():
        f = m["final"]
        rows.append({"method": name, "top1": f["test"]["top1"], "top5": f["test"].get("top5"),
                     "unique": f.get("unique"), "unique_nonzero": f.get("unique_nonzero"),
                     "entropy": f.get("entropy"), "entropy_nonzero": f.get("entropy_nonzero"),
                     "seconds": m.get("seconds")})
    return rows


# --------------------------------------------------------------------------------------------
# Python API


def compress(
    model: nn.Module,
    train_loader,
    val_loader,
    method: str = "pwfn",
    config: Optional[Union[RunConfig, dict, str, Path]] = None,
    *,
    test_loader=None,
    run_dir: Optional[Union[str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
    resume: bool = True,
    overrides: Optional[list[str]] = None,
    task: Optional[Union[str, Task]] = None,
    loss: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
    metrics: Optional[Callable[[torch.Tensor, Any], dict]] = None,
    adapter: Optional[BatchAdapter] = None,
) -> FixingResult:
    """Fix every weight of a trained ``model`` onto one power-of-two codebook.

    ``method`` is "pwfn" (Bayesian) or "wfn" (deterministic). ``config`` is a RunConfig, a dict,
    or a YAML path (defaults otherwise); its ``seed`` and ``threads`` are applied as by the CLI.
    ``task`` (a name such as ``"regression"``, ``"bce"``, ``"language_model"``, or a
    :class:`pwfn.Task`; default the config's ``task``, i.e. classification) gives the training
    loss and the metrics; or pass your own ``loss(outputs, targets)`` (and optionally
    ``metrics(outputs, targets) -> dict``). ``adapter`` (:class:`pwfn.BatchAdapter`) reads
    dict / tuple / nested batches (Hugging Face dicts with ``labels`` work without one). The
    first batch goes through the model and the loss before anything is written. Returns the
    fixed model, its plain point-estimate copy and the report. With ``run_dir`` the run is
    checkpointed after every round and resumable. The rounds run on a :class:`pwfn.Fixer`.
    """
    from .fixer import resolve_config

    cfg = resolve_config(config, overrides)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss is not None:
        if task is not None:
            raise ConfigError("pass either task= or loss= (a loss makes a custom task), not both")
        task = CustomTask(loss, metrics)
    elif metrics is not None:
        raise ConfigError("metrics= goes with loss= (your own task); built-in tasks have their own metrics")
    task_obj = resolve_task(task if task is not None else cfg.task)
    seed_everything(cfg.seed)  # as the CLI does: the same run from the same seed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(str(device) if device is not None else cfg.device)
    dev = dist.device
    # the run writes its config.yaml into run_dir itself, once the model and any checkpoint passed their checks
    return FixingRun(method, cfg, model.to(dev), train_loader, val_loader, test_loader, device=dev,
                     run_dir=run_dir, dist=dist, task=task_obj, adapter=adapter).run(resume=resume)

