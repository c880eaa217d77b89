"""Hugging Face-style sharing of a fixed network: ``save_pretrained`` / ``from_pretrained``, local folders only.

``save_pretrained(source, folder)`` (:mod:`pwfn.export.share`) writes, into a folder of its own (replaced only when pwfn
can prove it wrote it, as every export folder):

- ``model.safetensors``, ``model.pwfn``, ``size.json``, ``model.json``: the export
  (:mod:`pwfn.export.folder`), the point model bit for bit and the packed artefact;
- ``config.json``: the model's constructor arguments when its recipe is a class (what
  huggingface_hub's ``PyTorchModelHubMixin.from_pretrained`` reads, so a class using that mixin
  loads the folder with its own ``from_pretrained`` too);
- ``README.md``: a model card (huggingface_hub's ``ModelCard``, with ``library_name: pwfn``):
  the method, the codebook and its power-of-two terms, unique values, entropy, accuracy
  against the float model, the run's accuracy contract when its report has one, the sizes,
  and how to load it.

``source`` is a method run folder, an export folder, or what :func:`pwfn.compress` returned.
``from_pretrained(folder)`` loads the point model back (from ``model.safetensors``, or from
``model.pwfn`` with ``packed=True``); it reads a local folder and nothing else: a Hub name
such as ``"org/model"`` is refused with the command that downloads it. Nothing here reaches
the network. Writing the card needs huggingface_hub (the ``hf`` extra); loading does not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from ..common.hints import install_hint
from ..errors import ArtefactError, PwfnError
from ..model.recipes import describe
from ..run.report import format_terms, power_of_two_terms
from .artefact import MODEL_FILE, MODEL_JSON, PACKED_FILE, load_exported_model, load_packed_model

__all__ = ["CARD_FILE", "CONFIG_FILE", "HubError", "from_pretrained", "hub_module", "model_card"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CARD_FILE = "README.md"
CONFIG_FILE = "config.json"


class HubError(PwfnError, ValueError):
    """``save_pretrained``/``from_pretrained`` cannot do what was asked (missing extra, not a local folder)."""


def hub_module() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError("save_pretrained writes its model card with huggingface_hub, which is not installed: "
                       f"{install_hint('hf')}") from exc
    return huggingface_hub


# --------------------------------------------------------------------------------------------
# the model card


def _num(v: Any, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def _metrics(report: Mapping[str, Any] | None) -> tuple[str, Any, Any]:
    """(primary metric, fixed value, float value) from a run's report."""
    if not report:
        return "top1", None, None
    primary = str((report.get("task") or {}).get("primary") or "top1")
    final = report.get("final") or {}
    fixed = (final.get("point_model_test") or final.get("test") or {}).get(primary)
    base = ((report.get("baseline") or {}).get("test") or {}).get(primary)
    if base is None:
        base = ((report.get("pre") or {}).get("initial") or {}).get(primary)
    return primary, fixed, base


def _contract_lines(contract: Any) -> list[str]:
    """The run's accuracy contract (``report["contract"]``) as Markdown, whatever fields it holds."""
    if not contract:
        return ["The run recorded no accuracy contract."]
    if not isinstance(contract, Mapping):
        return [f"`{json.dumps(contract)[:500]}`"]
    lines = ["| field | value |", "|---|---|"]
    for k, v in contract.items():
        text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        lines.append(f"| {k} | {text[:200]} |")
    return lines


