"""Source ``synthetic``: seeded random images of any shape, for smoke runs and throughput tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pwfn.errors import ConfigError

from ..augment import Augmentation
from ..datasets import TensorImageDataset, positive_int
from ..registry import DatasetSpec, DataSource, register_dataset
from ..seeds import STREAM_SYNTHETIC, check_seed, torch_generator


def _load_synthetic(
    root: Path | None,
    *,
    num_samples: int = 512,
    num_test: int = 128,
    num_classes: int = 10,
    image_shape: Sequence[int] = (3, 32, 32),
    seed: int = 0,
) -> DataSource:
    """Seeded uint8 images: half a per-class template, half noise, so models can learn a bit.

    Why a class signal at all: a smoke run should be able to show the loss going down; for
    pure throughput tests the content does not matter.
    """
    num_samples = positive_int(num_samples, "num_samples")
    num_classes = positive_int(num_classes, "num_classes")
    if isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 0:
        raise ConfigError(f"num_test must be a non-negative integer, got {num_test!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape
    ):
        raise ConfigError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    gen = torch_generator(check_seed(seed), STREAM_SYNTHETIC)
    templates = torch.randint(0, 256, (num_classes, *shape), generator=gen, dtype=torch.uint8)
    class_names = tuple(f"class_{i}" for i in range(num_classes))

    def make(n: int) -> TensorImageDataset:
        labels = torch.randint(0, num_classes, (n,), generator=gen, dtype=torch.int64)
        noise = torch.randint(0, 128, (n, *shape), generator=gen, dtype=torch.uint8)
        images = templates.index_select(0, labels) // 2 + noise
        return TensorImageDataset(images, labels, class_names)

    train = make(num_samples)
    test = make(num_test) if num_test else None
    return DataSource(
        "synthetic",
        train,
        test,
        class_names,
        augmentation=Augmentation(hflip=True),
    )


register_dataset(
    DatasetSpec(
        "synthetic",
        _load_synthetic,
        False,
        "seeded random images",
        options=("num_samples", "num_test", "num_classes", "image_shape", "seed"),
    )
)
