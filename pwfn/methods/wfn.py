"""WFN: deterministic weight fixing (ALGORITHM.md section 2).

The model stays a point model; a weight may move to a centre within ``delta_t * |w|`` of it
(the round's relative tolerance); centres are sums of signed powers of two; a fresh Adam trains
between rounds, with the attraction of the free weights towards the centres in use as the
extra loss (rescaled to ``reg_ratio`` x the task loss every step).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..core.engine import EngineConfig
from ..core.regularizers import cluster_attraction, unfixed_values
from ..core.schedules import Schedule, tolerance_for_round, wfn_schedule
from ..model.plumbing import QuantView
from . import register_method
from .base import Method, engine_config_from


@register_method("wfn")
class WFNMethod(Method):
    """Point model; tolerance delta_t*|w|; signed-term centres; fresh Adam every round."""

    needs_task_loss = True
    signed_terms = True

    @property
    def quantise_norms(self) -> bool:
        return bool(self.settings.quantise_norms)

    def engine_config(self) -> EngineConfig:
        return engine_config_from(self.settings.engine, signed_terms=self.signed_terms, sigma_update="keep")

    def tolerance(self, view: QuantView, round_index: int) -> torch.Tensor:
        return tolerance_for_round(self.schedule, round_index, values=view.values())

    #: the accuracy contract's caution level: delta is halved this many times (at most MAX_CAUTION)
    caution: int = 0
    MAX_CAUTION = 3

    def set_caution(self, level: int) -> bool:
        """Level ``n`` halves delta ``n`` times, at most :attr:`MAX_CAUTION` times; one level more keeps that
        delta and turns the engine's zero pass off (when it is on)."""
        top = self.MAX_CAUTION + (1 if self.settings.engine.zero_fix else 0)
        if not 0 <= level <= top:
            return False
        self.caution = level
        self.no_zero_pass = level > self.MAX_CAUTION
        return True

    @property
    def schedule(self) -> Schedule:
        return wfn_schedule(self.settings.delta / 2.0 ** min(self.caution, self.MAX_CAUTION), self.settings.fractions)

    def caution_text(self) -> str:
        text = f"delta = {self.settings.delta / 2.0 ** min(self.caution, self.MAX_CAUTION):g}"
        return text + (", no zero pass" if self.no_zero_pass else "")

    def contract_tip(self) -> str:
        return (f"start from a smaller delta ({self.section_name}.delta, now {self.settings.delta:g}) or train longer "
                f"between rounds ({self.section_name}.round_epochs)")

    def optimizer(self, model, view, previous):
        return torch.optim.Adam(model.parameters(), lr=self.settings.lr)

    def extra_loss(self, view: QuantView) -> Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
        return attraction_loss(self.settings, view)


def attraction_loss(settings, view: QuantView) -> Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """WFN's "cosy up to clusters" term for the settings section ``settings`` (None before any value
    is fixed or with ``reg_ratio`` 0)."""
    values, fixed = view.values(), view.fixed()
    centres = torch.unique(values[fixed])
    if centres.numel() == 0 or settings.reg_ratio == 0:
        return None
    pairs = view.parameters_with_masks()

    def loss(model: nn.Module, ce: torch.Tensor) -> torch.Tensor:
        free = unfixed_values(pairs)
        if free is None:
            return ce * 0.0
        reg = cluster_attraction(free, centres, temperature=settings.reg_temperature)
        # rescaled every step so the term is reg_ratio x the cross-entropy
        scale = settings.reg_ratio * ce.detach() / reg.detach().clamp_min(1e-12)
        return scale * reg

    return loss
