"""Read a run folder into plain Python data, without torch: rounds, final metrics, per-layer facts.

Used by ``pwfn report`` and ``pwfn plot``. Every file is optional except the one that makes a
folder a run folder (``report.json`` or ``metrics.jsonl`` for a method, ``compare.json`` for a
comparison); whatever is missing is left out of the result, never guessed.

Per-tensor facts come from the point model (``point_model.safetensors``, read with numpy), the
list of quantised tensors in ``report.json``, the export's ``size.json`` (packed bytes, when the
run was exported) and, when present, a ``coverage`` section of ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import PwfnError
from .manifest import load_json, read_metrics, validate_compare, validate_report

PathLike = Union[str, Path]


def read_json(path: Path) -> Any:
    """A run-folder JSON file, read within size and depth limits (``pwfn.run.manifest.load_json``);
    report.json and compare.json are schema-checked too. Problems raise a PwfnError naming the file."""
    data = load_json(path, "run file")
    if path.name == "report.json":
        return validate_report(data, f"run report {str(path)!r}")
    if path.name == "compare.json":
        return validate_compare(data, f"comparison {str(path)!r}")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``, each checked (``pwfn.run.manifest.read_metrics``): a garbage line is a
    PwfnError naming its line (every write is atomic, so a torn line means the file was edited)."""
    return read_metrics(path)


def folder_kind(folder: Path) -> str:
    """``"compare"``, ``"method"``, or a ``PwfnError`` for a folder that is neither."""
    if not folder.is_dir():
        raise PwfnError(f"run folder {str(folder)!r} does not exist")
    if (folder / "compare.json").exists():
        return "compare"
    if (folder / "report.json").exists() or (folder / "metrics.jsonl").exists():
        return "method"
    raise PwfnError(f"{str(folder)!r} holds no report.json, compare.json or metrics.jsonl: is it a pwfn run folder?")


def method_folders(folder: Path) -> dict[str, Path]:
    """The method folders of a run folder: itself for a method folder, its ``wfn``/``pwfn`` for a comparison."""
    if folder_kind(folder) == "method":
        return {_method_name(folder): folder}
    out = {}
    for name in ("wfn", "pwfn"):
        sub = folder / name
        if (sub / "report.json").exists() or (sub / "metrics.jsonl").exists():
            out[name] = sub
    return out


def _method_name(folder: Path) -> str:
    rep = folder / "report.json"
    if rep.exists():
        method = read_json(rep).get("method")
        if isinstance(method, str):
            return method
    return folder.name


def read_method(folder: PathLike) -> dict[str, Any]:
    """One method folder: ``method``, ``rounds``, ``report`` (or None while running), ``size`` (or None)."""
    folder = Path(folder)
    report = read_json(folder / "report.json") if (folder / "report.json").exists() else None
    if report is not None and report.get("rounds"):
        rounds = list(report["rounds"])
    elif (folder / "metrics.jsonl").exists():
        rounds = read_jsonl(folder / "metrics.jsonl")
    else:
        rounds = []
    size = None
    if (folder / "export" / "size.json").exists():
        size = read_json(folder / "export" / "size.json")
    elif report is not None and isinstance(report.get("size"), Mapping):
        size = report["size"]
    return {"method": (report or {}).get("method") or folder.name, "folder": folder, "rounds": rounds,
            "report": report, "size": size}


def _entropy_bits(counts: Mapping[Any, int]) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values() if c)


def point_tensors(folder: Path) -> Optional[dict[str, Any]]:
    """The point model's tensors as numpy arrays, or None when the run has not finished."""
    path = folder / "point_model.safetensors"
    if not path.exists():
        return None
    try:
        from safetensors.numpy import load_file
    except ImportError:  # safetensors is a dependency; a broken install only loses this section
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged file: say so instead of a traceback
        raise PwfnError(f"cannot read {path}: {exc}") from exc


