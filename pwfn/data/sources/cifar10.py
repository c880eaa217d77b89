"""Source ``cifar10``: the CIFAR-10 python batches on disk, read with a restricted unpickler.

Why restricted: the batches are pickles, and a pickle can run arbitrary code on load. The
unpickler here resolves only the few numpy callables that rebuild arrays (plus a latin-1-only
``_codecs.encode``), so a doctored file fails with a :class:`DataError` instead.
"""

from __future__ import annotations

import codecs
import functools
import importlib
import io
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pwfn.errors import DataError

from ..augment import Augmentation
from ..datasets import TensorImageDataset
from ..registry import DatasetSpec, DataSource, register_dataset

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
"""CIFAR-10's per-channel (mean, std) in [0, 1] pixel units."""

CIFAR10_LAYOUT = (
    "root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} "
    "(or root being cifar-10-batches-py itself)"
)
"""The files the cifar10 source looks for, quoted by its error messages."""


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
            f"cifar10: missing {', '.join(missing)} under {folder}; expected {CIFAR10_LAYOUT}"
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


register_dataset(
    DatasetSpec("cifar10", _load_cifar10, True, "CIFAR-10 python batches", expected=CIFAR10_LAYOUT)
)
