"""The export folder: every file of an export computed and checked in memory, then written at once.

An export folder (``<run_dir>/export/`` unless told otherwise) holds:

- ``model.safetensors`` the point-estimate state_dict, bit for bit what the run produced;
- ``model.pwfn``        the packed artefact (:mod:`pwfn.export.artefact`);
- ``model.onnx``        with ``onnx=True`` and the ``onnx`` extra installed;
- ``size.json``         the size report (:mod:`pwfn.export.size`, also merged into the run's
                        ``report.json``);
- ``model.json``        recipe, method, file checksums; written last, so its presence
                        means the files it lists are complete.

The files are written into a staging folder next to the destination, which is then renamed
into place; a failure leaves the previous export untouched.

A run folder is read through its manifest (:mod:`pwfn.run.manifest`): method, ``b``, signed
terms, recipe, quantised tensors, codebook and input shape come from what the run recorded,
never from ``config.yaml`` or the dataset. A run that never finished is exported from its
checkpoint (with ``allow_unfixed``). Writing an export needs ``bayes`` (a Bayesian model or
checkpoint is turned into its point estimate), which is why ``pwfn.export`` loads this module
on first use: loading an export never imports ``bayes``.

Why one module of this length (just above the usual): it is one idea, an export folder,
written at once from a run folder or a model; the artefact itself is :mod:`pwfn.export.artefact`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

import bayes

from ..common.files import parse_json, read_limited
from ..common.hints import install_hint, start_over
from ..common.io import atomic_write_json, load_checkpoint
from ..errors import (
    ArtefactError,
    CheckpointError,
    ConfigError,
    ModelError,
    PwfnError,
    RunFileError,
)
from ..methods import get_method, method_names
from ..model import recipes
from ..model.recipes import recipe_of
from ..run.lock import acquire
from ..run.manifest import (
    MANIFEST_FILE,
    POINT_MODEL_FILE,
    POINT_MODEL_JSON,
    DamagedPointModelError,
    load_json,
    load_manifest,
    read_point_model,
    read_report,
)
from . import packing
from .artefact import (
    EXPORT_DIR,
    EXPORT_FORMAT,
    MODEL_FILE,
    ONNX_FILE,
    PACKED_FILE,
    SIZE_FILE,
    ExportError,
    build_model,
    caller_model,
    clean_state,
    infer_b,
    pack_artefact,
)
from .ownership import check_replaceable, write_export_folder
from .size import onnx_size, size_summary
from .targets import build_targets, check_targets, example_input
from .targets.onnx import export_onnx

__all__ = ["export_model", "export_run"]

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _finish_lazy(model: nn.Module, example: Tensor) -> None:
    """Let lazy modules (``nn.LazyLinear`` ...) of a model rebuilt from its recipe become the layers they
    stand for (``nn.Linear`` ...), which the targets' handlers take: loading the weights gave them their
    shapes and values, and one forward pass on the example (eval mode, no gradient) finishes what torch
    leaves to it. The weights are not changed."""
    if not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    except Exception as exc:  # noqa: BLE001 - the user's model: said with the input it was given
        raise ExportError(f"the model's lazy modules could not be finished with one forward pass on the example "
                          f"input {tuple(example.shape[1:])}: {type(exc).__name__}: {exc}; pass example_input "
                          "(Python) with a batch of your data") from exc
    finally:
        model.train(was_training)


def _onnx_export(
    model: nn.Module, example: Tensor, codebook: Tensor | None = None
) -> tuple[bytes | None, dict[str, Any]]:
    """Codebook ONNX (value tables + packed indices + Gather, ``pwfn.export.targets.onnx``) checked
    against torch and the fp32 ONNX with onnxruntime, or a note on why it was skipped."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        msg = (
            f"ONNX export needs the 'onnx' extra ({exc.name or exc} is not installed): "
            f"{install_hint('onnx')}"
        )
        log.warning("%s", msg)
        return None, {"skipped": msg}
    try:
        return export_onnx(model, example, codebook)
    except PwfnError as exc:
        raise ExportError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# preparing an export in memory


@dataclass
class _Prepared:
    """An export computed and verified in memory, ready to be written."""

    source: str
    out_dir: Path
    files: dict[str, bytes]
    model_json: dict[str, Any]
    result: dict[str, Any]
    report_path: Path | None = None
    report: dict[str, Any] | None = None


