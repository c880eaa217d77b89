"""Source ``digits``: scikit-learn's bundled 1797 8x8 digit images, always available offline."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..augment import Augmentation
from ..datasets import TensorImageDataset
from ..registry import DatasetSpec, DataSource, register_dataset

DIGIT_NAMES = tuple(str(i) for i in range(10))
"""Class names of every digit dataset (digits, mnist5k, mnist): "0" .. "9"."""


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Cached read-only arrays: load_digits parses a CSV, worth doing once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float64) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_digits(root: Path | None) -> DataSource:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to [0, 1]; no official test split."""
    images, labels = digits_arrays()
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.copy()),
        DIGIT_NAMES,
    )
    return DataSource(
        "digits", dataset, None, DIGIT_NAMES, augmentation=Augmentation(crop_padding=1)
    )


register_dataset(DatasetSpec("digits", _load_digits, False, "scikit-learn 8x8 digits, 1797 images"))
