"""Seeded, stratified train/val/test splits and subsets.

Why per class and by largest remainders: every part keeps the class proportions of the whole
with exact counts, and the permutation of each class comes from the split stream of the user
seed alone, so the same seed gives the same images in every part on every machine, whatever
the batch size or augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pwfn.errors import ConfigError, DataError

from .datasets import ImageDataset
from .registry import DataSource
from .seeds import STREAM_SPLIT, STREAM_SUBSET, check_seed, derive_seed, numpy_rng


def _as_numpy_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ConfigError(f"labels must be 1-d, got shape {array.shape}")
    return array.astype(np.int64)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing exactly to ``total`` (ties: first)."""
    ideal = weights / weights.sum() * total
    counts = np.floor(ideal).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(ideal - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def stratified_split(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    fractions: Sequence[float],
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """Split indices class by class into parts of the given fractions (summing to 1).

    Why per class: every part keeps the class proportions of the whole. Each class's count is
    divided by largest remainders (so counts are exact), its indices permuted by a numpy
    ``default_rng`` seeded from ``seed`` alone, and each part returned sorted as int64.
    """
    fracs = np.asarray([float(f) for f in fractions], dtype=np.float64)
    if fracs.size == 0 or (fracs < 0).any() or abs(fracs.sum() - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    y = _as_numpy_labels(labels)
    rng = numpy_rng(check_seed(seed), STREAM_SPLIT)
    parts: list[list[np.ndarray]] = [[] for _ in fracs]
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        members = members[rng.permutation(members.size)]
        counts = _largest_remainder(fracs, members.size)
        start = 0
        for part, count in zip(parts, counts):
            part.append(members[start : start + count])
            start += count
    return tuple(
        torch.from_numpy(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64)).to(torch.int64)
        for p in parts
    )


def stratified_subset(
    labels: torch.Tensor | np.ndarray | Sequence[int], size: int, seed: int
) -> torch.Tensor:
    """Exactly ``size`` sorted indices with (nearly) the class proportions of ``labels``."""
    y = _as_numpy_labels(labels)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"subset size must be a non-negative integer, got {size!r}")
    if size >= y.size:
        return torch.arange(y.size, dtype=torch.int64)
    rng = numpy_rng(check_seed(seed), STREAM_SUBSET)
    classes, class_counts = np.unique(y, return_counts=True)
    take = _largest_remainder(class_counts.astype(np.float64), size)
    chosen = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(y == cls)
        chosen.append(members[rng.permutation(members.size)[:k]])
    return torch.from_numpy(np.sort(np.concatenate(chosen))).to(torch.int64)


@dataclass(frozen=True)
class Splits:
    """The three parts a run uses; ``val``/``test`` are None when their fraction is 0."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def make_splits(
    source: DataSource,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_subset: int | None = None,
    val_subset: int | None = None,
    test_subset: int | None = None,
) -> Splits:
    """Seeded train/val/test splits of a source.

    The source's own test split is used when it has one (``test_fraction`` is then ignored and
    ``val_fraction`` is a fraction of its training part); otherwise one stratified split gives
    all three. ``*_subset`` sizes then take seeded stratified subsets for quick runs.
    """
    seed = check_seed(seed)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if source.test is not None:
        train_idx, val_idx = stratified_split(
            source.train.labels, (1.0 - val_fraction, val_fraction), seed
        )
        test: ImageDataset | None = source.test
    else:
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
            )
        train_idx, val_idx, test_idx = stratified_split(
            source.train.labels,
            (1.0 - val_fraction - test_fraction, val_fraction, test_fraction),
            seed,
        )
        test = source.train.subset(test_idx) if test_fraction > 0 else None
    train: ImageDataset = source.train.subset(train_idx)
    val = source.train.subset(val_idx) if val_fraction > 0 else None
    if len(train) == 0:
        raise DataError(f"{source.name}: the training split is empty")

    def shrink(dataset: ImageDataset | None, size: int | None, key: int) -> ImageDataset | None:
        if dataset is None or size is None:
            return dataset
        return dataset.subset(stratified_subset(dataset.labels, size, derive_seed(seed, key)))

    return Splits(
        shrink(train, train_subset, 0),  # type: ignore[arg-type]
        shrink(val, val_subset, 1),
        shrink(test, test_subset, 2),
    )