def _prepare(
    state: Mapping[str, Tensor],
    quantised: Iterable[str],
    out_dir: Path,
    recipe: Mapping[str, Any] | None,
    *,
    method: str,
    b: int,
    signed_terms: bool,
    codebook: Tensor | None,
    masks: Mapping[str, Tensor] | None,
    allow_unfixed: bool,
    onnx: bool,
    model: nn.Module | None,
    example: Tensor | None,
    image_size: int | None,
    source: str,
    extra_metadata: Mapping[str, Any] | None,
    not_finished: str | None = None,
    targets: Iterable[str] = (),
    example_record: Mapping[str, Any] | None = None,
    no_model_reason: str = "",
) -> _Prepared:
    t0 = time.perf_counter()
    targets = check_targets(targets)
    if targets and model is None:
        hint = "" if "--model" in no_model_reason else (
            f"; pass it: pwfn export RUN --to {','.join(targets)} --model mypkg.models:make_model (model= in Python)")
        raise ExportError(f"{source} records no model recipe, and device targets ({', '.join(targets)}) need the "
                          f"model itself: {no_model_reason or 'no model was given'}{hint}")
    art = pack_artefact(state, quantised, recipe, method=method, b=b, signed_terms=signed_terms, codebook=codebook,
                        masks=masks, allow_unfixed=allow_unfixed, source=source, extra_metadata=extra_metadata,
                        not_finished=not_finished)
    files: dict[str, bytes] = {MODEL_FILE: st_save(art.state), PACKED_FILE: art.packed}
    onnx_info: dict[str, Any] | None = None
    x: Tensor | None = None
    if model is not None and (targets or onnx):
        x = example if example is not None else example_input(model, recipe, image_size, example_record)
        _finish_lazy(model, x)
    if onnx and "onnx" not in targets:
        if model is None:
            onnx_info = {"skipped": f"no model recipe: the model cannot be rebuilt for ONNX export ({no_model_reason})"}
        else:
            data, onnx_info = _onnx_export(model, x, art.codebook)
            if data is not None:
                files[ONNX_FILE] = data
    target_summary: dict[str, Any] | None = None
    if targets:
        try:
            target_files, target_summary = build_targets(model, targets, example=x, codebook=art.codebook, b=b,
                                                         signed_terms=signed_terms, folder=str(out_dir))
        except PwfnError as exc:
            raise ExportError(f"{exc}. Nothing was written") from exc
        files.update(target_files)
        if "onnx" in targets:
            onnx_info = target_summary["targets"]["onnx"]

    notes = art.metadata["unfixed"]["tensors"]
    size = size_summary(art.state, art.quantised, art.packed, b=b, signed_terms=signed_terms, unfixed=notes)
    if ONNX_FILE in files and onnx_info:
        size["onnx"] = onnx_size(onnx_info, size)
    files[SIZE_FILE] = (json.dumps(size, indent=2) + "\n").encode("utf-8")
    model_json = {
        "format": "pwfn-export",
        "format_version": EXPORT_FORMAT,
        "packed_format_version": packing.FORMAT_VERSION,
        "recipe": art.metadata["recipe"],
        "method": method,
        "b": b,
        "signed_terms": signed_terms,
        "fixed": art.fixed,
        "unfixed": art.metadata["unfixed"],
        "not_finished": not_finished,
        "tensors": list(art.state),
        "shared": art.metadata["shared"],
        "tensor_order": art.metadata["tensor_order"],
        "quantised_tensors": art.quantised,
        "codebook": [float(v) for v in art.codebook.tolist()],
        "example": dict(example_record) if example_record else _record_of(x),
        "source": source,
        "pwfn_version": art.metadata["pwfn_version"],
    }
    result: dict[str, Any] = {
        "source": source,
        "out_dir": str(out_dir),
        "method": method,
        "fixed": art.fixed,
        "unfixed_weights": art.unfixed_weights,
        "not_finished": not_finished,
        "files": {name: len(data) for name, data in files.items()},
        "size": size,
        "onnx": onnx_info,
        "targets": target_summary,
        "recipe": art.metadata["recipe"],
        "seconds": 0.0,
    }
    result["seconds"] = time.perf_counter() - t0
    return _Prepared(source, out_dir, files, model_json, result)


