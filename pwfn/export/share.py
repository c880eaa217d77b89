"""``save_pretrained``: a fixed network shared as a folder of its own, Hugging Face style.

What the folder holds and how it loads back: :mod:`pwfn.export.hub`. Writing it needs ``bayes``
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

from .folder import prepared_for_sharing
from .hub import CARD_FILE, CONFIG_FILE, hub_module, model_card
from .ownership import write_export_folder

__all__ = ["save_pretrained"]

log = logging.getLogger(__name__)


def save_pretrained(source: Any, save_directory: str | os.PathLike, *, model: Any = None, allow_unfixed: bool = False,
                    name: str | None = None) -> dict[str, Any]:
    """Write ``source`` (a run folder, an export folder, or a :class:`pwfn.FixingResult`) as a shareable
    folder: the export, ``config.json`` and a model card ``README.md`` (see the module docstring).

    ``model``: how to rebuild the model when the run records no recipe (as for ``export_run``).
    Everything is built and checked in memory first; the folder is then written as a whole,
    replacing an earlier one only when pwfn can prove it wrote it. Returns the export summary
    with ``card`` (the README text). Needs huggingface_hub (``pip install 'pwfn-compress[hf]'``).
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
