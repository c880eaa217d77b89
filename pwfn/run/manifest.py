"""The run manifest: the one owner of what a run folder holds, and every check on reading it.

A method folder (``runs/<name>/pwfn``, or the ``run_dir`` of ``pwfn.compress``) holds
``manifest.json``, written when the run starts and again when it finishes. It records:

- ``method`` and the engine settings that define the codebook (``b``, ``max_order``,
  ``signed_terms``), so export never re-derives them from ``config.yaml``;
- the model ``recipe`` (registered name + keyword arguments) and the data's input shape;
- ``quantised``: every quantised tensor (qualified name, owner module type, numel, and the
  names sharing that tensor), from :func:`quantised_tensors`;
- ``inputs``: fingerprints of everything the results depend on: the config, the
  ``model.checkpoint`` file (SHA-256), the data (content hash of in-memory arrays, or the file
  list with sizes and mtimes of an image folder, or what is cheap for Python loaders) and the
  float model handed to the method (architecture and weights). A resume under different
  inputs is refused with the changed inputs named (:func:`pwfn.run.fingerprints.changed_inputs`);
- once finished: the ``codebook`` and the ``point_model`` (file, SHA-256, tensor names), so
  a zeroed, NaN or otherwise edited point model is caught as *damaged* before it is exported.

Every read of a run-folder file goes through this module: :func:`load_json` (regular file,
size and nesting-depth limits), then a schema check (:func:`validate_report`,
:func:`read_metrics`, :func:`validate_compare`, :func:`validate_description`,
:func:`load_manifest`); any problem raises :class:`RunFileError` naming the file.

The manifest is versioned (``version``); a reader accepts its own version and refuses a newer
one with a clear message. Fields may be added within a version (readers ignore unknown keys).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from .. import __version__
from ..common.files import (
    parse_json,
    read_limited,
)
from ..errors import ModelError, PwfnError, RunFileError
from ..methods import method_names
from ..model import recipes

# The fingerprints were split off into pwfn.run.fingerprints in 0.2; all but sha256_bytes (used
# here) are imported only so that they stay importable from here (and pwfn.manifest) for one release.
from .fingerprints import (  # noqa: F401
    InputsChangedError,
    changed_inputs,
    data_fingerprint,
    file_fingerprint,
    loader_fingerprint,
    model_fingerprint,
    refuse_changed_inputs,
    sha256_bytes,
    splits_fingerprint,
)

PathLike = Union[str, os.PathLike]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pwfn-run-manifest"
MANIFEST_VERSION = 1

POINT_MODEL_FILE = "point_model.safetensors"
POINT_MODEL_JSON = "point_model.json"
POINT_FORMAT = "pwfn-point-model"
POINT_FORMAT_VERSION = 1


#: limits on run-folder files read back (a hand-edited or hostile file is refused, never parsed at length)
MAX_JSON_BYTES = 256 << 20
MAX_LINE_BYTES = 16 << 20


class DamagedPointModelError(RunFileError):
    """The run's point model does not match its manifest (edited, zeroed, NaN, another recipe)."""