def _record_of(x: Tensor | None) -> dict[str, Any] | None:
    """What an export records of the example input its checks used (shape without the batch, dtype)."""
    if x is None:
        return None
    out: dict[str, Any] = {"shape": [int(d) for d in x.shape[1:]], "dtype": str(x.dtype).replace("torch.", "")}
    if not x.is_floating_point() and not x.is_complex() and x.numel():
        out["max"] = int(x.max())
    return out


# --------------------------------------------------------------------------------------------
# writing it


def _check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or an earlier pwfn export that pwfn can prove it wrote (replaced as a whole)."""
    check_replaceable(out)


def _write(p: _Prepared) -> dict[str, Any]:
    """Write the export into a staging folder next to ``out_dir`` and rename it into place
    (:func:`pwfn.export.ownership.write_export_folder`: a failure leaves the previous export as it
    was; a folder pwfn cannot prove it wrote is refused). Then the size is merged into the run's
    report.json."""
    write_export_folder(p.out_dir, p.files, p.model_json)
    if p.report_path is not None and p.report is not None:
        report = dict(p.report)
        report["size"] = p.result["size"]
        report["export"] = {
            "folder": str(p.out_dir),
            "files": p.result["files"],
            "fixed": p.result["fixed"],
            "unfixed_weights": p.result["unfixed_weights"],
        }
        atomic_write_json(p.report_path, report)
    log.info("exported %s to %s", p.source, p.out_dir)
    return p.result


# --------------------------------------------------------------------------------------------
# Python API: export a model


def _plain_state(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """The point-estimate model and its state_dict.

    A Bayesian model (Gaussian parameters from ``bayes``) is turned into its point estimate first.
    """
    if bayes.is_bayesian(model):
        model = bayes.to_point_estimate(model)
    return model, dict(model.state_dict())


def export_model(
    model: nn.Module,
    quantised_names: Iterable[str],
    out_dir: PathLike,
    recipe: Mapping[str, Any] | None = None,
    *,
    method: str = "pwfn",
    signed_terms: bool | None = None,
    b: int | None = None,
    codebook: Tensor | None = None,
    allow_unfixed: bool = False,
    onnx: bool = False,
    example_input: Tensor | None = None,
    metadata: Mapping[str, Any] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    targets: Iterable[str] = (),
) -> dict[str, Any]:
    """Export a fixed (point or Bayesian) model to ``out_dir``; returns the export summary.

    ``quantised_names`` are state_dict keys of the point model (``QuantView(...).names()``).
    ``recipe`` (``{"name": registered model, "kwargs": {...}}`` or ``{"factory": "module:qualname",
    "kwargs": {...}}``, :mod:`pwfn.model.recipes`) lets the loaders rebuild the model; without it, the
    model's own recipe is used when one can be recorded (:func:`pwfn.model.recipes.recipe_of`), else
    the loaders need ``model=``. ``method`` is recorded with the artefact;
    ``signed_terms`` picks the codebook's power-of-two terms (default: as the method fixes them,
    its ``signed_terms``: signed for WFN and published WFN, positive for PWFN). ``codebook`` (optional) restricts which values count
    as fixed; ``masks`` (name -> bool tensor, e.g. ``Fixer``/``QuantView.masks()``) do the same.
    Unfixed values raise ``ExportError`` unless ``allow_unfixed``. ``targets`` (``["onnx", "tflm",
    "hls4ml"]``) are built from ``model`` and checked before anything is written. ``model`` itself
    is not modified. ``b`` (smallest term 2^-b) defaults to the smallest of 7..24 at which every
    quantised value is a sum of powers of two (7 when none is): PWFN's tensor-scaled grid gives
    small tensors terms finer than 2^-7.
    """
    point, state = _plain_state(model)
    quantised_names = list(quantised_names)
    if b is None:
        b = infer_b(state, quantised_names)
    why = ""
    if recipe:  # check now that the loaders will be able to rebuild it
        try:
            point = build_model(recipe, clean_state(state), "the given model", functions=True)
        except ModelError as exc:
            raise ExportError(str(exc)) from exc
    else:
        recipe, why = recipe_of(point)
    prepared = _prepare(
        state,
        quantised_names,
        Path(out_dir),
        recipe,
        method=method,
        b=b,
        signed_terms=get_method(method).signed_terms if signed_terms is None else signed_terms,
        codebook=codebook,
        masks=masks or None,
        allow_unfixed=allow_unfixed,
        onnx=onnx,
        model=point,
        example=example_input,
        image_size=None,
        source=f"model {type(model).__name__}",
        extra_metadata=metadata,
        targets=targets,
        no_model_reason=why,
    )
    return _write(prepared)


# --------------------------------------------------------------------------------------------
# Python API: export a run folder


def _rounds_done(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return "no round completed"
    try:  # only a count and the last fixed fraction are needed: bounded, checked reads of each line
        text = read_limited(path, "round log", 64 << 20).decode("utf-8")
        rows = [parse_json(line, f"round log {str(path)!r}") for line in text.splitlines() if line.strip()]
    except (PwfnError, UnicodeDecodeError):
        return "its round log is unreadable"
    if not rows:
        return "no round completed"
    last = rows[-1] if isinstance(rows[-1], dict) else {}
    frac = last.get("fixed_fraction")
    frac = float(frac) if isinstance(frac, (int, float)) and not isinstance(frac, bool) else 0.0
    return f"{len(rows)} round(s) completed, {100.0 * frac:.1f}% fixed"


def _state_from_checkpoint(run_dir: Path, method: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Point-estimate state and fixed masks from an unfinished run's checkpoint."""
    path = run_dir / "checkpoint.pt"
    try:
        ckpt = load_checkpoint(path, kind=f"run-{method}")
    except CheckpointError as exc:
        raise ExportError(f"cannot read the run's checkpoint: {exc}") from exc
    state = bayes.point_state_dict(ckpt["model"])
    masks = ckpt.get("masks")
    if not isinstance(masks, dict) or any(k not in state for k in masks):
        raise ExportError(f"{path} holds no fixed masks that fit its model: it was written by an older pwfn; "
                          f"rerun the method with {start_over()}")
    return state, dict(masks)


