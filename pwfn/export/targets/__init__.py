"""Export targets: the fixed network in formats real toolchains run.

=========  ==========================================================================  =========
name       what                                                                         extra
=========  ==========================================================================  =========
onnx       ``model.onnx``: one value table + indices at ceil(log2 K) bits, decoded      onnx
tflm       ``model.tflite``: TFLite-Micro flatbuffer, per-tensor LUT-compressed          tflm
hls4ml     ``hls4ml_prj.tar.gz``: HLS project, power-of-two (shift) products, C-sim'd    hls4ml
=========  ==========================================================================  =========

Each target checks itself end to end before anything is written (see its module) and reports
its file sizes and the multiplications it leaves. ``shiftadd`` is the reference integer
forward they are held to. ``export_targets(folder, names)`` adds targets to an export folder
written by ``pwfn.export`` (``pwfn export RUN --to onnx,tflm,hls4ml``); ``pwfn.run.report.format_targets``
prints its summary. The optional toolchains (onnx, tflite_micro, hls4ml) are imported only
inside the functions that use them, so importing this package needs none of them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...common.hints import install_hint
from ...errors import PwfnError
from ...run.manifest import load_json
from ..artefact import MODEL_JSON, ExportError, load_exported_model
from ..ownership import owned_files, write_export_folder
from .hls4ml import check_model as check_hls4ml
from .hls4ml import export_hls4ml
from .onnx import export_onnx
from .shiftadd import ShiftAddError, ShiftAddNet
from .tflm import check_model as check_tflm
from .tflm import export_tflm

__all__ = ["TARGETS", "TARGETS_FILE", "Target", "TargetError", "build_targets", "check_targets", "example_input",
           "export_targets", "parse_targets", "run_target", "weight_sizes"]

log = logging.getLogger(__name__)

TARGETS_FILE = "targets.json"


class TargetError(PwfnError, ValueError):
    """An unknown target, or a target whose optional dependency is missing."""


@dataclass(frozen=True)
class Target:
    name: str
    extra: str
    modules: tuple[str, ...]  # importable names the target needs
    description: str
    build: Callable[..., tuple[dict[str, bytes], dict[str, Any]]]
    #: ``check(model, example)`` raises (naming the layer and what would work) when the target cannot
    #: take the model; cheap (a trace), so every target is checked before any toolchain runs
    check: Callable[[nn.Module, Tensor], Any] = lambda model, example: None


def _onnx(model: nn.Module, example: Tensor, *, codebook: Tensor | None, **_: Any):
    data, info = export_onnx(model, example, codebook)
    info["multiplications_left"] = "all (weights are decoded to float once; onnxruntime multiplies)"
    return {"model.onnx": data}, info


def _tflm(model: nn.Module, example: Tensor, **_: Any):
    files, info = export_tflm(model, example[:1])
    info["multiplications_left"] = "all (DECODE restores float weights; the kernels multiply)"
    return files, info


def _hls4ml(model: nn.Module, example: Tensor, *, b: int, signed_terms: bool, **_: Any):
    data, info = export_hls4ml(model, example, b=b, signed_terms=signed_terms)
    return {"hls4ml_prj.tar.gz": data}, info


def _check_tflm(model: nn.Module, example: Tensor) -> None:
    check_tflm(model, example[:1])


def _check_hls4ml(model: nn.Module, example: Tensor) -> None:
    check_hls4ml(model, example[:1])


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "onnx", ("onnx", "onnxruntime"),
                   "ONNX, weights as one value table + indices packed at ceil(log2 K) bits, decoded in the graph", _onnx),
    "tflm": Target("tflm", "tflm", ("tflite_micro", "flatbuffers"),
                   "TFLite-Micro .tflite with per-tensor lookup-table compression", _tflm, _check_tflm),
    "hls4ml": Target("hls4ml", "hls4ml", ("hls4ml",),
                     "hls4ml HLS project with power-of-two (shift) products, C-simulated", _hls4ml, _check_hls4ml),
}


def _check_available(t: Target) -> None:
    missing = [m for m in t.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TargetError(f"target {t.name!r} needs the '{t.extra}' extra ({', '.join(missing)} not installed): "
                          f"{install_hint(t.extra)}")


def run_target(name: str, model: nn.Module, example: Tensor, *, codebook: Tensor | None = None, b: int = 7,
               signed_terms: bool = False) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Build and check one target in memory: (files, info)."""
    if name not in TARGETS:
        raise TargetError(f"unknown export target {name!r}; choose from {', '.join(TARGETS)}")
    t = TARGETS[name]
    _check_available(t)
    files, info = t.build(model, example, codebook=codebook, b=b, signed_terms=signed_terms)
    info["files"] = {k: len(v) for k, v in files.items()}
    return files, info


