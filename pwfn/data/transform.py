"""From raw pixels to model inputs: per-channel statistics and the batch transform.

Why one transform per loader rather than per item: a whole raw batch (uint8 0..255 or float
0..1) is augmented on its raw pixels, so crop padding is black as in the usual recipes, then
scaled and normalised with one fused multiply-add; the statistics that feed it are accumulated
in float64 so they do not depend on the chunking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pwfn.errors import ConfigError, DataError

from .augment import Augmentation, augment_batch
from .datasets import ImageDataset, ImageFolderDataset, TensorImageDataset
from .seeds import STREAM_STATS, check_seed, torch_generator

logger = logging.getLogger(__name__)


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def channel_stats(
    dataset: ImageDataset, *, max_items: int | None = None, seed: int = 0, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] pixel units) over a dataset, accumulated in float64.

    Lazy datasets are sampled (``max_items`` seeded items, default 512) instead of decoded
    in full; in-memory ones use every image unless ``max_items`` is given.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute normalisation statistics of an empty split")
    if isinstance(dataset, ImageFolderDataset) and max_items is None:
        max_items = 512
    indices = torch.arange(n)
    if max_items is not None and max_items < n:
        gen = torch_generator(check_seed(seed), STREAM_STATS)
        indices = torch.randperm(n, generator=gen)[:max_items].sort().values
    channels = dataset.image_shape[0]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, indices.numel(), chunk):
        idx = indices[start : start + chunk]
        if isinstance(dataset, TensorImageDataset):
            batch = dataset.images.index_select(0, idx)
        else:
            batch = torch.stack([dataset[int(i)][0] for i in idx])
        x = _to_unit_float(batch).to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    if (std < 1e-6).any():
        logger.warning("a channel has (near) zero std; using std=1 for it")
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return tuple(mean.tolist()), tuple(std.tolist())


@dataclass(frozen=True)
class BatchTransform:
    """Raw batch -> augmented (training only), [0, 1]-scaled, normalised float32 batch.

    Augmentation runs on the raw pixels (so padding is black, as in the usual recipes) and
    before normalisation.
    """

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    augmentation: Augmentation | None = None

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.augmentation is not None and self.augmentation.active:
            if generator is None:
                raise ConfigError("augmentation needs a seeded torch.Generator")
            images = augment_batch(images, self.augmentation, generator)
        # One fused in-place multiply-add on a fresh float copy: (x / peak - mean) / std.
        peak = 255.0 if images.dtype == torch.uint8 else 1.0
        x = images.to(torch.float32)
        if x is images:
            x = x.clone()  # never normalise the caller's tensor in place
        if self.mean is not None and self.std is not None:
            std = self.std.to(torch.float32).view(1, -1, 1, 1)
            mean = self.mean.to(torch.float32).view(1, -1, 1, 1)
            return x.mul_(1.0 / (peak * std)).sub_(mean / std)
        return x.mul_(1.0 / peak) if peak != 1.0 else x