def _signed_terms(manifest: Mapping[str, Any] | None, description: Mapping[str, Any] | None, run_dir: Path) -> bool:
    """The run's signed-terms setting: the manifest's engine record, else the point model's description."""
    if manifest is not None:
        return bool(manifest["engine"]["signed_terms"])
    if description is not None and isinstance(description.get("signed_terms"), bool):
        return description["signed_terms"]
    raise ExportError(f"{run_dir / MANIFEST_FILE} is missing and nothing else in the folder records the run's "
                      "engine settings (b, signed terms); rerun its command to rewrite the run folder")


def _prepare_run(
    run_dir: Path, out_dir: Path | None, allow_unfixed: bool, onnx: bool, *, model_arg: Any = None,
    targets: Iterable[str] = (), example: Tensor | None = None,
) -> _Prepared:
    """Everything export needs, read through the run's manifest (method, b, signed terms, recipe,
    quantised tensors, codebook, input shape) and validated: nothing is re-derived from
    ``config.yaml`` or the dataset. A point model that does not match the manifest is damaged
    and refused. ``model_arg`` (``model=``) overrides the run's recipe."""
    if not run_dir.is_dir():
        raise ExportError(f"run folder {str(run_dir)!r} does not exist")
    out = out_dir if out_dir is not None else run_dir / EXPORT_DIR
    report_path = run_dir / "report.json"
    report: dict[str, Any] | None = None
    masks: dict[str, Tensor] | None = None
    codebook: Tensor | None = None
    not_finished: str | None = None
    manifest = load_manifest(run_dir)
    b = int(manifest["engine"]["b"]) if manifest else 7
    inputs = (manifest["inputs"] if manifest else None) or {}
    shape = (inputs.get("data") or {}).get("input_shape") or []
    image_size = int(shape[1]) if len(shape) == 3 and isinstance(shape[1], int) else None
    example_record = inputs.get("example") if isinstance(inputs.get("example"), dict) else None
    if example_record is None and shape:
        example_record = {"shape": list(shape), "dtype": "float32"}

    if report_path.exists():
        report = read_report(report_path)
        method = report["method"]
        if manifest is not None and manifest["method"] != method:
            raise ExportError(f"{report_path} is a {method} report but {MANIFEST_FILE} describes a "
                              f"{manifest['method']} run: the folder mixes two runs; rerun its command")
        final = report["final"]
        fractions = report["fractions"]
        if final.get("fixed_fraction") != 1.0 or (fractions and fractions[-1] != 1.0):
            not_finished = (
                f"its final round reached {100.0 * float(final.get('fixed_fraction') or 0.0):.2f}% fixed, not 100%"
            )
        elif manifest is not None and manifest["status"] != "finished":
            not_finished = "it has not finished writing its point model (rerun its command to finish it)"
        st_path, meta_path = run_dir / POINT_MODEL_FILE, run_dir / POINT_MODEL_JSON
        if not st_path.exists() or not meta_path.exists():
            raise ExportError(f"{run_dir} has report.json but no {POINT_MODEL_FILE}/{POINT_MODEL_JSON}")
        try:
            meta, state = read_point_model(run_dir, manifest if manifest and manifest["status"] == "finished" else None)
        except DamagedPointModelError as exc:
            raise ExportError(f"{exc}. A damaged point model is never exported") from exc
        except RunFileError as exc:
            raise ExportError(f"{exc}. If the run was written by an older pwfn, rerun its command to rewrite "
                              "the point model with a checksum") from exc
        recipe = meta.get("recipe")
        if manifest is None and isinstance(meta.get("b"), int) and 0 <= meta["b"] <= 24:
            b = meta["b"]  # no manifest: the point model's own checksummed description says b
        signed_terms = _signed_terms(manifest, meta, run_dir)
        if manifest is not None:
            quantised = [q["name"] for q in manifest["quantised"]]
        else:
            quantised = list(report["quantised_tensors"])
        if not quantised:
            raise ExportError(f"{report_path} lists no quantised_tensors")
        cb = manifest.get("codebook") if manifest and manifest.get("codebook") is not None else final.get("codebook")
        if isinstance(cb, list):
            codebook = torch.tensor(cb, dtype=torch.float64)
    else:
        if not (run_dir / "checkpoint.pt").exists():
            if (run_dir / "compare.json").exists():
                raise ExportError(f"{run_dir} is a comparison folder; export_run handles it, not _prepare_run")
            raise ExportError(
                f"{str(run_dir)!r} holds no report.json or checkpoint.pt: is it a pwfn method folder "
                "(runs/<name>/pwfn or runs/<name>/wfn)?"
            )
        not_finished = f"it has no report.json ({_rounds_done(run_dir)})"
        if not allow_unfixed:
            raise ExportError(
                f"run {str(run_dir)!r} is not 100% fixed: {not_finished}; finish it (rerun the same "
                "command to resume) or pass --allow-unfixed to export the unfixed weights as raw floats"
            )
        signed_terms = _signed_terms(manifest, None, run_dir)  # refuses a run without a manifest
        method = manifest["method"]
        state, masks = _state_from_checkpoint(run_dir, method)
        quantised = [q["name"] for q in manifest["quantised"]]
        recipe = manifest["recipe"]

    if not_finished and not allow_unfixed:
        raise ExportError(
            f"run {str(run_dir)!r} is not 100% fixed: {not_finished}; pass --allow-unfixed to export "
            "the unfixed weights as raw floats"
        )
    model, recipe, why = _run_model(run_dir, recipe, state, model_arg)
    if why and manifest is not None and isinstance(manifest.get("recipe_note"), str):
        why = manifest["recipe_note"][:2000]
    if model is not None and list(model.state_dict()) != list(state) and set(model.state_dict()) == set(state):
        state = {k: state[k] for k in model.state_dict()}  # the model's key order is the one users expect
    prepared = _prepare(
        state,
        quantised,
        out,
        recipe,
        method=method,
        b=b,
        signed_terms=signed_terms,
        codebook=codebook,
        masks=masks,
        allow_unfixed=allow_unfixed,
        onnx=onnx,
        model=model,
        example=example,
        image_size=image_size,
        source=str(run_dir),
        extra_metadata={"run": run_dir.name, "run_name": run_dir.parent.name},
        not_finished=not_finished,
        targets=targets,
        example_record=example_record,
        no_model_reason=why,
    )
    prepared.report_path = report_path if report is not None else None
    prepared.report = report
    return prepared