def _fixed_counts(model: nn.Module, example: Tensor, b: int, signed_terms: bool) -> dict[str, Any] | None:
    try:
        net = ShiftAddNet(model, b=b, signed_terms=signed_terms, example=example[:1])
        return net.operation_counts(tuple(example.shape[1:]))
    except ShiftAddError as exc:
        log.info("no shift-add operation counts: %s", exc)
        return None


def example_input(model: nn.Module, recipe: Mapping[str, Any] | None, image_size: int | None,
                  record: Mapping[str, Any] | None = None) -> Tensor:
    """A small input batch (2 samples, fixed seed) the model accepts.

    ``record`` (what a run recorded of its inputs: ``{"shape": [...], "dtype": ..., "max": ...}``)
    gives the shape and dtype when present; token ids stay below ``max + 1`` (and the first
    embedding's size). Otherwise the shape is guessed from the first layer: the spatial size
    is the recipe's ``input_size``, else ``image_size``, else 224 for torchvision/DeiT models
    and 32 otherwise; ``ExportError`` when the first layer says nothing.
    """
    kwargs = dict((recipe or {}).get("kwargs") or {})
    name = str((recipe or {}).get("name") or "")
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))),
        None,
    )
    g = torch.Generator().manual_seed(0)
    shape = (record or {}).get("shape")
    if isinstance(shape, list) and all(isinstance(d, int) and 0 < d <= 1 << 20 for d in shape) \
            and math.prod(shape) <= 1 << 24:
        dtype = getattr(torch, str((record or {}).get("dtype") or "float32"), None)
        if isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex):
            return torch.randn(2, *shape, generator=g).to(dtype)
        if isinstance(dtype, torch.dtype) and dtype != torch.bool:
            top = int((record or {}).get("max") or 1) + 1
            if isinstance(first, nn.Embedding):
                top = min(top, first.num_embeddings)
            return torch.randint(0, max(top, 1), (2, *shape), generator=g).to(dtype)
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (2, int(kwargs.get("seq_len") or 16)), generator=g)
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, generator=g)
    size = kwargs.get("input_size") or image_size or (224 if name.startswith(("tv_", "deit")) else 32)
    if isinstance(first, nn.Conv1d):
        return torch.randn(2, first.in_channels, int(size), generator=g)
    if isinstance(first, nn.Conv3d):
        return torch.randn(2, first.in_channels, 16, 16, 16, generator=g)
    if isinstance(first, nn.Conv2d):
        return torch.randn(2, first.in_channels, int(size), int(size), generator=g)
    raise ExportError("cannot guess the model's input shape for the export's checks; pass example_input "
                      "(Python) with a batch of 2 inputs")


def parse_targets(spec: Iterable[str]) -> list[str]:
    """``["onnx,tflm", "hls4ml"]`` -> ``["onnx", "tflm", "hls4ml"]`` (validated, no duplicates)."""
    out: list[str] = []
    for item in spec:
        for name in (s.strip() for s in str(item).split(",")):
            if not name:
                continue
            if name not in TARGETS:
                raise TargetError(f"unknown export target {name!r}; choose from {', '.join(TARGETS)}")
            if name not in out:
                out.append(name)
    return out


def check_targets(spec: Iterable[str]) -> list[str]:
    """Parse target names and check their extras are installed (before anything is written)."""
    names = parse_targets(spec)
    for n in names:
        _check_available(TARGETS[n])
    return names


