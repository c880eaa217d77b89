"""What an exported artefact is: the point model's tensors, packed and checked, and read back.

The artefact is the point-estimate state_dict, bit for bit, in two forms: ``model.safetensors``
(described by ``model.json``) and the packed ``model.pwfn`` (:mod:`pwfn.export.packing`), whose
metadata block records the recipe, method, ``b``, signed terms, sharing and what is not fixed.

- Tied tensors (one storage under several state_dict names) are stored once, under their
  first name; the metadata maps every other name to it and the loaders tie them again.
- A quantised value is *fixed* when float32 holds it exactly, it is a multiple of 2^-b (so it
  is a sum of powers of two), it is in the run's codebook and its mask says so. A partly fixed
  tensor is stored as a placeholder coded tensor plus two raw side tensors (positions and
  values of the unfixed entries); a tensor with nothing fixed is stored raw.
- :func:`pack_artefact` builds the packed bytes and decodes them again: what a reader gets
  back must be the state_dict bit for bit, or nothing is exported.

Loading needs only torch, safetensors, numpy and constriction: nothing here imports ``bayes``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load as st_load
from torch import Tensor, nn

from .. import __version__
from ..common.files import read_limited
from ..core import metrics as M
from ..core.centres import decompose
from ..errors import ArtefactError, ModelError, PwfnError, RunFileError
from ..methods import method_names
from ..model import recipes
from ..run.manifest import load_json, sha256_bytes, validate_description
from . import packing
from .packcheck import read_artefact_bytes

__all__ = [
    "EXPORT_DIR", "EXPORT_FORMAT", "MODEL_FILE", "MODEL_JSON", "ONNX_FILE", "PACKED_FILE", "SIZE_FILE", "STAGE_SUFFIX",
    "Artefact", "ExportError", "build_model", "clean_state", "infer_b", "load_exported_model", "load_packed_model",
    "pack_artefact", "reassemble", "shared_keys", "stored_owner",
]

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Version of the export folder layout and of the packed artefact's metadata block
#: (the packed file's own byte format is ``pwfn.export.packing.FORMAT_VERSION``).
EXPORT_FORMAT = 1
EXPORT_DIR = "export"
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
PACKED_FILE = "model.pwfn"
ONNX_FILE = "model.onnx"
SIZE_FILE = "size.json"
#: A staging folder of an export that has not been renamed into place: ``.<folder>.*<suffix>``.
STAGE_SUFFIX = ".tmp-export"
# Side tensors of a partly fixed tensor; ':' never occurs in a state_dict key torch builds.
_POS = "::unfixed_positions"
_VAL = "::unfixed_values"


class ExportError(PwfnError, ValueError):
    """A run or model cannot be exported as asked (not fully fixed, missing or foreign files)."""


# --------------------------------------------------------------------------------------------
# state entries: sharing, clean copies, side tensors


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (dtype, shape and every byte; -0.0 != 0.0, NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    fa = a.detach().reshape(-1).contiguous().cpu()
    fb = b.detach().reshape(-1).contiguous().cpu()
    return torch.equal(fa.view(torch.uint8), fb.view(torch.uint8))


def shared_keys(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Alias -> canonical key for state entries that are one tensor (tied weights, a module used twice).

    Two entries are one tensor when they view the same storage at the same offset with the same
    shape and strides; the canonical key is the first in ``state`` order.
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _check_sharing(model: nn.Module, shared: Mapping[str, str], where: str) -> None:
    """The model must share exactly the tensors the artefact recorded as shared."""
    have = shared_keys(model.state_dict())
    if dict(have) == dict(shared):
        return
    lost = {a: c for a, c in shared.items() if have.get(a) != c}
    extra = {a: c for a, c in have.items() if shared.get(a) != c}
    parts = []
    if lost:
        parts.append("the artefact has " + ", ".join(f"{a} tied to {c}" for a, c in list(lost.items())[:3])
                     + " but the model holds them as separate tensors (tie them, e.g. "
                     "`model.lm_head.weight = model.embed.weight`, before loading)")
    if extra:
        parts.append("the model ties " + ", ".join(f"{a} to {c}" for a, c in list(extra.items())[:3])
                     + " but the artefact holds them as separate tensors (untie them in the model, or export "
                     "from a model with the same sharing)")
    raise ArtefactError(f"{where}: weight sharing differs: " + "; ".join(parts))


def _with_aliases(state: Mapping[str, Tensor], shared: Mapping[str, str], order: Any) -> dict[str, Tensor]:
    """The state with every alias entry pointing at its canonical tensor, in the recorded key order."""
    out = dict(state)
    for alias, canon in shared.items():
        if canon not in out:
            raise ArtefactError(f"the artefact records {alias} as shared with {canon}, which it does not hold")
        out[alias] = out[canon]
    if isinstance(order, list) and set(order) == set(out):
        out = {k: out[k] for k in order}
    return out


def _read_shared(meta: Mapping[str, Any], where: str) -> dict[str, str]:
    shared = meta.get("shared") or {}
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise ArtefactError(f"{where}: malformed 'shared' entry in the export metadata")
    return dict(shared)


def clean_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: safetensors refuses shared storage (tied weights)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise ExportError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        if _POS in name or _VAL in name:
            raise ExportError(f"tensor name {name!r} uses a reserved suffix")
        out[name] = t.detach().cpu().contiguous().clone()
    return out


def stored_owner(name: str) -> str:
    """The state entry a stored tensor belongs to: a split tensor's side tensors belong to it."""
    for suffix in (_POS, _VAL):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def infer_b(state: Mapping[str, Tensor], names: Iterable[str]) -> int:
    """The smallest b in 7..24 at which all quantised values are multiples of 2^-b (7 when none is)."""
    tensors = [state[n].detach().reshape(-1) for n in names if n in state and state[n].is_floating_point()]
    if not tensors:
        return 7
    values = torch.cat([t.to(torch.float64) for t in tensors]).unique()
    for bb in range(7, 25):
        if bool(_decomposable(values, bb).all()):
            return bb
    return 7


