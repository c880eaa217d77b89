"""The published WFN clustering (ALGORITHM.md section 2b) with WFN's training between rounds.

Only the fixing round differs from :mod:`pwfn.methods.wfn`: the clustering of
:func:`pwfn.core.wfn_published.published_wfn_round` replaces pwfn's greedy engine. Settings in
``cfg.wfn_published``; budget mode does not apply.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..core.engine import EngineConfig
from ..core.wfn_published import published_wfn_round
from ..model.plumbing import QuantView
from . import register_method
from .base import FixResult
from .wfn import WFNMethod


@register_method("wfn_published")
class PublishedWFNMethod(WFNMethod):
    """WFN's training with the published clustering instead of pwfn's greedy."""

    supports_budget = False

    def engine_config(self) -> EngineConfig:
        # the clustering's smallest term is 2^-(8 + order), at most 2^-24: reports count terms down to it
        e = self.settings.engine
        return EngineConfig(b=24, max_order=32, signed_terms=self.signed_terms, zero_fix=e.zero_fix, inc=e.inc,
                            sigma_update="keep")

    def fix(self, view: QuantView, round_index: int, fraction: float, engine_config: EngineConfig,
            engine: Optional[Callable] = None) -> FixResult:
        # its own clustering: ``engine`` is not used
        values, fixed, summary = published_wfn_round(view.values(), view.fixed(),
                                                     self.schedule.delta_for_round(round_index), fraction)
        return values, fixed, None, summary
