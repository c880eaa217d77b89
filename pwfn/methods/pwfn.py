"""PWFN: probabilistic weight fixing (ALGORITHM.md section 1).

The model becomes Bayesian (every quantised weight a Gaussian with its own sigma); a weight may
move to a centre within ``k * sigma`` of its mean; centres are sums of positive powers of two;
one SGD optimizer runs across all rounds, with the sigma regulariser (or the ELBO's KL) as the
extra loss. Options: per-tensor scale units (``scale: tensor``), the budget-aware regulariser
(``sigma_steps_reference``) and a post-training Laplace posterior (``posterior: laplace``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import nn

import bayes

from ..common.hints import setting, settings, shipped_config
from ..core.engine import EngineConfig, fix_round
from ..core.schedules import Schedule, pwfn_schedule, tolerance_for_round
from ..errors import ConfigError, ModelError
from ..model.plumbing import QuantView
from ..training.budget import budget_active
from ..training.tasks import to_device
from . import register_method
from .base import FixResult, Method, engine_config_from


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


@register_method("pwfn")
class PWFNMethod(Method):
    """Bayesian model; tolerance k*sigma; positive-term centres; SGD kept across rounds."""

    bayesian = True
    keeps_optimizer = True

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
        cfg = engine_config_from(p.engine, signed_terms=self.signed_terms, sigma_update=p.sigma_update,
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
        if self.cfg.pwfn.scale != "tensor" or budget_active(getattr(self.cfg, "budget", None)):
            return {}
        low = self.cfg.pwfn.engine.b - 24
        out = {}
        for name, unit in getattr(self, "units", {}).items():
            if unit > 0:
                out[name] = max(low, int(round(math.log2(unit) - REFERENCE_EXP)))
        return {k: v for k, v in out.items() if v != 0}

    def fix(self, view: QuantView, round_index: int, fraction: float, engine_config: EngineConfig,
            engine: Callable = fix_round) -> FixResult:
        shifts = self.shift_exponents()
        if not shifts:
            return super().fix(view, round_index, fraction, engine_config, engine)
        engine_config = self.cautious_engine(engine_config)
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

    @property
    def schedule(self) -> Schedule:
        """The fractions and this round's k (the configured k halved once per caution level)."""
        return pwfn_schedule(self.k_now, self.cfg.pwfn.fractions)

    #: the accuracy contract's caution level (0: the configured k)
    caution: int = 0

    @property
    def k_now(self) -> float:
        """The tolerance in sigmas at the current caution level: ``k / 2^level``, not below ``k_min``."""
        p = self.cfg.pwfn
        return p.k if self.caution == 0 else max(p.k / 2.0**self.caution, min(p.k_min, p.k))

    def _k_levels(self) -> int:
        """The highest caution level that still halves k (k / 2^level reaches k_min there)."""
        p, level = self.cfg.pwfn, 0
        while p.k / 2.0**level > min(p.k_min, p.k) and level < 64:
            level += 1
        return level

    def set_caution(self, level: int) -> bool:
        """Level ``n`` halves k ``n`` times, down to ``k_min``; one level more keeps ``k_min`` and turns the
        engine's zero pass off (when it is on); a level beyond is refused."""
        top = self._k_levels() + (1 if self.cfg.pwfn.engine.zero_fix else 0)
        if not 0 <= level <= top:
            return False
        self.caution = level
        self.no_zero_pass = level > self._k_levels()
        return True

    def caution_text(self) -> str:
        return f"k = {self.k_now:g}" + (", no zero pass" if self.no_zero_pass else "")

    def pre_epochs(self) -> float:
        return float(self.cfg.pwfn.first_round_epochs)

    def no_training_hint(self) -> str:
        return settings({"pwfn.first_round_epochs": 0, "pwfn.round_epochs": 0})

    def contract_tip(self) -> str:
        return (f"let k go further down ({setting('pwfn.k_min', self.cfg.pwfn.k_min / 8)}: more values, better kept "
                f"accuracy), train longer between rounds ({setting('pwfn.round_epochs')}), or fix with the paper's "
                f"small tolerances ({shipped_config('paper_pwfn')})")

    def divergence_tips(self) -> list[str]:
        return [f"raise the sigma floor ({setting('pwfn.sigma_floor')}, now {self.cfg.pwfn.sigma_floor:g})"]

    def point_model(self, model: nn.Module) -> nn.Module:
        return bayes.to_point_estimate(model)

    def set_training_steps(self, steps: Optional[int]) -> None:
        self.phase_steps = steps

    def wants_training_steps(self) -> bool:
        p = self.cfg.pwfn
        return p.sigma_steps_reference is not None and p.posterior == "trained" and p.objective == "regulariser"

    def bind_data(self, dataset_size: Optional[int]) -> None:
        if dataset_size is None and self.cfg.pwfn.objective == "elbo":
            # without it the KL would not be scaled per example and would swamp the cross-entropy
            raise ConfigError("pwfn.objective=elbo scales the KL by the training-set size, but the train loader has "
                              "no sized .dataset; use a DataLoader over a sized dataset, or objective=regulariser")
        super().bind_data(dataset_size)

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
        n = self.dataset_size
        return lambda model, ce: bayes.kl_divergence(model, prior_sigma=p.prior_sigma, dataset_size=n, frozen=frozen)

    @torch.no_grad()
    def _write_free_sigma(self, view: QuantView, sigma: dict[str, torch.Tensor]) -> None:
        for slot in view.slots:
            if slot.name in sigma and slot.sigma is not None:
                mask = view._mask(slot)
                slot.sigma.copy_(torch.where(mask, slot.sigma, sigma[slot.name].to(slot.sigma)))

    def refresh_posterior(self, model: nn.Module, view: QuantView, loader, device, task,
                          adapter) -> Optional[dict]:
        """``posterior: laplace``: every free weight's sigma from a diagonal Laplace posterior at mu
        (None, nothing done, for a trained posterior).

        The empirical Fisher of the per-example loss is estimated from ``laplace_batches`` training
        batches as ``B * g_B^2`` (``g_B`` a batch-mean gradient at the posterior mean, eval mode), and
        sigma = 1 / sqrt(N F + 1 / prior^2) with the prior ``laplace_prior`` in ``scale`` units.
        Fixed weights keep their sigma. Returns a small summary.
        """
        p = self.cfg.pwfn
        if p.posterior != "laplace":
            return None
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
        size = int(self.dataset_size) if self.dataset_size else n_seen
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


