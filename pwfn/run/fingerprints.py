"""Fingerprints of what a run was made from, and the refusal to resume under other inputs.

A run folder's manifest (:mod:`pwfn.run.manifest`) records them under ``inputs``: the SHA-256 of
files (``model.checkpoint``), the architecture and weights of the float model, and the data (the
content of in-memory arrays, the file list with sizes and mtimes of an image folder, or what is
cheap for Python loaders). :func:`refuse_changed_inputs` names every input that differs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from ..common.hints import other_run_folder, start_over
from ..common.moved import old_name
from ..errors import ConfigError

PathLike = Union[str, os.PathLike]

#: image folders with more files than this are fingerprinted by a fixed, evenly spaced sample of
#: file sizes and mtimes (the full list of names and labels is always hashed)
MAX_STAT_FILES = 20_000


class InputsChangedError(ConfigError):
    """A run folder was written from other inputs (data, checkpoint file, model) than a resume has."""


def sha256_bytes(data: Union[bytes, memoryview]) -> str:
    return hashlib.sha256(data).hexdigest()


def file_fingerprint(path: PathLike) -> dict:
    """SHA-256 and size of a file (read in blocks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"path": str(path), "sha256": h.hexdigest(), "bytes": size}


def _tensor_bytes(t: Any) -> bytes:
    import torch

    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _hash_tensor(h: Any, name: str, t: Any) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


def _hash_nested(h: Any, name: str, obj: Any) -> None:
    """Hash every tensor of a nested batch (tuples, lists, dicts), and the repr of plain values."""
    import torch

    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, name, obj)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            _hash_nested(h, f"{name}.{k}", obj[k])
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _hash_nested(h, f"{name}[{i}]", v)
    elif isinstance(obj, (str, int, float, bool, type(None))):
        h.update(f"{name}={obj!r}|".encode())
    else:
        h.update(f"{name}:{type(obj).__qualname__}|".encode())