def _decomposable(values: Tensor, b: int) -> Tensor:
    """Which float values are sums of powers of two down to 2^-b (i.e. multiples of 2^-b)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    v = values.detach().to(torch.float64)
    return M.term_counts(v, b=b, strict=False) >= 0


# --------------------------------------------------------------------------------------------
# which quantised values are fixed


@dataclass
class _Fixedness:
    """Per quantised tensor, the boolean map of entries that hold a (decomposable) codebook value."""

    fixed: dict[str, Tensor]
    codebook: Tensor  # float32, sorted, distinct (+0.0 for zero)
    unfixed: dict[str, int] = field(default_factory=dict)

    @property
    def unfixed_total(self) -> int:
        return sum(self.unfixed.values())


def _fixedness(
    state: Mapping[str, Tensor],
    quantised: list[str],
    b: int,
    codebook: Tensor | None,
    masks: Mapping[str, Tensor] | None,
) -> _Fixedness:
    """A value is fixed when its mask says so (if given), it is in ``codebook`` (if given),
    float32 holds it exactly and it is a multiple of 2^-b (so it has power-of-two terms)."""
    if not quantised:
        return _Fixedness({}, torch.empty(0, dtype=torch.float32), {})
    # One sort over all quantised values (float64 holds every float dtype exactly): the
    # checks run once per distinct value, not once per weight.
    flats = [state[n].reshape(-1).to(torch.float64) for n in quantised]
    vals, inverse = torch.unique(torch.cat(flats), return_inverse=True)
    ok = torch.isfinite(vals)
    safe = torch.where(ok, vals, torch.zeros_like(vals))
    ok &= safe.to(torch.float32).to(torch.float64) == safe  # packing stores float32
    ok &= _decomposable(safe, b)
    if codebook is not None:
        cb_ref = torch.as_tensor(codebook).detach().reshape(-1).to(torch.float64)
        ok &= torch.isin(vals, cb_ref)
    f_all = ok[inverse]
    fixed: dict[str, Tensor] = {}
    unfixed: dict[str, int] = {}
    for name, f in zip(quantised, torch.split(f_all, [t.numel() for t in flats])):
        if masks is not None and name in masks:
            m = masks[name].detach().reshape(-1).cpu().to(torch.bool)
            if m.numel() != f.numel():
                raise ExportError(f"mask of {name!r} has {m.numel()} entries, the tensor {f.numel()}")
            f = f & m
        fixed[name] = f
        n_unfixed = int(f.numel() - int(f.sum()))
        if n_unfixed:
            unfixed[name] = n_unfixed
    used = torch.cat(flats)[torch.cat(list(fixed.values()))]
    cb = torch.unique(used.to(torch.float32) + 0.0, sorted=True)  # + 0.0 folds -0.0 into +0.0
    return _Fixedness(fixed, cb, unfixed)


def _unfixed_message(fx: _Fixedness, state: Mapping[str, Tensor], where: str) -> str:
    total = sum(state[n].numel() for n in fx.fixed)
    worst = sorted(fx.unfixed.items(), key=lambda kv: -kv[1])[:3]
    detail = ", ".join(f"{n}: {c}" for n, c in worst)
    return (
        f"{where} is not 100% fixed: {fx.unfixed_total} of {total} quantised weights "
        f"({100.0 * fx.unfixed_total / max(total, 1):.2f}%) are not power-of-two codebook values "
        f"(e.g. {detail}); finish the run, or pass --allow-unfixed (allow_unfixed=True) to export "
        "them as raw floats"
    )


# --------------------------------------------------------------------------------------------
# the stored tensors and their reassembly


def _stored_tensors(
    state: Mapping[str, Tensor], quantised: list[str], fx: _Fixedness
) -> tuple[dict[str, Tensor], list[str], dict[str, dict[str, Any]]]:
    """The tensors to pack, which of them are coded as indices, and how unfixed ones are kept."""
    stored: dict[str, Tensor] = {}
    coded: list[str] = []
    notes: dict[str, dict[str, Any]] = {}
    qset = set(quantised)
    for name, t in state.items():
        if name not in qset:
            stored[name] = t
            continue
        f = fx.fixed[name]
        if bool(f.all()):
            stored[name] = t
            coded.append(name)
            continue
        n_unfixed = int((~f).sum())
        if not bool(f.any()):  # nothing fixed: the tensor is simply raw
            stored[name] = t
            notes[name] = {"count": n_unfixed, "storage": "raw"}
            continue
        flat = t.reshape(-1)
        # The placeholder is this tensor's most common fixed value: the cheapest symbol.
        vals, counts = torch.unique(flat[f].to(torch.float32) + 0.0, return_counts=True)
        filler = vals[int(counts.argmax())].to(t.dtype)
        placeholder = flat.clone()
        placeholder[~f] = filler
        pos = torch.nonzero(~f).reshape(-1)
        pos = pos.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
        stored[name] = placeholder.reshape(t.shape)
        stored[name + _POS] = pos
        stored[name + _VAL] = flat[~f].clone()
        coded.append(name)
        notes[name] = {"count": n_unfixed, "storage": "split"}
    return stored, coded, notes


def reassemble(tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state_dict (aliases aside) from a packed artefact's tensors and metadata: each split
    tensor gets its raw unfixed values back in place. Malformed side tensors raise ``ArtefactError``."""
    unfixed = metadata.get("unfixed") or {}
    notes = (unfixed.get("tensors") if isinstance(unfixed, dict) else None) or {}
    if not isinstance(unfixed, dict) or not isinstance(notes, dict):
        raise ArtefactError("malformed export metadata: 'unfixed.tensors' is not an object")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_POS) or name.endswith(_VAL):
            base = stored_owner(name)
            if not isinstance(notes.get(base), dict) or notes[base].get("storage") != "split":
                raise ArtefactError(f"artefact holds {name!r} but no split tensor {base!r}")
            continue
        note = notes.get(name)
        if isinstance(note, dict) and note.get("storage") == "split":
            pos, val = tensors.get(name + _POS), tensors.get(name + _VAL)
            if pos is None or val is None:
                raise ArtefactError(f"unfixed values of tensor {name!r} are missing")
            if (
                pos.dim() != 1
                or pos.dtype not in (torch.int32, torch.int64)
                or val.dim() != 1
                or val.numel() != pos.numel()
                or val.dtype != t.dtype
                or (pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= t.numel()))
            ):
                raise ArtefactError(f"unfixed values of tensor {name!r} are malformed")
            flat = t.reshape(-1).clone()
            flat[pos.to(torch.int64)] = val
            t = flat.reshape(t.shape)
        out[name] = t
    return out


