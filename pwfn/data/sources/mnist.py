"""Source ``mnist``: MNIST-format idx files on disk (MNIST, Fashion-MNIST ...), plain or gzip.

Why our own idx parser: the format is tiny and checking every field lets an error name the
file and the problem instead of surfacing later as a reshape error.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pwfn.errors import DataError

from ..augment import Augmentation
from ..datasets import TensorImageDataset
from ..images import PathLike
from ..registry import DatasetSpec, DataSource, register_dataset
from .digits import DIGIT_NAMES

MNIST_STATS = ((0.1307,), (0.3081,))
"""MNIST's per-channel (mean, std) in [0, 1] pixel units."""

MNIST_LAYOUT = (
    "root/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte} (each plain or .gz; root/raw and root/MNIST/raw also searched)"
)
"""The files the mnist source looks for, quoted by its error messages."""

# idx type codes -> big-endian numpy dtypes (the format's own definition).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Parse one idx file (plain or gzip) into a native-endian numpy array.

    Why our own parser: the format is tiny (2 zero bytes, a dtype code, the number of dims,
    big-endian uint32 dims, then big-endian data) and checking every field lets us name the
    file and the problem instead of failing later with a reshape error.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: bad idx magic number 0x{raw[:4].hex()}")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{path}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header (needs {header} bytes, has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[raw[2]]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise DataError(
            f"{path}: truncated idx data: dims {dims} need {expected} bytes, found {got}"
        )
    if got > expected:
        raise DataError(
            f"{path}: {got - expected} unexpected trailing bytes after idx data of dims {dims}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _find_mnist_file(folders: Sequence[Path], stem: str) -> Path | None:
    """Accept the canonical name, the 'train-images.idx3-ubyte' variant and either with .gz."""
    dotted = stem.replace("-idx", ".idx")
    for folder in folders:
        for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _load_mnist(root: Path | None) -> DataSource:
    """MNIST-format idx files (MNIST, Fashion-MNIST ...) with their official 10k test split."""
    assert root is not None
    folders = [root, root / "raw", root / "MNIST" / "raw"]
    found = {key: _find_mnist_file(folders, stem) for key, stem in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"mnist: missing {', '.join(missing)} (plain or .gz) under {root}; expected "
            f"{MNIST_LAYOUT}"
        )
    parts = {}
    for split in ("train", "test"):
        image_path, label_path = found[f"{split}_images"], found[f"{split}_labels"]
        assert image_path is not None and label_path is not None
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{image_path}: expected a 3-d uint8 idx array (N, H, W), got "
                f"{images.ndim}-d {images.dtype}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(
                f"{label_path}: expected a 1-d uint8 idx array, got {labels.ndim}-d {labels.dtype}"
            )
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{label_path}: {labels.shape[0]} labels but {image_path.name} holds "
                f"{images.shape[0]} images"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"{label_path}: label {int(labels.max())} outside 0..9")
        parts[split] = (images, labels, image_path)
    train_hw, test_hw = parts["train"][0].shape[1:], parts["test"][0].shape[1:]
    if train_hw != test_hw:
        raise DataError(
            f"{parts['test'][2]}: images are {test_hw} but training images are {train_hw}"
        )

    def to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorImageDataset:
        return TensorImageDataset(
            torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            DIGIT_NAMES,
        )

    return DataSource(
        "mnist",
        to_dataset(*parts["train"][:2]),
        to_dataset(*parts["test"][:2]),
        DIGIT_NAMES,
        standard_mean=MNIST_STATS[0],
        standard_std=MNIST_STATS[1],
        augmentation=Augmentation(crop_padding=2),
    )


register_dataset(DatasetSpec("mnist", _load_mnist, True, "MNIST idx files", expected=MNIST_LAYOUT))