def model_fingerprint(model: Any) -> dict:
    """Hashes of a model's architecture (module tree types, parameter and buffer names, shapes,
    dtypes) and of its weights (every parameter and buffer's bytes, in name order). A class of pwfn's
    is named by its module path before the layer folders (:func:`pwfn.common.moved.old_name`), so
    run folders made before the move still resume."""
    arch = hashlib.sha256()
    for name, module in model.named_modules():
        owner = old_name(type(module).__module__)
        arch.update(f"M|{name}|{owner}.{type(module).__qualname__}\n".encode())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update({f"{k}": v for k, v in model.named_buffers(remove_duplicate=False)})
    weights = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        arch.update(f"T|{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        _hash_tensor(weights, name, t)
    return {"architecture": arch.hexdigest(), "weights": weights.hexdigest()}


def _dataset_content(ds: Any) -> Optional[dict]:
    """A content fingerprint of a dataset we can read cheaply and deterministically, else None."""
    import torch

    from ..data import ImageFolderDataset, TensorImageDataset

    if isinstance(ds, TensorImageDataset):
        h = hashlib.sha256()
        _hash_tensor(h, "images", ds.images)
        _hash_tensor(h, "labels", ds.labels)
        return {"kind": "arrays", "n": len(ds), "sha256": h.hexdigest()}
    if isinstance(ds, ImageFolderDataset):
        h = hashlib.sha256()
        h.update(f"{ds.image_size}|{ds.resize_size}|{ds.channels}|".encode())
        h.update(ds.files.tobytes())
        _hash_tensor(h, "labels", ds.labels)
        n = len(ds)
        idx = range(n) if n <= MAX_STAT_FILES else sorted({int(i * n / MAX_STAT_FILES) for i in range(MAX_STAT_FILES)})
        missing = 0
        for i in idx:
            try:
                st = os.stat(ds.path(i))
                h.update(f"{i}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                missing += 1
                h.update(f"{i}|missing\n".encode())
        return {"kind": "files", "n": n, "sha256": h.hexdigest(), "stat_sampled": n > MAX_STAT_FILES}
    if isinstance(ds, torch.utils.data.TensorDataset):
        h = hashlib.sha256()
        for i, t in enumerate(ds.tensors):
            _hash_tensor(h, str(i), t)
        return {"kind": "tensors", "n": len(ds), "sha256": h.hexdigest()}
    if isinstance(ds, torch.utils.data.Subset):
        inner = _dataset_content(ds.dataset)
        if inner is None:
            return None
        h = hashlib.sha256(inner["sha256"].encode())
        h.update(repr(list(ds.indices)).encode())
        return {"kind": "subset of " + inner["kind"], "n": len(ds), "sha256": h.hexdigest()}
    return None


def _sized(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except (TypeError, NotImplementedError):
        return None


def _sequential(loader: Any) -> bool:
    """A torch DataLoader that reads its dataset in index order (its first batch is deterministic)."""
    import torch

    sampler = getattr(loader, "sampler", None)
    return isinstance(loader, torch.utils.data.DataLoader) and isinstance(sampler, torch.utils.data.SequentialSampler)


def loader_fingerprint(loader: Any, first_batch: Optional[tuple] = None) -> Optional[dict]:
    """What is cheap and deterministic to fingerprint about a loader.

    In order: the content of its dataset when it is one we can read directly (pwfn's in-memory
    and image-folder datasets, ``TensorDataset`` and ``Subset`` of those); else, for a loader
    that reads in index order, its first batch; else only the dataset's length and the number of
    batches. A shuffling loader over a custom dataset is therefore only checked for its size.
    """
    if loader is None:
        return None
    ds = getattr(loader, "dataset", None)
    out: dict[str, Any] = {"n": _sized(ds) if ds is not None else None, "batches": _sized(loader)}
    content = _dataset_content(ds) if ds is not None else None
    if content is not None:
        out.update(content)
    elif first_batch is not None and _sequential(loader):
        h = hashlib.sha256()
        _hash_nested(h, "batch", first_batch)
        out.update(kind="first batch", sha256=h.hexdigest())
    else:
        out["kind"] = "size only"
    return out


def data_fingerprint(train: Any, val: Any, test: Any, *, first_batches: Optional[Mapping[str, tuple]] = None,
                     input_shape: Optional[tuple] = None, num_classes: Optional[int] = None) -> dict:
    """Fingerprints of the three loaders a run uses (see :func:`loader_fingerprint`)."""
    fb = first_batches or {}
    out: dict[str, Any] = {split: loader_fingerprint(ld, fb.get(split))
                           for split, ld in (("train", train), ("val", val), ("test", test))}
    if input_shape is not None:
        out["input_shape"] = [int(s) for s in input_shape]
    if num_classes is not None:
        out["num_classes"] = int(num_classes)
    return out


def splits_fingerprint(loaders: Any) -> dict:
    """Content fingerprints of the datasets behind a config run's loaders (``pwfn.data.Loaders``)."""
    splits = getattr(loaders, "splits", None)
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        ds = getattr(splits, split, None) if splits is not None else None
        if ds is None:
            ld = getattr(loaders, split, None)
            ds = getattr(ld, "dataset", None) if ld is not None else None
        out[split] = (_dataset_content(ds) or {"kind": "size only", "n": _sized(ds)}) if ds is not None else None
    out["input_shape"] = [int(s) for s in loaders.input_shape]
    out["num_classes"] = int(loaders.num_classes)
    return out


_INPUT_WORDS = {"data": "the data", "checkpoint": "the model.checkpoint file", "model": "the model to fix"}


def changed_inputs(saved: Optional[Mapping], current: Mapping, keys: Iterable[str] = ("data", "checkpoint", "model")) -> list[str]:
    """Human-readable differences between two ``inputs`` records (only keys both recorded)."""
    if not isinstance(saved, Mapping):
        return []
    out = []
    for key in keys:
        if key not in saved or key not in current:
            continue
        a, b = saved[key], current[key]
        if key == "checkpoint" and isinstance(a, Mapping) and isinstance(b, Mapping):
            same = a.get("sha256") == b.get("sha256")  # the same bytes may move to another path
        else:
            same = a == b
        if same:
            continue
        what = _INPUT_WORDS.get(key, key)
        if key == "data" and isinstance(a, Mapping) and isinstance(b, Mapping):
            parts = [f"{split} split {_brief(a.get(split))} -> {_brief(b.get(split))}"
                     for split in ("train", "val", "test") if a.get(split) != b.get(split)]
            for extra in ("input_shape", "num_classes"):
                if a.get(extra) != b.get(extra):
                    parts.append(f"{extra} {a.get(extra)} -> {b.get(extra)}")
            out.append(f"{what} changed ({'; '.join(parts) or 'fingerprint differs'})")
        elif key == "checkpoint":
            out.append(f"{what} changed ({_brief(a)} -> {_brief(b)})")
        elif key == "model" and isinstance(a, Mapping) and isinstance(b, Mapping):
            parts = [p for p in ("architecture", "weights") if a.get(p) != b.get(p)]
            out.append(f"{what} changed (its {' and '.join(parts) or 'fingerprint'} differ)")
        else:
            out.append(f"{what} changed")
    return out


def _brief(fp: Any) -> str:
    if fp is None:
        return "none"
    if isinstance(fp, Mapping):
        sha = fp.get("sha256")
        n = fp.get("n", fp.get("bytes"))
        label = f"sha256 {sha[:12]}" if isinstance(sha, str) else str(fp.get("kind", "?"))
        return f"{label}, {n} {'bytes' if 'bytes' in fp else 'items'}" if n is not None else label
    return str(fp)


def refuse_changed_inputs(saved: Optional[Mapping], current: Mapping, path: PathLike, *,
                          keys: Iterable[str] = ("data", "checkpoint", "model")) -> None:
    """Raise InputsChangedError naming every changed input, when ``path`` was written from other inputs."""
    diff = changed_inputs(saved, current, keys)
    if diff:
        how = f"use {start_over()} to start over, or {other_run_folder()} to keep both"
        raise InputsChangedError(f"{str(path)} was written from other inputs: {'; '.join(diff)}. "
                                 f"Resuming would mix two runs: {how}")
