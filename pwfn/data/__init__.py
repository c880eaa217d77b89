"""Offline datasets, seeded splits, batch augmentation and data loaders.

Why this package exists: every experiment in pwfn needs the same few things from its data --
a source that works without internet, train/val/test splits that are identical on every
machine for a given seed, per-channel normalisation, cheap training-time augmentation and
loaders whose batch order is a pure function of ``(seed, epoch)``. Everything here is written
with numpy, Pillow and torch ops only; torchvision is deliberately never imported.

One module per idea: :mod:`~pwfn.data.seeds` (independent random streams of one seed),
:mod:`~pwfn.data.images` (decoding and listing image files), :mod:`~pwfn.data.datasets`
(in-memory and lazily decoded datasets), :mod:`~pwfn.data.registry` (sources by name),
:mod:`~pwfn.data.sources` (the built-in sources, each registering itself when imported),
:mod:`~pwfn.data.splits` (stratified splits), :mod:`~pwfn.data.augment` (batched crops and
flips), :mod:`~pwfn.data.transform` (normalisation) and :mod:`~pwfn.data.loader` (loaders
and :func:`make_loaders`).
"""

from __future__ import annotations

from .augment import (
    Augmentation,
    augment_batch,
    crop_with_padding,
    hflip_batch,
    random_crop,
    random_hflip,
)
from .datasets import ImageDataset, ImageFolderDataset, TensorImageDataset
from .images import IMAGE_EXTENSIONS, load_image
from .loader import BatchLoader, Loaders, SamplerFactory, make_loaders
from .registry import DATASETS, DatasetSpec, DataSource, load_dataset, register_dataset
from .seeds import STREAM_SHUFFLE, derive_seed, torch_generator
from .sources import (  # noqa: F401 -- importing a source module registers the source
    cifar10,
    digits,
    imagefolder,
    mnist,
    mnist5k,
    synthetic,
)
from .sources.cifar10 import CIFAR10_STATS
from .sources.imagefolder import IMAGENET_STATS
from .sources.mnist import MNIST_STATS, read_idx
from .splits import Splits, make_splits, stratified_split, stratified_subset
from .transform import BatchTransform, channel_stats

__all__ = [
    "CIFAR10_STATS",
    "DATASETS",
    "IMAGENET_STATS",
    "IMAGE_EXTENSIONS",
    "MNIST_STATS",
    "STREAM_SHUFFLE",
    "Augmentation",
    "BatchLoader",
    "BatchTransform",
    "DataSource",
    "DatasetSpec",
    "ImageDataset",
    "ImageFolderDataset",
    "Loaders",
    "SamplerFactory",
    "Splits",
    "TensorImageDataset",
    "augment_batch",
    "channel_stats",
    "crop_with_padding",
    "derive_seed",
    "hflip_batch",
    "load_dataset",
    "load_image",
    "make_loaders",
    "make_splits",
    "random_crop",
    "random_hflip",
    "read_idx",
    "register_dataset",
    "stratified_split",
    "stratified_subset",
    "torch_generator",
]