def _terms_for(codebook: Tensor, b: int, signed_terms: bool) -> Any:
    """Power-of-two terms of every codebook value (``pwfn.core.centres.decompose``)."""
    if codebook.numel() == 0:
        return None
    try:
        return decompose(codebook, b=b, signed_terms=signed_terms)
    except PwfnError as exc:  # cannot happen for values _fixedness accepted; say so if it does
        raise ExportError(f"codebook cannot be decomposed into powers of two: {exc}") from exc


# --------------------------------------------------------------------------------------------
# building the packed artefact in memory


@dataclass
class Artefact:
    """A packed artefact, built and verified in memory: what :func:`pack_artefact` returns."""

    state: dict[str, Tensor]  # clean CPU copies, aliases left out, in state_dict order
    quantised: list[str]
    packed: bytes  # the ``model.pwfn`` bytes
    metadata: dict[str, Any]  # the metadata block stored in them
    codebook: Tensor  # float32, the fixed values used
    unfixed_weights: int
    fixed: bool  # every quantised value fixed and the run finished


def pack_artefact(
    state: Mapping[str, Tensor],
    quantised: Iterable[str],
    recipe: Mapping[str, Any] | None,
    *,
    method: str,
    b: int,
    signed_terms: bool,
    codebook: Tensor | None,
    masks: Mapping[str, Tensor] | None,
    allow_unfixed: bool,
    source: str,
    extra_metadata: Mapping[str, Any] | None,
    not_finished: str | None = None,
) -> Artefact:
    """Pack ``state`` (quantised tensors as codebook indices) and decode it again, bit for bit.

    Unfixed quantised values raise ``ExportError`` naming the worst tensors unless
    ``allow_unfixed``; ``not_finished`` (why the run is not finished) is recorded in the metadata.
    """
    if method not in method_names():
        raise ExportError(f"method must be one of {method_names()}, got {method!r}")
    full_order = list(state)
    shared = shared_keys(state)  # tied tensors are stored once, under their first name
    aliased_quantised = [n for n in quantised if n in shared]
    if aliased_quantised:
        raise ExportError(f"quantised names {aliased_quantised[:3]} are aliases of other tensors; list each shared "
                          "tensor once, under its first state_dict name")
    state = clean_state({k: v for k, v in state.items() if k not in shared})
    q = list(dict.fromkeys(quantised))
    missing = [n for n in q if n not in state]
    if missing:
        raise ExportError(f"quantised tensors not in the model's state_dict: {missing[:5]}")
    bad = [n for n in q if not state[n].is_floating_point()]
    if bad:
        raise ExportError(f"quantised tensors must be floating point: {bad[:5]}")

    fx = _fixedness(state, q, b, codebook, masks)
    if fx.unfixed and not allow_unfixed:
        raise ExportError(_unfixed_message(fx, state, source))
    if fx.unfixed:
        log.warning("%s", _unfixed_message(fx, state, source).split(";")[0] + "; exporting them as raw floats")

    stored, coded, notes = _stored_tensors(state, q, fx)
    terms = _terms_for(fx.codebook, b, signed_terms)
    fixed_all = not fx.unfixed and not not_finished
    metadata: dict[str, Any] = {
        "pwfn_export": EXPORT_FORMAT,
        "recipe": dict(recipe) if recipe else None,
        "method": method,
        "b": b,
        "signed_terms": signed_terms,
        "quantised_tensors": q,
        "fixed": fixed_all,
        "unfixed": {"weights": fx.unfixed_total, "tensors": notes},
        "shared": shared,
        "tensor_order": full_order,
    }
    if not_finished:
        metadata["not_finished"] = not_finished
    metadata["pwfn_version"] = __version__
    if extra_metadata:
        metadata["extra"] = dict(extra_metadata)
    try:
        packed = packing.pack(stored, coded, codebook=fx.codebook, terms=terms, metadata=metadata)
    except packing.PackError as exc:
        raise ExportError(f"cannot pack {source}: {exc}") from exc

    # What a reader gets back must be the state_dict, bit for bit.
    back = reassemble(packing.unpack(packed).tensors, metadata)
    if list(back) != list(state) or not all(_bits_equal(back[n], state[n]) for n in state):
        raise ArtefactError(f"internal error: the packed artefact of {source} does not reproduce the model")
    return Artefact(state, q, packed, metadata, fx.codebook, fx.unfixed_total, fixed_all)


