"""WFN's "cosy up to clusters" regulariser.

Each unfixed weight is pulled towards the centres already in use: the loss is the softmin
(temperature T) weighted average of its *relative* distances |w - c| / |w| to the centres.
Only the few centres around each weight matter at small T, so instead of a dense
(#weights x #centres) matrix we look at the ``neighbours`` nearest centres found by
``searchsorted`` — O(N log C) time and O(N) memory per step.
"""

from __future__ import annotations

from typing import Optional

import torch


def cluster_attraction(
    weights: torch.Tensor,
    centres: torch.Tensor,
    temperature: float = 0.05,
    neighbours: int = 2,
    min_magnitude: float = 2.0**-7,
) -> torch.Tensor:
    """Mean over ``weights`` of sum_j softmin_j(d_ij / T) * d_ij, d_ij = |w_i - c_j| / |w_i|.

    ``centres`` must be sorted; ``neighbours`` centres on each side of each weight are used.
    |w| is floored at ``min_magnitude`` so weights near zero do not blow the distance up.
    """
    w = weights.reshape(-1)
    if w.numel() == 0 or centres.numel() == 0:
        return weights.sum() * 0.0
    c = centres.to(w.dtype)
    pos = torch.searchsorted(c, w.detach())
    offsets = torch.arange(-neighbours, neighbours, device=w.device)
    idx = (pos[:, None] + offsets[None, :]).clamp(0, c.numel() - 1)
    near = c[idx]
    d = (w[:, None] - near).abs() / w.detach().abs().clamp_min(min_magnitude)[:, None]
    soft = torch.softmax(-d / temperature, dim=1)
    return (soft * d).sum(1).mean()


def unfixed_values(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """Concatenate the unfixed entries of (parameter, fixed-mask) pairs, keeping the graph."""
    parts = [p.reshape(-1)[~m.reshape(-1)] for p, m in pairs]
    parts = [t for t in parts if t.numel()]
    return torch.cat(parts) if parts else None