def _coverage_by_owner(report: Mapping[str, Any]) -> dict[str, float]:
    """Shares of quantised parameters per owner from a ``coverage`` section, in whatever form it has.

    Accepted: ``{"owners" or "layers" or "per_owner": {name: entry}}`` or ``{name: entry}``, where an
    entry is a share in [0, 1], or a mapping with ``fraction``/``share``/``coverage``, or with
    quantised and total counts (``quantised``/``quantised_params`` over ``total``/``params``/``numel``).
    """
    cov = report.get("coverage")
    if not isinstance(cov, Mapping):
        return {}
    for key in ("owners", "layers", "per_owner", "modules"):
        if isinstance(cov.get(key), Mapping):
            cov = cov[key]
            break
    out: dict[str, float] = {}
    for name, entry in cov.items():
        share = None
        if isinstance(entry, (int, float)) and not isinstance(entry, bool) and 0 <= entry <= 1:
            share = float(entry)
        elif isinstance(entry, Mapping):
            for k in ("fraction", "share", "coverage"):
                if isinstance(entry.get(k), (int, float)):
                    share = float(entry[k])
                    break
            if share is None:
                q = next((entry[k] for k in ("quantised", "quantised_params", "fixed") if
                          isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)), None)
                t = next((entry[k] for k in ("total", "params", "numel", "parameters") if
                          isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)), None)
                if q is not None and t:
                    share = float(q) / float(t)
        if share is not None:
            out[str(name)] = share
    return out


