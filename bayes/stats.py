"""Reading sigma statistics per layer (for logs, reports and sanity checks)."""

from __future__ import annotations

import torch
from torch import nn

from .init import quantile
from .layers import gaussian_parameters


@torch.no_grad()
def sigma_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per Gaussian tensor (its qualified name, ``"<module>.<param>"``): mean, min, max of the floored sigma and
    mean/median of sigma/|mu| over entries with mu != 0, plus the entry count."""
    out: dict[str, dict[str, float]] = {}
    for e in gaussian_parameters(model):
        sigma = e.sigma.detach().clamp_min(e.gaussian.sigma_floor).float().reshape(-1)
        mu = e.mu.detach().float().reshape(-1)
        key = e.name
        if sigma.numel() == 0:
            out[key] = {"count": 0}
            continue
        nz = mu != 0
        rel = sigma[nz] / mu[nz].abs()
        out[key] = {
            "count": int(sigma.numel()),
            "mean": float(sigma.mean()),
            "min": float(sigma.min()),
            "max": float(sigma.max()),
            "rel_mean": float(rel.mean()) if rel.numel() else float("nan"),
            # quantile(0.5), not Tensor.median(): the latter returns the lower of the two
            # middle values for an even count instead of their mean.
            "rel_median": float(quantile(rel, 0.5)) if rel.numel() else float("nan"),
        }
    return out


def summarize_sigma(model: nn.Module) -> dict[str, float]:
    """Whole-model sigma summary (weighted by entry count)."""
    stats = sigma_stats(model)
    total = sum(s.get("count", 0) for s in stats.values())
    if total == 0:
        return {"count": 0}
    return {
        "count": total,
        "mean": sum(s["mean"] * s["count"] for s in stats.values() if s["count"]) / total,
        "min": min(s["min"] for s in stats.values() if s["count"]),
        "max": max(s["max"] for s in stats.values() if s["count"]),
    }
