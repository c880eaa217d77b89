"""Quantisation baselines that PWFN / WFN are compared with (benchmarks only).

Written for this project from the textbook definitions; nothing here is taken from another
code base. All quantisers act on the same tensors PWFN fixes: every Linear/Conv ``weight``
and ``bias`` (BatchNorm stays float, as in PWFN).

* :class:`UniformQuantizer` — symmetric per-tensor uniform quantisation with ``2**bits - 1``
  levels ``{-m, ..., m} * scale`` (m = 2**(bits-1) - 1), i.e. 15 levels at 4 bits, 7 at 3.
* :class:`APoTQuantizer` — additive powers of two, APoT-style, 4 bits = sign + 3 magnitude
  bits: per-tensor scale times one of 8 magnitudes that are sums of two power-of-two terms,
  ``p1 + p2`` with ``p1 in {0, 1, 2^-2, 2^-4}`` and ``p2 in {0, 2^-1}``.
* both choose each tensor's scale (the clipping point) by minimising the quantisation MSE over
  a grid of clipping ratios of ``max|w|``;
* :func:`kmeans_1d` — Lloyd's algorithm in one dimension on the whole network's weights at
  once (one shared codebook of K values), vectorised: sorted data, assignment by
  ``searchsorted`` on the midpoints between sorted centres, updates by ``index_add``.
* :func:`qat_finetune` — quantisation-aware fine-tuning with the straight-through estimator:
  each step runs forward/backward on the quantised weights and applies the gradient to the
  float shadow weights (d q(w) / d w := 1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantisable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every Linear/Conv weight and bias, in module order."""
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if not isinstance(module, PLAIN_LAYERS):
            continue
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is None or id(p) in seen or p.numel() == 0:
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


# ------------------------------------------------------------------------------------------
# per-tensor quantisers