# --------------------------------------------------------------------------------------------
# rebuilding the model (no bayes needed)


def build_model(recipe: Mapping[str, Any], state: Mapping[str, Tensor], where: str, *,
                functions: bool = False) -> nn.Module:
    """Construct the recipe's model (:mod:`pwfn.model.recipes`) and load ``state`` into it, strictly (eval mode).

    A malformed or unbuildable recipe raises ``ModelError``, a recipe whose model does not take
    these tensors ``ArtefactError`` (checked on the meta device before anything is allocated);
    ``where`` names the file or model in both. ``functions``: the caller named the recipe's
    function factory itself, so it may be called.
    """
    try:
        return recipes.build_recipe(recipe, state, where, functions=functions)
    except recipes.RecipeMismatch as exc:
        raise ArtefactError(str(exc)) from exc


def caller_model(model: Any, recipe: Any, state: Mapping[str, Tensor], where: str) -> nn.Module:
    """``model=`` as the caller gave it: an ``nn.Module`` (the weights are loaded into it), a recipe
    (``{"factory": ..., "kwargs": ...}``) or a ``"module:qualname"``/registered name, whose
    function the caller thereby allows to be called (with the file's kwargs when it names the same)."""
    if isinstance(model, nn.Module):
        try:
            recipes.load_state_folded(model, state, where)
        except ModelError as exc:
            raise ArtefactError(str(exc)) from exc
        return model.eval()
    if isinstance(model, str):
        rec = recipes.parse_model_spec(model, None, recipe if isinstance(recipe, Mapping) else None)
    elif isinstance(model, Mapping):
        rec = dict(model)
    else:
        raise ModelError(f"model= must be a torch.nn.Module, a recipe or 'module:qualname', got {type(model).__name__}")
    return build_model(rec, state, where, functions=True)