def weight_sizes(model: nn.Module) -> tuple[int, int]:
    """(fp32 bytes, int8 bytes) of the model's floating-point tensors; int8 counts one byte a value
    plus one float32 scale per tensor (a nominal int8 copy, for scale)."""
    state = model.state_dict()
    floats = [t for t in state.values() if t.is_floating_point()]
    numel = sum(t.numel() for t in floats)
    return 4 * numel, numel + 4 * len(floats)


def build_targets(model: nn.Module, names: Iterable[str], *, example: Tensor, codebook: Tensor | None, b: int,
                  signed_terms: bool, folder: str = "") -> tuple[dict[str, bytes], dict[str, Any]]:
    """Build and check targets in memory: their files and the summary (``targets.json``'s content;
    the file itself is among the files). A target that cannot take the model raises before any
    other is built; nothing is written here."""
    names = check_targets(names)
    model = model.eval()
    for n in names:  # refuse a layer a target cannot take before any toolchain runs
        TARGETS[n].check(model, example)
    fp32, int8 = weight_sizes(model)
    counts = _fixed_counts(model, example, b, signed_terms)
    files: dict[str, bytes] = {}
    summary: dict[str, Any] = {"folder": folder, "fp32_bytes": fp32, "int8_bytes": int8, "operations": counts,
                               "targets": {}}
    for n in names:
        out, info = run_target(n, model, example, codebook=codebook, b=b, signed_terms=signed_terms)
        files.update(out)
        main = next(iter(out))
        size = len(out[main])
        summary["targets"][n] = {"file": main, "bytes": size, "vs_fp32": fp32 / size if size else None,
                                 "vs_int8": int8 / size if size else None, **info}
    files[TARGETS_FILE] = (json.dumps(summary, indent=2, default=_jsonable) + "\n").encode("utf-8")
    return files, summary


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def export_targets(folder: str | Path, names: Iterable[str], *, example: Tensor | None = None,
                   model: Any = None) -> dict[str, Any]:
    """Add targets to an export folder written by ``pwfn.export`` (``model.json`` + ``model.safetensors``).

    ``model``: your model instance, or ``"module:factory"`` / a recipe, when the export records no
    recipe (or records a function factory). Every target is built and checked in memory first;
    then the folder is rewritten as a whole (its earlier files, verified against ``model.json``,
    plus the new ones and ``targets.json``), so a failure writes nothing. Earlier targets that
    are not rebuilt are kept.
    """
    folder = Path(folder)
    names = check_targets(names)
    existing = owned_files(folder)  # refuses a folder pwfn cannot prove it wrote
    if MODEL_JSON not in existing and not (folder / MODEL_JSON).is_file():
        raise ExportError(f"{folder} is not a pwfn export folder (no {MODEL_JSON}); export a run first: "
                          "pwfn export RUN_DIR")
    meta = load_json(folder / MODEL_JSON, "export description")
    point = load_exported_model(folder, model=model).eval()
    b = int(meta.get("b", 7))
    signed = bool(meta.get("signed_terms", False))
    cb = meta.get("codebook")
    codebook = torch.tensor(cb, dtype=torch.float32) if isinstance(cb, list) and cb else None
    if example is None:
        example = example_input(point, meta.get("recipe"), None, meta.get("example"))
    files, summary = build_targets(point, names, example=example, codebook=codebook, b=b, signed_terms=signed,
                                   folder=str(folder))
    previous = existing.pop(TARGETS_FILE, None)
    if previous is not None:  # keep earlier targets that are not rebuilt (and their files)
        try:
            old = json.loads(previous)
            for n, t in (old.get("targets") or {}).items():
                if n not in summary["targets"] and isinstance(t, dict):
                    summary["targets"][n] = t
            files[TARGETS_FILE] = (json.dumps(summary, indent=2, default=_jsonable) + "\n").encode("utf-8")
        except (ValueError, AttributeError):
            pass
    merged = {**{k: v for k, v in existing.items() if k != MODEL_JSON}, **files}
    write_export_folder(folder, merged, {k: v for k, v in meta.items() if k != "files"})
    return summary