def _run_model(run_dir: Path, recipe: Any, state: Mapping[str, Tensor], model_arg: Any
               ) -> tuple[nn.Module | None, dict[str, Any] | None, str]:
    """The point model an export checks and converts, the recipe it records, and (without a model)
    why there is none. ``model_arg`` (the caller's ``model=``) wins over the run's recipe; a
    recipe that does not build the model of these weights is refused (checked on the meta device
    first: a hand-edited recipe never allocates what it claims)."""
    where = str(run_dir)
    try:
        if model_arg is not None:
            model = caller_model(model_arg, recipe, clean_state(state), where)
            if isinstance(model_arg, nn.Module):
                own, _ = recipe_of(model_arg)
                chosen = own or recipe
            else:
                chosen = (recipes.parse_model_spec(model_arg, None, recipe) if isinstance(model_arg, str)
                          else recipes.validate_recipe(model_arg, "model="))
            return model, chosen, ""
        if not recipe:
            return None, None, "the model was passed in from Python and its recipe could not be recorded"
        return build_model(recipe, clean_state(state), where), dict(recipe), ""
    except (ModelError, ArtefactError, ConfigError) as exc:
        if model_arg is not None:
            raise ExportError(f"{exc}. The model given cannot take the run's weights") from exc
        if isinstance(exc, (ArtefactError, recipes.RecipeMismatch)) or "cannot be built" in str(exc):
            raise ExportError(f"{exc}. The run's recipe and weights do not match (was the recipe edited?): rerun "
                              "its command to rewrite the point model, or pass the model (--model module:factory, "
                              "model=)") from exc
        raise ExportError(f"{exc}; or pass the model (--model module:factory, model=)") from exc