def model_card(description: Mapping[str, Any], size: Mapping[str, Any] | None, report: Mapping[str, Any] | None,
               files: Mapping[str, int], name: str) -> str:
    """The README.md of a shared fixed network (YAML metadata + Markdown), from the export's
    ``model.json`` (``description``), ``size.json`` and the run's report (when there is one)."""
    hub = hub_module()
    method = description.get("method", "pwfn")
    codebook = [float(v) for v in description.get("codebook") or []]
    size = size or {}
    primary, fixed, base = _metrics(report)
    tags = ["pwfn", "weight-fixing", "power-of-two", "quantization", method]
    data = hub.ModelCardData(library_name="pwfn", tags=tags)
    recipe = description.get("recipe") or {}
    total = size.get("total") or {}
    entropy = size.get("global_entropy_bits")
    if report:
        final = report.get("final") or {}
        entropy = final.get("entropy", entropy)
    lines = [f"# {name}", "",
             f"A network fixed with pwfn ({method}): every quantised weight is one of {len(codebook)} shared values, "
             "each a sum of a few powers of two, so a device can apply it with shifts and adds.", "",
             "| | |", "|---|---|",
             f"| method | {method} |",
             f"| model | `{_describe(recipe)}` |",
             f"| codebook | {len(codebook)} values (K), indices at {size.get('bits_per_index', '-')} bits |",
             f"| unique values | {len(codebook)} |",
             f"| entropy | {_num(entropy, '.3f')} bits per weight |",
             f"| quantised weights | {size.get('weights', '-'):,} of {total.get('numel', '-'):,} values |"
             if isinstance(size.get("weights"), int) and isinstance(total.get("numel"), int)
             else "| quantised weights | - |",
             f"| {primary} (fixed, point model) | {_num(fixed)} |",
             f"| {primary} (float model) | {_num(base)} |",
             f"| change | {_num(fixed - base, '+.2f') if isinstance(fixed, (int, float)) and isinstance(base, (int, float)) else '-'} |",
             f"| fully fixed | {'yes' if description.get('fixed') else 'no: ' + str(description.get('not_finished') or 'some weights are raw floats')} |",
             ""]
    lines += ["## Accuracy contract", ""] + _contract_lines((report or {}).get("contract")) + [""]
    lines += ["## Sizes", "", "| encoding | bytes |", "|---|---|"]
    if total:
        lines += [f"| fp32 (whole state_dict) | {total.get('fp32_bytes', 0):,} |",
                  f"| fp16 | {total.get('fp16_bytes', 0):,} |"]
    packed = (size.get("packed_file") or {}).get("total")
    if packed:
        lines.append(f"| packed `model.pwfn` | {packed:,} |")
    onnx = size.get("onnx") or {}
    if onnx.get("bytes"):
        lines.append(f"| codebook ONNX `model.onnx` | {onnx['bytes']:,} |")
    lines.append("")
    lines += ["## Codebook", "", "| # | value | power-of-two terms |", "|---|---|---|"]
    for i, v in enumerate(codebook[:64]):
        lines.append(f"| {i} | {v:.8g} | {format_terms(power_of_two_terms(v))} |")
    if len(codebook) > 64:
        lines.append(f"| ... | {len(codebook) - 64} more | |")
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| `{f}` | {n:,} |" for f, n in sorted(files.items())]
    lines += ["", "## Loading", "", "```python", "import pwfn", "",
              'model = pwfn.from_pretrained("path/to/this/folder")  # the point model, bit for bit',
              'packed = pwfn.from_pretrained("path/to/this/folder", packed=True)  # the same, from model.pwfn',
              "```", ""]
    if recipe.get("factory") and not recipe.get("name"):
        lines += [f"The model is rebuilt from `{recipe['factory']}` (importable where you load it); a function "
                  f"factory is called only when you name it: `pwfn.from_pretrained(folder, model=\"{recipe['factory']}\")`.",
                  ""]
    elif not recipe:
        lines += ["The export records no recipe: pass your model instance, `pwfn.from_pretrained(folder, model=net)`.",
                  ""]
    lines += ["`pwfn inspect model.pwfn` shows what the packed file holds, checked and decoded.", ""]
    return str(hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _describe(recipe: Mapping[str, Any]) -> str:
    return describe(recipe) if recipe else "no recipe recorded"


# --------------------------------------------------------------------------------------------
# loading


def from_pretrained(directory: PathLike, model: Any = None, *, packed: bool = False) -> Any:
    """The point model of a folder written by :func:`save_pretrained` (or ``pwfn export``), eval mode.

    From ``model.safetensors`` (checked against ``model.json``'s SHA-256), or with ``packed=True``
    from ``model.pwfn``; both give the model bit for bit. ``model``: your instance, or
    ``"module:factory"``, when the folder records no recipe (or a function factory).
    ``directory`` must be a local folder: nothing is downloaded.
    """
    path = Path(directory)
    if not path.is_dir():
        hint = ""
        if not path.exists() and "/" in str(directory) and not str(directory).startswith((".", "/", "~")):
            hint = (f"; from_pretrained reads local folders only (nothing is downloaded): fetch it first, e.g. "
                    f"`huggingface_hub.snapshot_download({str(directory)!r}, local_dir='model')`, then pass that folder")
        what = "is not a folder" if path.exists() else "does not exist"
        raise HubError(f"{str(directory)!r} {what}{hint}")
    if packed:
        return load_packed_model(path / PACKED_FILE, model=model)
    if not (path / MODEL_JSON).is_file() or not (path / MODEL_FILE).is_file():
        raise ArtefactError(f"{path} holds no {MODEL_JSON} and {MODEL_FILE}: is it a folder written by "
                            "pwfn.save_pretrained or pwfn export?")
    return load_exported_model(path, model=model)