def layer_table(method: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer (module) of a finished method: parameters, share quantised, bits per weight.

    Rows: ``layer``, ``params``, ``quantised`` (count), ``coverage`` (share, from the report's
    ``coverage`` section when it has one, else from the list of quantised tensors), ``unique``
    (values in the layer's quantised tensors), ``entropy_bits`` (of those values), ``fixed_bits``
    (ceil(log2 K) of the network's codebook), ``packed_bits`` (packed bytes x 8 / weights, only
    after ``pwfn export``) and ``fp32_bytes``. [] when the point model is not there yet.
    """
    folder = Path(method["folder"])
    report = method.get("report") or {}
    tensors = point_tensors(folder)
    if not tensors:
        return []
    quantised = set(report.get("quantised_tensors") or [])
    final = report.get("final") or {}
    k = len(final.get("codebook") or []) or final.get("unique")
    fixed_bits = float(math.ceil(math.log2(k))) if isinstance(k, int) and k > 1 else (0.0 if k == 1 else None)
    per_tensor_size = ((method.get("size") or {}).get("per_tensor") or {})
    owners = _coverage_by_owner(report)
    layers: dict[str, dict[str, Any]] = {}
    for name, arr in tensors.items():
        layer = name.rsplit(".", 1)[0] if "." in name else name
        row = layers.setdefault(layer, {"layer": layer, "params": 0, "quantised": 0, "values": {},
                                        "packed_bytes": 0, "packed_known": True, "fp32_bytes": 0})
        n = int(arr.size) * (2 if arr.dtype.kind == "c" else 1)  # real values: a complex entry is two
        row["params"] += n
        row["fp32_bytes"] += 4 * n
        if name in quantised:
            row["quantised"] += n
            import numpy as np

            vals, counts = np.unique(arr.astype("float32").ravel(), return_counts=True)
            for v, c in zip(vals.tolist(), counts.tolist()):
                row["values"][v] = row["values"].get(v, 0) + int(c)
            entry = per_tensor_size.get(name)
            if isinstance(entry, Mapping) and isinstance(entry.get("packed_bytes"), (int, float)):
                row["packed_bytes"] += entry["packed_bytes"]
            else:
                row["packed_known"] = False
    out = []
    for layer, row in layers.items():
        q = row["quantised"]
        coverage = owners.get(layer, q / row["params"] if row["params"] else 0.0)
        out.append({
            "layer": layer,
            "params": row["params"],
            "quantised": q,
            "coverage": coverage,
            "unique": len(row["values"]) if q else None,
            "entropy_bits": _entropy_bits(row["values"]) if q else None,
            "fixed_bits": fixed_bits if q else None,
            "packed_bits": (8.0 * row["packed_bytes"] / q) if q and per_tensor_size and row["packed_known"] else None,
            "fp32_bytes": row["fp32_bytes"],
        })
    return out


def weight_values(method: Mapping[str, Any]) -> Optional[list[float]]:
    """Every quantised weight of a finished method (flat), for the weight-distribution picture."""
    folder = Path(method["folder"])
    tensors = point_tensors(folder)
    report = method.get("report") or {}
    if not tensors:
        return None
    quantised = set(report.get("quantised_tensors") or tensors)
    import numpy as np

    parts = [arr.astype("float32").ravel() for name, arr in tensors.items() if name in quantised]
    return np.concatenate(parts).tolist() if parts else None


def float_histogram(method: Mapping[str, Any]) -> Optional[dict[str, list]]:
    """The float model's weight distribution over the quantised tensors, ``{"edges": [...], "counts": [...]}``:
    as the run recorded it before its first round (``report.json``'s ``pre.float_weights``), or, for a run
    folder written before runs recorded it, from the comparison's ``baseline.pt`` (needs torch). None when
    neither is there."""
    report = method.get("report") or {}
    hist = (report.get("pre") or {}).get("float_weights") if isinstance(report.get("pre"), Mapping) else None
    if isinstance(hist, Mapping):
        edges, counts = hist.get("edges"), hist.get("counts")
        if (isinstance(edges, list) and isinstance(counts, list) and len(counts) >= 1 and len(edges) == len(counts) + 1
                and all(isinstance(e, (int, float)) and math.isfinite(e) for e in edges)
                and all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) > 0):
            return {"edges": [float(e) for e in edges], "counts": list(counts)}
        return None  # a hand-edited section: no float picture rather than a wrong one
    folder = Path(method["folder"])
    base = folder.parent / "baseline.pt"
    if not base.exists():
        return None
    try:
        from ..common.io import load_checkpoint

        state = load_checkpoint(base, kind="baseline", map_location="cpu")
    except Exception:  # an unreadable baseline only loses the float distribution, never the picture
        return None
    quantised = report.get("quantised_tensors") or []
    model = state.get("model") or {}
    parts = [model[n].detach().float().reshape(-1) for n in quantised if n in model]
    if not parts:
        return None
    import torch

    from ..core.metrics import weight_histogram

    return weight_histogram(torch.cat(parts))


def size_summary(method: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """Sizes of the quantised weights, before export too: fp32, fixed-width log2(K) and entropy-bound bytes,
    plus the packed bytes once ``pwfn export`` ran. None when the run has no final metrics yet."""
    report = method.get("report") or {}
    final = report.get("final") or {}
    n = final.get("n_weights")
    size = method.get("size")
    if isinstance(size, Mapping) and isinstance(size.get("quantised"), Mapping):
        q = size["quantised"]
        return {"weights": q.get("numel"), "fp32_bytes": q.get("fp32_bytes"), "fixed_width_bytes": q.get("fixed_width_bytes"),
                "entropy_bound_bytes": q.get("entropy_bound_bytes"), "packed_bytes": q.get("packed_bytes"),
                "packed_file_bytes": (size.get("packed_file") or {}).get("total")}
    if not isinstance(n, int) or final.get("entropy") is None:
        return None
    k = len(final.get("codebook") or []) or final.get("unique") or 1
    return {"weights": n, "fp32_bytes": 4 * n, "fixed_width_bytes": n * math.ceil(math.log2(k)) / 8 if k > 1 else 0.0,
            "entropy_bound_bytes": n * float(final["entropy"]) / 8, "packed_bytes": None, "packed_file_bytes": None}