def export_run(
    run_dir: PathLike,
    out_dir: PathLike | None = None,
    *,
    allow_unfixed: bool = False,
    onnx: bool = False,
    targets: Iterable[str] = (),
    model: Any = None,
    example_input: Tensor | None = None,
) -> dict[str, Any]:
    """Export a method run folder (``runs/<name>/pwfn``) into ``<run_dir>/export/``.

    Given a comparison folder (``runs/<name>`` with ``compare.json``) every method subfolder
    is exported (into ``<out_dir>/<method>`` when ``out_dir`` is given) and the result is
    ``{"runs": {method: summary}}``. All of them are prepared and verified before any file is
    written, so one refusal exports nothing. Raises ``ExportError`` for a run that is not
    100 % fixed unless ``allow_unfixed``. The run's engine settings (``b``, signed terms) come
    from its ``manifest.json`` (without one, from the point model's checksummed description);
    a run that records neither is refused, naming the missing manifest.

    ``targets`` (``["onnx", "tflm", "hls4ml"]``, see :mod:`pwfn.export.targets`) are built and
    checked with the rest, before anything is written. ``model`` rebuilds the model when the run
    records no recipe (a model passed in from Python whose recipe could not be recorded) or a
    function factory: your model instance, ``"module:factory"``, or a recipe dict.
    ``example_input`` (a batch) replaces the recorded input shape for the checks.
    """
    folder = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else None
    targets = check_targets(targets)  # unknown names and missing extras: refused before any work
    if not folder.is_dir():
        what = "is a file, not a run folder" if folder.exists() else "does not exist"
        raise ExportError(f"run folder {str(folder)!r} {what}")
    if out is not None:
        _check_out_dir(out)
    kw = {"model_arg": model, "targets": targets, "example": example_input}
    if (folder / "compare.json").exists() and not (folder / "report.json").exists():
        methods = [m for m in method_names() if (folder / m).is_dir()]
        try:
            listed = load_json(folder / "compare.json", "comparison")
        except PwfnError as exc:
            raise ExportError(f"{exc}; rerun the comparison to rewrite it, or export each method folder") from exc
        if isinstance(listed, dict) and isinstance(listed.get("methods"), dict):
            methods = [m for m in listed["methods"] if m in method_names() and (folder / m).is_dir()] or methods
        if not methods:
            raise ExportError(f"comparison folder {str(folder)!r} has no method subfolders")
        if out is not None:
            for m in methods:
                _check_out_dir(out / m)
        else:
            for m in methods:
                _check_out_dir(folder / m / EXPORT_DIR)
        with acquire(folder, "comparison folder"):  # no run writes into it while we read and write
            prepared = [
                _prepare_run(folder / m, (out / m) if out is not None else None, allow_unfixed, onnx, **kw)
                for m in methods
            ]
            return {"source": str(folder), "runs": {m: _write(p) for m, p in zip(methods, prepared)}}
    _check_out_dir(out if out is not None else folder / EXPORT_DIR)
    with acquire(folder):
        return _write(_prepare_run(folder, out, allow_unfixed, onnx, **kw))