def _into_model(
    state: Mapping[str, Tensor], recipe: Any, model: Any, where: str,
    shared: Mapping[str, str] | None = None,
) -> nn.Module:
    shared = dict(shared or {})
    if model is not None:
        if isinstance(model, nn.Module):
            _check_sharing(model, shared, where)
        built = caller_model(model, recipe, state, where)
        if not isinstance(model, nn.Module):
            _check_sharing(built, shared, where)
        return built
    if not recipe:
        raise ModelError(
            f"{where} holds no model recipe (the model was exported from Python without one); "
            "pass model= (your model instance, or 'module:factory') to load the weights"
        )
    built = build_model(recipe, state, where)
    _check_sharing(built, shared, where)
    return built


def load_packed_model(path: PathLike, model: Any = None) -> nn.Module:
    """Rebuild the point-estimate model from a packed artefact alone, bit for bit (eval mode).

    The recipe in the artefact's metadata builds the model (a registered model or an
    ``nn.Module`` class; a function factory only when named by ``model=``). Pass ``model``
    (your instance, or ``"module:factory"``) to load into that instead (needed when the export
    had no recipe). A damaged, truncated or foreign-version file raises ``ArtefactError``.
    """
    path = Path(path)
    pm = packing.unpack(read_artefact_bytes(path))
    meta = pm.metadata
    if meta.get("pwfn_export") is not None and meta.get("pwfn_export") != EXPORT_FORMAT:
        raise ArtefactError(
            f"unsupported version {meta.get('pwfn_export')!r} of the export metadata in {path}: "
            f"this pwfn reads export format {EXPORT_FORMAT}"
        )
    state = reassemble(pm.tensors, meta)
    shared = _read_shared(meta, str(path))
    return _into_model(_with_aliases(state, shared, meta.get("tensor_order")), meta.get("recipe"), model, str(path),
                       shared)


def load_exported_model(folder: PathLike, model: Any = None) -> nn.Module:
    """Rebuild the point-estimate model from an export folder's safetensors and model.json.

    The safetensors file is checked against the SHA-256 that ``model.json`` recorded.
    """
    folder = Path(folder)
    meta_path, st_path = folder / MODEL_JSON, folder / MODEL_FILE
    for path in (meta_path, st_path):
        if not path.exists():
            raise ArtefactError(f"{folder} is not a complete pwfn export: {path.name} is missing")
    try:
        # the same checked reader as a run's point model: validated description, size limits
        meta = load_json(meta_path, "export description")
        if not isinstance(meta, dict) or meta.get("format") != "pwfn-export":
            raise ArtefactError(f"{meta_path} is not a pwfn export description")
        validate_description(meta, f"export description {str(meta_path)!r}", ("pwfn-export",))
        data = read_limited(st_path, "exported model", 1 << 40)
    except RunFileError as exc:
        raise ArtefactError(f"malformed export: {exc}") from exc
    if meta.get("format_version") != EXPORT_FORMAT:
        raise ArtefactError(
            f"unsupported version {meta.get('format_version')!r} in {meta_path}: this pwfn reads "
            f"export format {EXPORT_FORMAT}"
        )
    want = ((meta.get("files") or {}).get(MODEL_FILE) or {}).get("sha256")
    if want is not None and sha256_bytes(data) != want:
        raise ArtefactError(f"checksum mismatch in {st_path} (it is not the file model.json describes)")
    try:
        loaded = st_load(data)
    except Exception as exc:  # safetensors' own error types
        raise ArtefactError(f"cannot read {st_path}: {exc}") from exc
    order = meta.get("tensors")
    state = {k: loaded[k] for k in order} if isinstance(order, list) and set(order) == set(loaded) else loaded
    shared = _read_shared(meta, str(meta_path))
    return _into_model(_with_aliases(state, shared, meta.get("tensor_order")), meta.get("recipe"), model,
                       str(st_path), shared)
