"""``save_pretrained``: a fixed network shared as a folder of its own, Hugging Face style.

The source (a run folder, an export folder, or what ``pwfn.compress`` returned) is exported in
memory (:func:`prepared_for_sharing`, through :mod:`pwfn.export.folder`), then written with its
model card. What the folder holds and how it loads back: :mod:`pwfn.export.hub`. Writing it needs ``bayes``
(a run's checkpoint may hold a Bayesian model) and huggingface_hub (the model card); loading it
needs neither, which is why this is its own module.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import PwfnError
from ..methods import get_method
from ..model import recipes
from ..model.recipes import recipe_of
from ..run.lock import acquire
from ..run.manifest import load_json, read_report
from .artefact import (
    MODEL_JSON,
    SIZE_FILE,
    ExportError,
    caller_model,
    clean_state,
    infer_b,
    load_exported_model,
)
from .folder import _plain_state, _prepare, _prepare_run
from .hub import CARD_FILE, CONFIG_FILE, hub_module, model_card
from .ownership import check_replaceable, owned_files, write_export_folder

__all__ = ["save_pretrained"]

log = logging.getLogger(__name__)


def save_pretrained(source: Any, save_directory: str | os.PathLike, *, model: Any = None, allow_unfixed: bool = False,
                    name: str | None = None) -> dict[str, Any]:
    """Write ``source`` (a run folder, an export folder, or a :class:`pwfn.FixingResult`) as a shareable
    folder: the export, ``config.json`` and a model card ``README.md`` (see the module docstring).

    ``model``: how to rebuild the model when the run records no recipe (as for ``export_run``).
    Everything is built and checked in memory first; the folder is then written as a whole,
    replacing an earlier one only when pwfn can prove it wrote it. Returns the export summary
    with ``card`` (the README text). Needs huggingface_hub (the ``hf`` extra).
    """
    hub_module()  # refuse before any work when the card cannot be written
    out = Path(save_directory)
    files, description, result, report = prepared_for_sharing(source, out, model=model, allow_unfixed=allow_unfixed)
    size = result.get("size")
    recipe = description.get("recipe") or {}
    if recipe.get("factory"):
        files[CONFIG_FILE] = (json.dumps(recipe.get("kwargs") or {}, indent=2, sort_keys=True) + "\n").encode()
    title = name or _default_name(source, recipe)
    sizes = {k: len(v) for k, v in files.items()}
    card = model_card(description, size, report, {**sizes, CARD_FILE: 0}, title)
    files[CARD_FILE] = card.encode("utf-8")
    sizes[CARD_FILE] = len(files[CARD_FILE])
    card = model_card(description, size, report, sizes, title)  # with the card's own size
    files[CARD_FILE] = card.encode("utf-8")
    write_export_folder(out, files, description)
    result = dict(result, out_dir=str(out), files={k: len(v) for k, v in files.items()}, card=card)
    log.info("saved %s to %s (model card %s)", result.get("source"), out, CARD_FILE)
    return result


def _default_name(source: Any, recipe: Mapping[str, Any]) -> str:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).resolve()
        return f"{p.parent.name}/{p.name}" if p.name in ("pwfn", "wfn", "wfn_published", "export") else p.name
    what = recipe.get("name") or str(recipe.get("factory") or "").split(":")[-1]
    return f"{what or 'model'} ({getattr(source, 'method', 'pwfn')})"


def prepared_for_sharing(source: Any, out: Path, *, model: Any = None, allow_unfixed: bool = False
                         ) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The files, ``model.json`` description, summary and run report of an export of ``source`` (a method
    run folder, an export folder, or a ``FixingResult``), computed and checked in memory; nothing is
    written and the source is never changed."""
    if hasattr(source, "point_model") and hasattr(source, "report"):
        return _result_for_sharing(source, out, model, allow_unfixed)
    if not isinstance(source, (str, os.PathLike)):
        raise ExportError(f"save_pretrained takes a run folder, an export folder or what pwfn.compress returned, "
                          f"got {type(source).__name__}")
    folder = Path(source)
    if not folder.is_dir():
        raise ExportError(f"{str(folder)!r} is not a folder")
    if (folder / MODEL_JSON).is_file() and not (folder / "report.json").exists():
        return _export_for_sharing(folder, model)
    if (folder / "compare.json").exists() and not (folder / "report.json").exists():
        raise ExportError(f"{folder} is a comparison folder: share one method's run (e.g. {folder / 'pwfn'})")
    check_replaceable(out)
    with acquire(folder):
        p = _prepare_run(folder, out, allow_unfixed, False, model_arg=model)
    return p.files, p.model_json, p.result, p.report


def _export_for_sharing(folder: Path, model: Any) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any],
                                                            dict[str, Any] | None]:
    files = {k: v for k, v in owned_files(folder).items() if k not in (MODEL_JSON, "README.md", "config.json")}
    description = {k: v for k, v in load_json(folder / MODEL_JSON, "export description").items() if k != "files"}
    load_exported_model(folder, model=model)  # it must load: checksums, recipe
    size = json.loads(files[SIZE_FILE]) if SIZE_FILE in files else None
    report = None
    run = Path(str(description.get("source") or ""))
    if description.get("source") and (run / "report.json").is_file():
        try:
            report = read_report(run / "report.json")
        except PwfnError:
            report = None
    result = {"source": str(folder), "method": description.get("method"), "fixed": description.get("fixed"),
              "size": size, "recipe": description.get("recipe"), "files": {k: len(v) for k, v in files.items()}}
    return files, description, result, report


def _result_for_sharing(result: Any, out: Path, model: Any, allow_unfixed: bool
                        ) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    report = dict(result.report)
    point, state = _plain_state(result.point_model)
    quantised = list(report.get("quantised_tensors") or [])
    cb = (report.get("final") or {}).get("codebook")
    codebook = torch.tensor(cb, dtype=torch.float64) if isinstance(cb, list) else None
    method = str(result.method)
    why = ""
    if model is not None:
        point = caller_model(model, None, clean_state(state), "the model given")
        recipe = (recipes.parse_model_spec(model) if isinstance(model, str) else
                  recipes.validate_recipe(model, "model=") if isinstance(model, Mapping) else recipe_of(model)[0])
    else:
        recipe, why = recipe_of(point)
    check_replaceable(out)
    p = _prepare(state, quantised, out, recipe, method=method, b=infer_b(state, quantised),
                 signed_terms=get_method(method).signed_terms, codebook=codebook, masks=None,
                 allow_unfixed=allow_unfixed, onnx=False, model=point, example=None, image_size=None,
                 source=f"pwfn.compress result ({method})", extra_metadata=None, no_model_reason=why)
    return p.files, p.model_json, p.result, report
