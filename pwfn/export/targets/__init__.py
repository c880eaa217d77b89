"""Export targets: the fixed network in formats real toolchains run.

=========  ==========================================================================  =========
name       what                                                                         extra
=========  ==========================================================================  =========
onnx       ``model.onnx``: weights as value tables + packed indices, decoded by Gather   onnx
tflm       ``model.tflite``: TFLite-Micro flatbuffer, per-tensor LUT-compressed          tflm
hls4ml     ``hls4ml_prj.tar.gz``: HLS project, power-of-two (shift) products, C-sim'd    hls4ml
=========  ==========================================================================  =========

Each target checks itself end to end before anything is written (see its module) and reports
its file sizes and the multiplications it leaves. ``shiftadd`` is the reference integer
forward they are held to. ``export_targets(folder, names)`` adds targets to an export folder
written by ``pwfn.export`` (``pwfn export RUN --to onnx,tflm,hls4ml``); ``pwfn.report.format_targets``
prints its summary. The optional toolchains (onnx, tflite_micro, hls4ml) are imported only
inside the functions that use them, so importing this package needs none of them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...errors import PwfnError
from ...hints import install_hint
from ...io import atomic_write_bytes, atomic_write_json
from ..artefact import MODEL_JSON, ExportError, load_exported_model
from .hls4ml import export_hls4ml
from .onnx import export_onnx
from .shiftadd import ShiftAddError, ShiftAddNet
from .tflm import export_tflm

__all__ = ["TARGETS", "Target", "TargetError", "check_targets", "example_input", "export_targets", "parse_targets",
           "run_target"]

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


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "onnx", ("onnx", "onnxruntime"),
                   "ONNX, weights as value tables + packed indices decoded by Gather", _onnx),
    "tflm": Target("tflm", "tflm", ("tflite_micro", "flatbuffers"),
                   "TFLite-Micro .tflite with per-tensor lookup-table compression", _tflm),
    "hls4ml": Target("hls4ml", "hls4ml", ("hls4ml",),
                     "hls4ml HLS project with power-of-two (shift) products, C-simulated", _hls4ml),
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
        return ShiftAddNet(model, b=b, signed_terms=signed_terms).operation_counts(tuple(example.shape[1:]))
    except ShiftAddError as exc:
        log.info("no shift-add operation counts: %s", exc)
        return None


def example_input(model: nn.Module, recipe: Mapping[str, Any] | None, image_size: int | None) -> Tensor:
    """A small input batch (2 samples, fixed seed) the model accepts, from its first layer and its recipe.

    The spatial size is the recipe's ``input_size``, else ``image_size``, else 224 for
    torchvision/DeiT models and 32 otherwise; ``ExportError`` when the first layer says nothing.
    """
    kwargs = dict((recipe or {}).get("kwargs") or {})
    name = str((recipe or {}).get("name") or "")
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None
    )
    g = torch.Generator().manual_seed(0)
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, generator=g)
    size = kwargs.get("input_size") or image_size or (224 if name.startswith(("tv_", "deit")) else 32)
    if isinstance(first, nn.Conv1d):
        return torch.randn(2, first.in_channels, int(size), generator=g)
    if isinstance(first, nn.Conv3d):
        return torch.randn(2, first.in_channels, 16, 16, 16, generator=g)
    if isinstance(first, nn.Conv2d):
        return torch.randn(2, first.in_channels, int(size), int(size), generator=g)
    raise ExportError("cannot guess an input shape for ONNX export; pass example_input")


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


def export_targets(folder: str | Path, names: Iterable[str], *, example: Tensor | None = None) -> dict[str, Any]:
    """Add targets to an export folder (``model.json`` + ``model.safetensors`` from ``pwfn.export``).

    Every target is built and checked before any file is written; then each file and
    ``targets.json`` (sizes against fp32 and int8, checks, multiplications) are written atomically.
    """
    folder = Path(folder)
    names = check_targets(names)
    meta = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
    model = load_exported_model(folder).eval()
    b = int(meta.get("b", 7))
    signed = bool(meta.get("signed_terms", False))
    cb = meta.get("codebook")
    codebook = torch.tensor(cb, dtype=torch.float32) if isinstance(cb, list) and cb else None
    if example is None:
        example = example_input(model, meta.get("recipe"), None)
    state = model.state_dict()
    numel = sum(t.numel() for t in state.values() if t.is_floating_point())
    fp32 = 4 * numel
    int8 = numel + 4 * sum(1 for t in state.values() if t.is_floating_point())  # + one scale per tensor
    counts = _fixed_counts(model, example, b, signed)
    built: dict[str, tuple[dict[str, bytes], dict[str, Any]]] = {}
    for n in names:
        built[n] = run_target(n, model, example, codebook=codebook, b=b, signed_terms=signed)
    summary: dict[str, Any] = {"folder": str(folder), "fp32_bytes": fp32, "int8_bytes": int8,
                               "operations": counts, "targets": {}}
    for n, (files, info) in built.items():
        for fname, data in files.items():
            atomic_write_bytes(folder / fname, data)
        main = next(iter(files))
        size = len(files[main])
        summary["targets"][n] = {"file": main, "bytes": size, "vs_fp32": fp32 / size if size else None,
                                 "vs_int8": int8 / size if size else None, **info}
    atomic_write_json(folder / TARGETS_FILE, summary)
    return summary