def snap_to_levels(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Round every entry of ``w`` to the nearest of the sorted 1-D ``levels`` (ties go up)."""
    flat = w.reshape(-1)
    if levels.numel() == 1:
        return levels.expand_as(flat).reshape(w.shape).clone()
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.searchsorted(mids, flat.contiguous(), right=True)
    return levels[idx].reshape(w.shape)


@dataclass
class SymmetricGridQuantizer:
    """``scale * sign(w) * nearest magnitude``: magnitudes in [0, 1], scale from an MSE grid search."""

    magnitudes: torch.Tensor  # sorted, starts with 0, ends with 1
    grid: int = 64
    min_ratio: float = 0.1
    name: str = "grid"

    def levels(self, scale: float, like: torch.Tensor) -> torch.Tensor:
        m = self.magnitudes.to(device=like.device, dtype=like.dtype) * scale
        return torch.cat([-m.flip(0)[:-1], m])  # -m_max..0..m_max, zero once

    def best_scale(self, w: torch.Tensor) -> float:
        """The clipping point (scale) in ``max|w| * [min_ratio, 1]`` with the least squared error."""
        amax = float(w.detach().abs().max()) if w.numel() else 0.0
        if amax == 0.0:
            return 1.0
        flat = w.detach().reshape(-1).float()
        ratios = torch.linspace(self.min_ratio, 1.0, self.grid, dtype=torch.float32)
        best, best_err = amax, math.inf
        for r in ratios.tolist():
            s = amax * r
            err = float((snap_to_levels(flat, self.levels(s, flat)) - flat).square().sum())
            if err < best_err:
                best, best_err = s, err
        return best

    def quantise(self, w: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        s = self.best_scale(w) if scale is None else scale
        return snap_to_levels(w.detach(), self.levels(s, w))


def UniformQuantizer(bits: int, grid: int = 64) -> SymmetricGridQuantizer:
    """Symmetric uniform quantiser with ``2**bits - 1`` levels (per tensor)."""
    if bits < 2:
        raise ValueError("uniform quantisation needs at least 2 bits")
    m = 2 ** (bits - 1) - 1
    mags = torch.arange(m + 1, dtype=torch.float64) / m
    return SymmetricGridQuantizer(mags, grid=grid, name=f"uniform{bits}")


def apot_magnitudes() -> torch.Tensor:
    """The 8 APoT-style magnitudes (3 bits): sums p1 + p2, p1 in {0, 1, 1/4, 1/16}, p2 in {0, 1/2}, / max."""
    p1 = torch.tensor([0.0, 1.0, 2.0**-2, 2.0**-4], dtype=torch.float64)
    p2 = torch.tensor([0.0, 2.0**-1], dtype=torch.float64)
    sums = torch.unique((p1[:, None] + p2[None, :]).reshape(-1))
    return sums / sums.max()


def APoTQuantizer(grid: int = 64) -> SymmetricGridQuantizer:
    """APoT-style 4-bit quantiser: per-tensor scale x (sum of two power-of-two terms), with sign."""
    return SymmetricGridQuantizer(apot_magnitudes(), grid=grid, name="apot4")


@torch.no_grad()
def quantise_model(model: nn.Module, quantiser: SymmetricGridQuantizer) -> tuple[nn.Module, list[str], dict[str, float]]:
    """A copy of ``model`` with every Linear/Conv tensor quantised per tensor; names and scales."""
    q = copy.deepcopy(model)
    scales: dict[str, float] = {}
    names = []
    for name, p in quantisable(q):
        s = quantiser.best_scale(p)
        p.copy_(quantiser.quantise(p, s))
        scales[name] = s
        names.append(name)
    return q, names, scales


# ------------------------------------------------------------------------------------------
# network-wide 1-D k-means (weight sharing)


def _lloyd_sorted(xs: torch.Tensor, cs: torch.Tensor, cs2: torch.Tensor, centres: torch.Tensor,
                  iters: int, tol: float) -> tuple[torch.Tensor, float]:
    """Lloyd iterations on sorted data using prefix sums: O(k log n) per iteration."""
    n = xs.numel()
    for _ in range(iters):
        mids = (centres[1:] + centres[:-1]) / 2
        # cluster j holds xs[b[j]:b[j+1]]
        b = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(xs, mids, right=True),
                       torch.full((1,), n, dtype=torch.long)])
        counts = (b[1:] - b[:-1]).to(torch.float64)
        sums = cs[b[1:]] - cs[b[:-1]]
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        new, _ = torch.sort(new)
        moved = float((new - centres).abs().max())
        centres = new
        if moved <= tol:
            break
    mids = (centres[1:] + centres[:-1]) / 2
    b = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(xs, mids, right=True),
                   torch.full((1,), n, dtype=torch.long)])
    counts = (b[1:] - b[:-1]).to(torch.float64)
    sums = cs[b[1:]] - cs[b[:-1]]
    sq = cs2[b[1:]] - cs2[b[:-1]]
    inertia = float((sq - 2 * centres * sums + counts * centres**2).sum())
    return centres, inertia


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 300, tol: float = 1e-12, restarts: int = 8,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on 1-D data; returns (sorted centres, cluster index of every entry of x).

    The data are sorted once; every cluster is then a contiguous run, so an iteration is a
    ``searchsorted`` of the k-1 midpoints plus prefix-sum differences (O(k log n), independent
    of n after the sort). Starts: the quantiles (i + 0.5)/k, k evenly spaced values between
    min and max, and ``restarts`` k-means++ seeds; the lowest squared error wins. A cluster
    that empties keeps its centre, so fewer than k values may end up used. Float64 throughout.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    flat = x.detach().reshape(-1).double().cpu()
    xs, order = torch.sort(flat)
    n = xs.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    uniq = torch.unique(xs)
    if uniq.numel() <= k:
        centres = uniq
    else:
        zero = torch.zeros(1, dtype=torch.float64)
        cs = torch.cat([zero, torch.cumsum(xs, 0)])
        cs2 = torch.cat([zero, torch.cumsum(xs * xs, 0)])
        q = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * (n - 1)).round().long()
        starts = [torch.unique(xs[q]), torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)]
        rng = np.random.default_rng(seed)
        xn = xs.numpy()
        for _ in range(restarts):
            # k-means++: each next seed drawn with probability ~ squared distance to the nearest seed
            picks = [float(xn[rng.integers(n)])]
            d2 = (xn - picks[0]) ** 2
            for _ in range(k - 1):
                c = np.cumsum(d2)
                if c[-1] <= 0:
                    break
                i = min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), n - 1)
                picks.append(float(xn[i]))
                np.minimum(d2, (xn - xn[i]) ** 2, out=d2)
            starts.append(torch.unique(torch.tensor(picks, dtype=torch.float64)))
        best = None
        for s in starts:
            c, inertia = _lloyd_sorted(xs, cs, cs2, s, iters, tol)
            if best is None or inertia < best[1]:
                best = (c, inertia)
        centres = best[0]
    mids = (centres[1:] + centres[:-1]) / 2
    idx_sorted = torch.searchsorted(mids, xs, right=True)
    assign = torch.empty_like(idx_sorted)
    assign[order] = idx_sorted
    return centres, assign


@torch.no_grad()
def kmeans_share(model: nn.Module, k: int, iters: int = 100) -> tuple[nn.Module, list[str], torch.Tensor]:
    """A copy of ``model`` whose Linear/Conv tensors share one network-wide k-means codebook."""
    q = copy.deepcopy(model)
    params = quantisable(q)
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])
    centres, assign = kmeans_1d(flat, k, iters=iters)
    values = centres.to(flat.dtype)[assign]
    offset = 0
    for _, p in params:
        n = p.numel()
        p.copy_(values[offset:offset + n].view_as(p))
        offset += n
    return q, [n for n, _ in params], centres.float()


# ------------------------------------------------------------------------------------------
# quantisation-aware fine-tuning (straight-through estimator)


def _set_epoch(loader, epoch: int) -> None:
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def make_optimizer(params: Iterable[torch.Tensor], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def qat_finetune(
    model: nn.Module,
    quantiser: SymmetricGridQuantizer,
    loader,
    epochs: float,
    *,
    optimizer: str = "adam",
    lr: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    device: torch.device | None = None,
    rescale_every: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[nn.Module, list[str], dict]:
    """Fine-tune a copy of ``model`` with STE quantisation for ``epochs`` passes; return it quantised.

    The per-tensor scales are re-chosen (MSE grid search on the current float weights) every
    ``rescale_every`` steps (default: once per pass over the data) and once more at the end.
    Cosine learning-rate decay to 0 over the run.
    """
    device = device or next(model.parameters()).device
    m = copy.deepcopy(model).to(device)
    params = quantisable(m)
    names = [n for n, _ in params]
    per_epoch = len(loader)
    total = max(1, math.ceil(epochs * per_epoch))
    rescale_every = rescale_every or per_epoch
    opt = make_optimizer(m.parameters(), optimizer, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    scales: dict[str, float] = {}
    step = 0
    epoch = 0
    loss_sum = 0.0
    m.train()
    while step < total:
        _set_epoch(loader, 10_000 + epoch)  # a shuffling stream of its own
        epoch += 1
        for x, y in loader:
            if step % rescale_every == 0:
                scales = {n: quantiser.best_scale(p) for n, p in params}
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                shadow = [p.detach().clone() for _, p in params]
                for (n, p) in params:
                    p.copy_(quantiser.quantise(p, scales[n]))
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients at the quantised weights = straight-through estimate
            with torch.no_grad():
                for (_, p), s in zip(params, shadow):
                    p.copy_(s)
            if grad_clip:
                nn.utils.clip_grad_norm_(m.parameters(), grad_clip)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            step += 1
            if on_step is not None:
                on_step(step)
            if step >= total:
                break
    with torch.no_grad():
        for n, p in params:
            scales[n] = quantiser.best_scale(p)
            p.copy_(quantiser.quantise(p, scales[n]))
    return m, names, {"steps": step, "mean_loss": loss_sum / max(step, 1), "scales": scales}