def load_json(path: PathLike, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of a run folder, read within limits; any problem raises RunFileError naming it."""
    data = read_limited(path, what, max_bytes)
    return parse_json(data, f"{what} {str(path)!r}")


# --------------------------------------------------------------------------------------------
# schema checks


def _type_word(types: tuple) -> str:
    words = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true/false", type(None): "null"}
    return " or ".join(dict.fromkeys(words.get(t, t.__name__) for t in types))


def _check(obj: Any, types: tuple, where: str) -> Any:
    ok = isinstance(obj, types) and not (isinstance(obj, bool) and bool not in types)
    if ok and isinstance(obj, float) and not math.isfinite(obj) and float in types:
        ok = True  # NaN/inf metrics are legal values in a report (json writes them as NaN)
    if not ok:
        raise RunFileError(f"{where} should be {_type_word(types)}, found {type(obj).__name__} {_short(obj)}")
    return obj


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


NUM = (int, float)
OPT_NUM = (int, float, type(None))


def _field(obj: Mapping, key: str, types: tuple, where: str, *, required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise RunFileError(f"{where} lacks the key {key!r}")
        return None
    return _check(obj[key], types, f"{where}: {key!r}")


def _metrics_block(obj: Any, where: str) -> dict:
    """An evaluation result ({"top1": ..., "top5": ..., "loss": ...})."""
    _check(obj, (dict,), where)
    _field(obj, "top1", OPT_NUM, where, required=False)
    _field(obj, "top5", OPT_NUM, where, required=False)
    return obj


def validate_round(row: Any, where: str) -> dict:
    """One row of ``metrics.jsonl`` / ``report.json``'s rounds."""
    _check(row, (dict,), where)
    _field(row, "round", (int,), where)
    _field(row, "fraction", NUM, where)
    _metrics_block(_field(row, "after_fix", (dict,), where), f"{where}: 'after_fix'")
    if "after_train" in row:
        _metrics_block(row["after_train"], f"{where}: 'after_train'")
    for key in ("fixed_fraction", "entropy", "entropy_nonzero", "wall_seconds", "fix_seconds"):
        _field(row, key, OPT_NUM, where, required=False)
    for key in ("unique", "unique_nonzero"):
        _field(row, key, (int, type(None)), where, required=False)
    if "order_shares" in row:
        shares = _check(row["order_shares"], (dict,), f"{where}: 'order_shares'")
        for k, v in shares.items():
            _check(v, NUM, f"{where}: 'order_shares'[{k!r}]")
    return row


def _number_list(obj: Any, where: str) -> list:
    _check(obj, (list,), where)
    for i, v in enumerate(obj):
        _check(v, NUM, f"{where}[{i}]")
    return obj


def _string_list(obj: Any, where: str) -> list:
    _check(obj, (list,), where)
    for i, v in enumerate(obj):
        _check(v, (str,), f"{where}[{i}]")
    return obj


def validate_report(obj: Any, where: str) -> dict:
    """A method's ``report.json``: the keys and types that report, doctor and export rely on."""
    _check(obj, (dict,), where)
    method = _field(obj, "method", (str,), where)
    if method not in method_names():
        raise RunFileError(f"{where}: 'method' is {method!r}, not one of {list(method_names())}")
    _number_list(_field(obj, "fractions", (list,), where), f"{where}: 'fractions'")
    for i, row in enumerate(_field(obj, "rounds", (list,), where)):
        validate_round(row, f"{where}: rounds[{i}]")
    final = _field(obj, "final", (dict,), where)
    for key in ("test", "val", "point_model_test"):
        if key in final:
            _metrics_block(final[key], f"{where}: final {key!r}")
    _field(final, "fixed_fraction", OPT_NUM, f"{where}: 'final'", required=False)
    for key in ("entropy", "entropy_nonzero"):
        _field(final, key, OPT_NUM, f"{where}: 'final'", required=False)
    for key in ("unique", "unique_nonzero"):
        _field(final, key, (int, type(None)), f"{where}: 'final'", required=False)
    if "codebook" in final:
        _number_list(final["codebook"], f"{where}: final 'codebook'")
    if "order_shares" in final:
        for k, v in _check(final["order_shares"], (dict,), f"{where}: final 'order_shares'").items():
            _check(v, NUM, f"{where}: final 'order_shares'[{k!r}]")
    if "mc" in final:
        mc = _check(final["mc"], (dict,), f"{where}: final 'mc'")
        _field(mc, "samples", (int,), f"{where}: final 'mc'")
        _field(mc, "nll", NUM, f"{where}: final 'mc'")
        _field(mc, "ece", NUM, f"{where}: final 'mc'")
    _string_list(_field(obj, "quantised_tensors", (list,), where), f"{where}: 'quantised_tensors'")
    if "baseline" in obj:
        base = _check(obj["baseline"], (dict,), f"{where}: 'baseline'")
        _metrics_block(_field(base, "test", (dict,), f"{where}: 'baseline'"), f"{where}: baseline 'test'")
    if "size" in obj:
        size = _check(obj["size"], (dict,), f"{where}: 'size'")
        if "total" in size:
            _check(size["total"], (dict,), f"{where}: size 'total'")
    if "export" in obj:
        _check(obj["export"], (dict,), f"{where}: 'export'")
    return obj


def read_report(path: PathLike) -> dict:
    return validate_report(load_json(path, "run report"), f"run report {str(path)!r}")


def read_metrics(path: PathLike) -> list[dict]:
    """The rows of ``metrics.jsonl``; a garbage line raises RunFileError naming its line number."""
    data = read_limited(path, "round log", MAX_JSON_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunFileError(f"round log {str(path)!r} is not UTF-8 text: {exc}") from exc
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"round log {str(path)!r}, line {i}"
        if len(line) > MAX_LINE_BYTES:
            raise RunFileError(f"{where} is longer than {MAX_LINE_BYTES:,} characters")
        rows.append(validate_round(parse_json(line, where), where))
    return rows


def validate_compare(obj: Any, where: str) -> dict:
    """``compare.json``: baseline, methods and the comparison table."""
    _check(obj, (dict,), where)
    methods = _field(obj, "methods", (dict,), where)
    for name, entry in methods.items():
        if name not in method_names():
            raise RunFileError(f"{where}: 'methods' names {name!r}, not one of {list(method_names())}")
        _check(entry, (dict,), f"{where}: methods[{name!r}]")
    table = _field(obj, "table", (list,), where)
    for i, row in enumerate(table):
        w = f"{where}: table[{i}]"
        _check(row, (dict,), w)
        _field(row, "method", (str,), w)
        for key in ("top1", "top5", "entropy", "entropy_nonzero", "seconds"):
            _field(row, key, OPT_NUM, w, required=False)
        for key in ("unique", "unique_nonzero"):
            _field(row, key, (int, type(None)), w, required=False)
    return obj


def read_compare(path: PathLike) -> dict:
    return validate_compare(load_json(path, "comparison"), f"comparison {str(path)!r}")


def validate_recipe(recipe: Any, where: str) -> Optional[dict]:
    """A model recipe (:mod:`pwfn.model.recipes`): null, ``{"name": str, "kwargs": {...}}`` or
    ``{"factory": "module:qualname", "kwargs": {...}}``; malformed raises ``RunFileError``."""
    try:
        return recipes.validate_recipe(recipe, where)
    except ModelError as exc:
        raise RunFileError(str(exc)) from exc


def validate_description(obj: Any, where: str, formats: Iterable[str]) -> dict:
    """A point-model description (``point_model.json`` or an export's ``model.json``)."""
    _check(obj, (dict,), where)
    fmt = _field(obj, "format", (str,), where)
    formats = tuple(formats)
    if fmt not in formats:
        raise RunFileError(f"{where} is not a pwfn model description (format {fmt!r}, expected {formats[0]!r})")
    validate_recipe(obj.get("recipe"), where)
    _string_list(_field(obj, "tensors", (list,), where), f"{where}: 'tensors'")
    if "quantised_tensors" in obj:
        _string_list(obj["quantised_tensors"], f"{where}: 'quantised_tensors'")
    files = _field(obj, "files", (dict,), where)
    for name, info in files.items():
        _check(info, (dict,), f"{where}: files[{name!r}]")
        _field(info, "sha256", (str,), f"{where}: files[{name!r}]")
        _field(info, "bytes", (int,), f"{where}: files[{name!r}]")
    return obj


# --------------------------------------------------------------------------------------------
# quantised tensors


def quantised_tensors(view: Any, coverage: Any = None) -> list[dict]:
    """Every quantised tensor of a ``QuantView``: name, owner module type, numel and sharing.

    ``shared`` lists the other qualified names under which the same tensor is reachable in the
    model (tied weights, a module used twice); the tensor is fixed and stored once, under
    ``name``. ``coverage`` (a ``pwfn.model.coverage.Coverage``) supplies the owner types. This is the
    one place that turns the pipeline's view into the manifest's list.
    """
    owners = {t.name: t.owner_type for t in coverage.tensors} if coverage is not None else {}
    return [{"name": slot.name, "owner": owners.get(slot.name, ""), "numel": int(slot.numel),
             "shared": list(getattr(slot, "aliases", []))} for slot in view.slots]


# --------------------------------------------------------------------------------------------
# the manifest itself


def manifest_path(folder: PathLike) -> Path:
    return Path(folder) / MANIFEST_FILE


def new_manifest(*, method: str, engine: Mapping[str, Any], recipe: Optional[Mapping], inputs: Mapping,
                 quantised: list[dict], config: Optional[Mapping] = None) -> dict:
    """The manifest of a run that is starting (``status: running``)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "pwfn_version": __version__,
        "status": "running",
        "method": method,
        "engine": dict(engine),
        "recipe": dict(recipe) if recipe else None,
        "inputs": dict(inputs),
        "config": dict(config) if config is not None else None,
        "config_sha256": (sha256_bytes(json.dumps(config, sort_keys=True, default=str).encode())
                          if config is not None else None),
        "quantised": list(quantised),
        "codebook": None,
        "point_model": None,
    }


def validate_manifest(obj: Any, where: str) -> dict:
    _check(obj, (dict,), where)
    if obj.get("format") != MANIFEST_FORMAT:
        raise RunFileError(f"{where} is not a pwfn run manifest (format {obj.get('format')!r})")
    version = _field(obj, "version", (int,), where)
    if version > MANIFEST_VERSION:
        raise RunFileError(f"{where} has manifest version {version}; this pwfn reads version {MANIFEST_VERSION} "
                           "and older: upgrade pwfn to read this run")
    if version < 1:
        raise RunFileError(f"{where} has an invalid manifest version {version}")
    method = _field(obj, "method", (str,), where)
    if method not in method_names():
        raise RunFileError(f"{where}: 'method' is {method!r}, not one of {list(method_names())}")
    status = _field(obj, "status", (str,), where)
    if status not in ("running", "finished"):
        raise RunFileError(f"{where}: 'status' is {status!r}, expected 'running' or 'finished'")
    engine = _field(obj, "engine", (dict,), where)
    b = _field(engine, "b", (int,), f"{where}: 'engine'")
    if not 0 <= b <= 24:
        raise RunFileError(f"{where}: engine 'b' = {b} is outside [0, 24]")
    _field(engine, "signed_terms", (bool,), f"{where}: 'engine'")
    obj["recipe"] = validate_recipe(obj.get("recipe"), where)
    _field(obj, "inputs", (dict,), where)
    for i, q in enumerate(_field(obj, "quantised", (list,), where)):
        w = f"{where}: quantised[{i}]"
        _check(q, (dict,), w)
        _field(q, "name", (str,), w)
        _field(q, "numel", (int,), w)
        _string_list(q.get("shared", []), f"{w}: 'shared'")
    if obj.get("codebook") is not None:
        _number_list(obj["codebook"], f"{where}: 'codebook'")
    pm = obj.get("point_model")
    if pm is not None:
        _check(pm, (dict,), f"{where}: 'point_model'")
        _field(pm, "sha256", (str,), f"{where}: 'point_model'")
        _field(pm, "bytes", (int,), f"{where}: 'point_model'")
        _string_list(_field(pm, "tensors", (list,), f"{where}: 'point_model'"), f"{where}: point_model 'tensors'")
    if status == "finished" and (pm is None or obj.get("codebook") is None):
        raise RunFileError(f"{where} says 'finished' but records no point model or codebook")
    return obj


def load_manifest(folder: PathLike) -> Optional[dict]:
    """The folder's validated manifest, or None when it has none (a run written by an older pwfn)."""
    path = manifest_path(folder)
    if not os.path.lexists(path):
        return None
    return validate_manifest(load_json(path, "run manifest"), f"run manifest {str(path)!r}")


def write_manifest(folder: PathLike, manifest: Mapping) -> None:
    from ..common.io import atomic_write_json, to_jsonable

    atomic_write_json(manifest_path(folder), to_jsonable(dict(manifest)))


# --------------------------------------------------------------------------------------------
# the point model: one checksummed format


def point_model_bytes(state: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def describe_point_model(data: bytes, tensors: list[str], recipe: Optional[Mapping], *, fmt: str = POINT_FORMAT,
                         file_name: str = POINT_MODEL_FILE, **extra: Any) -> dict:
    """The description written next to a point model's safetensors (``point_model.json``)."""
    desc = {"format": fmt, "format_version": POINT_FORMAT_VERSION, "recipe": dict(recipe) if recipe else None,
            "tensors": list(tensors), "files": {file_name: {"bytes": len(data), "sha256": sha256_bytes(data)}}}
    desc.update(extra)
    return desc


def write_point_model(folder: PathLike, state: Mapping[str, Any], recipe: Optional[Mapping], **extra: Any) -> dict:
    """Write ``point_model.safetensors`` and its checksummed description; return the manifest's record."""
    from ..common.io import atomic_write_bytes, atomic_write_json, to_jsonable

    folder = Path(folder)
    data = point_model_bytes(state)
    desc = describe_point_model(data, list(state), recipe, **extra)
    atomic_write_bytes(folder / POINT_MODEL_FILE, data)
    atomic_write_json(folder / POINT_MODEL_JSON, to_jsonable(desc))
    return {"file": POINT_MODEL_FILE, "sha256": desc["files"][POINT_MODEL_FILE]["sha256"], "bytes": len(data),
            "tensors": list(state)}


def read_model_files(json_path: Path, st_path: Path, formats: Iterable[str], what: str,
                     error: type[PwfnError] = RunFileError) -> tuple[dict, dict]:
    """A described safetensors file (point model or export): description validated, checksum
    verified, tensors loaded in the described order. Returns (description, state)."""
    from safetensors.torch import load as st_load

    try:
        desc = validate_description(load_json(json_path, f"{what} description"),
                                    f"{what} description {str(json_path)!r}", formats)
        data = read_limited(st_path, what, 1 << 40)
    except RunFileError as exc:
        raise error(str(exc)) from exc
    info = desc["files"].get(st_path.name)
    if info is None:
        raise error(f"{json_path} does not describe {st_path.name}")
    if info["bytes"] != len(data) or sha256_bytes(data) != info["sha256"]:
        raise DamagedPointModelError(
            f"{what} {str(st_path)!r} is damaged: it does not match the checksum in {json_path.name} "
            "(edited, truncated or replaced after it was written)")
    try:
        loaded = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise error(f"cannot read {what} {str(st_path)!r}: {exc}") from exc
    order = desc["tensors"]
    if set(order) != set(loaded):
        raise error(f"{what} {str(st_path)!r} holds other tensors than {json_path.name} lists")
    return desc, {k: loaded[k] for k in order}


def read_point_model(folder: PathLike, manifest: Optional[Mapping] = None) -> tuple[dict, dict]:
    """The run's point model, checked against its description and, given one, its manifest.

    Damage (a checksum or tensor list that differs from the manifest, a recipe that differs, a
    NaN/inf weight, a quantised weight outside the manifest's codebook) raises
    :class:`DamagedPointModelError`: such a point model is never exported.
    """
    import torch

    folder = Path(folder)
    desc, state = read_model_files(folder / POINT_MODEL_JSON, folder / POINT_MODEL_FILE, (POINT_FORMAT,),
                                   "point model")
    where = f"point model {str(folder / POINT_MODEL_FILE)!r}"
    fix = "rerun the run's command to rewrite it (the checkpoint is kept), or restore the file"
    shared = desc.get("shared") or {}
    if not isinstance(shared, dict) or any(not isinstance(c, str) or c not in state for c in shared.values()):
        raise DamagedPointModelError(f"{where} is damaged: its 'shared' record names tensors it does not hold; {fix}")
    for alias, canon in shared.items():  # tied tensors: one stored tensor under every name
        state[alias] = state[canon]
    if manifest is not None:
        pm = manifest.get("point_model")
        if pm is not None:
            if desc["files"][POINT_MODEL_FILE]["sha256"] != pm["sha256"]:
                raise DamagedPointModelError(f"{where} is damaged: it is not the point model {MANIFEST_FILE} "
                                             f"recorded (sha256 differs); {fix}")
            if list(pm["tensors"]) != list(desc["tensors"]):
                raise DamagedPointModelError(f"{where} is damaged: its tensor list differs from {MANIFEST_FILE}; {fix}")
        if validate_recipe(desc.get("recipe"), where) != manifest.get("recipe"):
            raise DamagedPointModelError(f"{where} is damaged: the recipe in {POINT_MODEL_JSON} "
                                         f"({desc.get('recipe')!r}) differs from the run's ({manifest.get('recipe')!r}); {fix}")
    buffers = set(_string_list(desc.get("buffers", []), f"{where}: 'buffers'"))
    for name, t in state.items():
        if not (t.is_floating_point() or t.is_complex()) or not t.numel():
            continue
        if name in buffers:  # a buffer may hold inf (an attention mask), never NaN
            if bool(torch.isnan(t).any()):
                raise DamagedPointModelError(f"{where} is damaged: buffer {name!r} holds NaN; {fix}")
        elif not bool(torch.isfinite(t).all()):
            raise DamagedPointModelError(f"{where} is damaged: tensor {name!r} holds NaN or inf; {fix}")
    if manifest is not None and manifest.get("codebook") is not None:
        cb = torch.tensor(manifest["codebook"], dtype=torch.float64)
        for q in manifest.get("quantised", []):
            t = state.get(q["name"])
            if t is None:
                raise DamagedPointModelError(f"{where} is damaged: quantised tensor {q['name']!r} is missing; {fix}")
            if t.numel() != q["numel"]:
                raise DamagedPointModelError(f"{where} is damaged: {q['name']!r} has {t.numel()} values, "
                                             f"the manifest {q['numel']}; {fix}")
            if t.numel() and not bool(torch.isin(t.detach().to(torch.float64).reshape(-1), cb).all()):
                raise DamagedPointModelError(f"{where} is damaged: {q['name']!r} holds values outside the run's "
                                             f"codebook; {fix}")
    return desc, state


