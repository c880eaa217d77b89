"""The two kinds of image dataset a source returns: tensors in memory, or files decoded lazily.

Both hold int64 ``labels`` up front and know their class names and image shape, so splits,
subsets and statistics never need to decode anything they do not use; ``subset`` returns the
same kind of dataset, holding only the chosen items.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pwfn.errors import ConfigError, DataError

from .images import IMAGE_EXTENSIONS, PathLike, default_resize, load_image, scan_image_folder


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or a :class:`ConfigError` naming ``name`` unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_label_range(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{what}: labels must lie in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}"
        )


class TensorImageDataset(Dataset):
    """An in-memory image dataset: ``images`` (N, C, H, W) and int64 ``labels`` (N,).

    Why a class of our own instead of ``TensorDataset``: loaders gather whole batches straight
    from ``images`` (no per-item Python calls), and splits/subsets keep the class names.
    ``images`` is either uint8 in 0..255 or float32 already scaled to [0, 1].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]):
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.class_names = tuple(class_names)
        _check_label_range(self.labels, len(self.class_names), "labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> TensorImageDataset:
        """A copy holding only ``indices`` (a copy, so in-place batch ops never alias)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(
            self.images.index_select(0, idx), self.labels.index_select(0, idx), self.class_names
        )


class ImageFolderDataset(Dataset):
    """Image files listed up front, decoded one at a time on access.

    Why lazy: an ImageNet-sized tree does not fit in memory; only the file list and labels are
    kept and each ``__getitem__`` decodes, resizes and centre-crops one file to a uint8
    (C, S, S) tensor. Labels are known from the folder names alone, so splits never decode
    anything. The relative paths live in one numpy bytes array rather than a list of Python
    objects: 1.3M ImageNet paths then cost ~50 MB, and forked loader workers do not copy them
    page by page as reference counts change.
    """

    def __init__(
        self,
        root: PathLike,
        files: Sequence[str] | np.ndarray,
        labels: Sequence[int] | torch.Tensor,
        class_names: Sequence[str],
        *,
        image_size: int = 224,
        resize_size: int | None = None,
        channels: int = 3,
    ):
        self.root = Path(root)
        if isinstance(files, np.ndarray) and files.dtype.kind == "S":
            self.files = files
        else:
            self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if self.labels.shape[0] != self.files.shape[0]:
            raise DataError(f"{len(self.files)} image files but {self.labels.shape[0]} labels")
        self.class_names = tuple(class_names)
        _check_label_range(self.labels, len(self.class_names), f"imagefolder {self.root}")
        self.image_size = positive_int(image_size, "image_size")
        self.resize_size = (
            default_resize(self.image_size)
            if resize_size is None
            else positive_int(resize_size, "resize_size")
        )
        if self.resize_size < self.image_size:
            raise ConfigError(
                f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})"
            )
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels

    @classmethod
    def from_folder(
        cls,
        folder: PathLike,
        *,
        class_to_idx: Mapping[str, int] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ) -> ImageFolderDataset:
        """Scan ``folder/<class>/**`` (classes sorted by name); see :func:`scan_image_folder`."""
        files, labels, class_names = scan_image_folder(Path(folder), class_to_idx, extensions)
        return cls(folder, files, labels, class_names, **kwargs)

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def path(self, index: int) -> Path:
        """The file behind item ``index``."""
        return self.root / os.fsdecode(self.files[index])

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(path, label) of every item; built on demand, for inspection."""
        return [(self.path(i), int(y)) for i, y in enumerate(self.labels.tolist())]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(
            self.path(index),
            image_size=self.image_size,
            resize_size=self.resize_size,
            channels=self.channels,
        )
        return image, int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def subset(self, indices: torch.Tensor) -> ImageFolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFolderDataset(
            self.root,
            self.files[idx.numpy()],
            self.labels.index_select(0, idx),
            self.class_names,
            image_size=self.image_size,
            resize_size=self.resize_size,
            channels=self.channels,
        )


ImageDataset = Union[TensorImageDataset, ImageFolderDataset]
