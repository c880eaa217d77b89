"""What ``pwfn report``, ``compare`` and ``export`` print: run folders, exports and targets as text.

A run folder is read through its validated JSON files; an export's and a targets summary are
formatted from the dicts ``pwfn.export`` returns. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import PwfnError
from .manifest import read_metrics
from .rundata import layer_table, read_json, read_method, size_summary


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table of ``pwfn compare`` (float, WFN, PWFN) as Markdown."""
    cols = ["method", "top1", "top5", "unique", "unique_nonzero", "entropy", "entropy_nonzero", "contract", "seconds"]
    heads = ["method", "test top-1 %", "test top-5 %", "unique", "unique (no 0)", "entropy bits", "entropy (no 0)",
             "contract", "time s"]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def contract_line(c: Any) -> str:
    """The report's ``contract`` verdict in one line ("" when the report has none)."""
    if not isinstance(c, dict):
        return ""
    if not c.get("enforced"):
        return "accuracy contract: off (the result was not checked against the float model)"
    held = {True: "HELD", False: "NOT HELD", None: "not judged yet"}[c.get("held")]
    text = (f"accuracy contract: {c.get('text')}: {held}; on the guard data {_fmt(c.get('value'), 4)} against the "
            f"float model's {_fmt(c.get('reference'), 4)} (drop {_fmt(c.get('drop'), 4)} +- {_fmt(c.get('drop_se'), 2)})")
    guard = c.get("guard") or {}
    if guard.get("source"):
        text += f" on {guard['source']}"
    test = c.get("test")
    if isinstance(test, dict):
        text += (f"; test split {_fmt(test.get('value'), 4)} against {_fmt(test.get('reference'), 4)} (drop "
                 f"{_fmt(test.get('drop'), 4)}, {'within' if test.get('within') else 'BEYOND'} the tolerance; the guard "
                 "never sees it)")
    extra = []
    if c.get("rounds_added"):
        extra.append(f"{c['rounds_added']} rounds added")
    if c.get("extra_terms"):
        extra.append(f"{c['extra_terms']} more power-of-two terms")
    return text + (f" ({', '.join(extra)})" if extra else "")


def summarise_report(report: dict) -> str:
    """One method's ``report.json`` as text: the table of rounds, the final metrics and the codebook."""
    task = report.get("task") if isinstance(report.get("task"), dict) else {}
    metric = str(task.get("primary") or "top1")
    label = "val " + ("top-1" if metric == "top1" else metric)  # the rounds are scored on the validation split
    digits = 2 if metric == "top1" else 4
    lines = [f"method: {report.get('method')}" + (f", task: {task.get('name')}" if task.get("name") else "")]
    lines.append(f"| round | fraction | fixed % | {label} after fix | {label} after train | unique | entropy | "
                 "entropy (no 0) | s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in report.get("rounds", []):
        lines.append(
            f"| {r['round'] + 1} | {r['fraction']} | {100 * r.get('fixed_fraction', 0):.1f} | "
            f"{_fmt(r['after_fix'].get(metric), digits)} | {_fmt(r.get('after_train', {}).get(metric), digits)} | "
            f"{_fmt(r.get('unique'))} | {_fmt(r.get('entropy'))} | {_fmt(r.get('entropy_nonzero'))} | "
            f"{_fmt(r.get('wall_seconds'), 1)} |"
        )
    f = report.get("final", {})
    if f:
        t = f.get("test", {})
        shown = (f"top-1 {_fmt(t.get('top1'), 2)}%" + (f", top-5 {_fmt(t.get('top5'), 2)}%" if t.get("top5") is not None
                                                        else "")) if metric == "top1" else \
            ", ".join(f"{k} {_fmt(v, 4)}" for k, v in t.items() if isinstance(v, (int, float)))
        lines.append(
            f"final (test split): {shown}"
            + f", unique {f.get('unique')} ({f.get('unique_nonzero')} without 0), entropy {_fmt(f.get('entropy'))} bits "
            f"({_fmt(f.get('entropy_nonzero'))} without 0)"
        )
        line = contract_line(report.get("contract"))
        if line:
            lines.append(line)
        if "order_shares" in f:
            shares = ", ".join(f"order {k}: {100 * v:.1f}%" for k, v in sorted(f["order_shares"].items()))
            lines.append(f"power-of-two terms per weight: {shares}")
        if "mc" in f:
            lines.append(f"calibration ({f['mc']['samples']} MC samples): NLL {_fmt(f['mc']['nll'], 4)}, "
                         f"ECE {_fmt(f['mc']['ece'], 4)}")
        if f.get("codebook"):
            lines.append("")
            lines.append(format_codebook(f["codebook"], f.get("codebook_counts")))
    cov = report.get("coverage")
    if isinstance(cov, dict) and isinstance(cov.get("by_owner_type"), dict):
        lines.append("")
        lines.append(format_coverage(cov))
    base = report.get("baseline")
    if base:
        lines.append(f"float baseline: top-1 {_fmt(base['test'].get('top1'), 2)}%")
    return "\n".join(lines)


def format_coverage(cov: dict) -> str:
    """The report's coverage section: quantised share of parameters and bytes, by owner type."""
    lines = [f"coverage: {100 * float(cov.get('share', 0)):.1f}% of parameters quantised "
             f"({cov.get('quantised_parameters')} of {cov.get('parameters')}), "
             f"{100 * float(cov.get('byte_share', 0)):.1f}% of parameter bytes"]
    lines.append("| owner type | tensors | parameters | quantised % | bytes |")
    lines.append("|---|---|---|---|---|")
    for owner, row in cov["by_owner_type"].items():
        if isinstance(row, dict):
            lines.append(f"| {owner} | {row.get('tensors')} | {row.get('parameters')} | "
                         f"{100 * float(row.get('share', 0)):.1f} | {row.get('bytes')} |")
    left = cov.get("left_float") or []
    if isinstance(left, list) and left:
        lines.append("left float: " + "; ".join(
            f"{t.get('name')} ({t.get('owner_type')}, {t.get('numel')}): {t.get('reason')}"
            for t in left[:10] if isinstance(t, dict)) + (f"; ... ({len(left)} in all)" if len(left) > 10 else ""))
    shared = cov.get("shared") or {}
    if isinstance(shared, dict) and shared:
        lines.append("shared (fixed once): " + "; ".join(f"{k} = {', '.join(map(str, v))}"
                                                         for k, v in list(shared.items())[:10]))
    folded = cov.get("folded_parametrizations") or []
    if isinstance(folded, list) and folded:
        lines.append("folded parametrizations: " + "; ".join(map(str, folded)))
    return "\n".join(lines)


def power_of_two_terms(value: float, max_terms: int = 8) -> Optional[list[tuple[int, int]]]:
    """``value`` as a signed sum of powers of two: ``0.375 -> [(1, -2), (1, -3)]`` (sign, exponent).

    The terms are the set bits of the value's float32 mantissa, so the answer is exact; None
    when more than ``max_terms`` terms are needed (not a power-of-two codebook value).
    """
    if value == 0:
        return []
    if not math.isfinite(value):
        return None
    sign = 1 if value > 0 else -1
    mantissa, exponent = math.frexp(abs(value))  # abs(value) = mantissa * 2**exponent, 0.5 <= mantissa < 1
    bits = int(mantissa * 2**53)
    terms = []
    for i in range(53, -1, -1):
        if bits >> i & 1:
            terms.append((sign, exponent - 53 + i))
    return terms if len(terms) <= max_terms else None


def format_terms(terms: Optional[list[tuple[int, int]]]) -> str:
    """``[(1, -2), (-1, -5)] -> "2^-2 - 2^-5"``; ``[] -> "0"``."""
    if terms is None:
        return "(not a short sum of powers of two)"
    if not terms:
        return "0"
    out = ""
    for i, (sign, exp) in enumerate(terms):
        if i == 0:
            out += ("-" if sign < 0 else "") + f"2^{exp}"
        else:
            out += (" - " if sign < 0 else " + ") + f"2^{exp}"
    return out


def format_codebook(codebook: list, counts: Optional[list] = None, terms: Optional[list] = None) -> str:
    """The shared codebook as a table: value, its power-of-two terms, and how many weights use it."""
    total = sum(counts) if counts else 0
    lines = [f"codebook ({len(codebook)} values):", "| value | power-of-two terms | weights | share % |", "|---|---|---|---|"]
    for i, v in enumerate(codebook):
        t = [tuple(x) for x in terms[i]] if terms is not None else power_of_two_terms(float(v))
        c = counts[i] if counts and i < len(counts) else None
        share = f"{100 * c / total:.2f}" if c is not None and total else "-"
        lines.append(f"| {float(v):.8g} | {format_terms(t)} | {'-' if c is None else c} | {share} |")
    return "\n".join(lines)


def format_layers(rows: list[dict[str, Any]]) -> str:
    """Per-layer table: parameters, coverage, values, bits per weight (entropy, fixed width, packed)."""
    lines = ["per layer:", "| layer | params | quantised % | unique | entropy bits | fixed-width bits | packed bits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['params']:,} | {100 * r['coverage']:.1f} | {_fmt(r['unique'])} | "
                     f"{_fmt(r['entropy_bits'])} | {_fmt(r['fixed_bits'], 0)} | {_fmt(r['packed_bits'])} |")
    return "\n".join(lines)


def format_sizes(s: dict[str, Any]) -> str:
    """Sizes of the quantised weights (before export: the bounds; after: also the packed bytes)."""
    def b(v: Any) -> str:
        return "-" if v is None else f"{int(round(v)):,} B"

    text = (f"size of the {s['weights']:,} quantised weights: fp32 {b(s['fp32_bytes'])}, fixed width "
            f"{b(s['fixed_width_bytes'])}, entropy bound {b(s['entropy_bound_bytes'])}")
    if s.get("packed_bytes") is not None:
        text += f", packed {b(s['packed_bytes'])} (whole file {b(s.get('packed_file_bytes'))})"
    else:
        text += " (run `pwfn export` for the packed size)"
    return text


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n:,.0f}"


def format_export_summary(result: Mapping[str, Any]) -> str:
    """Human-readable lines for one export (what ``pwfn export`` prints)."""
    lines = [f"exported {result.get('source')} -> {result['out_dir']}"]
    files = result.get("files", {})
    lines.append("  files: " + ", ".join(f"{k} ({_fmt_bytes(v)} B)" for k, v in files.items()))
    s = result["size"]
    if not result.get("fixed", True):
        why = f" ({result['not_finished']})" if result.get("not_finished") else ""
        lines.append(
            f"  WARNING: not 100% fixed{why}: {result.get('unfixed_weights', 0)} quantised weights "
            "exported as raw float (--allow-unfixed); the artefact's metadata says so"
        )
    q = s["quantised"]
    n = max(s["weights"], 1)
    lines.append(
        f"  quantised: {s['weights']:,} weights in {s['quantised_tensors']} tensors, "
        f"codebook K={s['codebook_size']}, entropy {s['global_entropy_bits']:.3f} bits/weight"
    )
    rows = [
        ("fp32", q["fp32_bytes"]),
        ("fp16", q["fp16_bytes"]),
        (f"fixed width ({s['bits_per_index']} bits)", q["fixed_width_bytes"]),
        ("entropy bound (global)", q["entropy_bound_bytes"]),
        ("entropy bound (per tensor)", q["per_tensor_entropy_bound_bytes"]),
        ("packed (coded + tables)", q["packed_bytes"]),
    ]
    lines.append("  | quantised weights as | bytes | bits/weight |")
    lines.append("  |---|---|---|")
    for label, v in rows:
        lines.append(f"  | {label} | {_fmt_bytes(v)} | {8.0 * v / n:.3f} |")
    pf, t = s["packed_file"], s["total"]
    ratio = s.get("ratio_packed_to_bound")
    lines.append(
        f"  whole state_dict: fp32 {_fmt_bytes(t['fp32_bytes'])} B, fp16 {_fmt_bytes(t['fp16_bytes'])} B, "
        f"packed file {_fmt_bytes(pf['total'])} B (coded weights {_fmt_bytes(pf['quantised_coded'])}, "
        f"shared tables {_fmt_bytes(pf['shared_tables'])}, raw tensors {_fmt_bytes(pf['raw_tensors'])}, "
        f"overhead {_fmt_bytes(pf['overhead'])} of which manifest {_fmt_bytes(pf['manifest'])})"
    )
    if ratio is not None:
        lines.append(f"  packed / global entropy bound: {ratio:.4f}")
    if s.get("order_shares"):
        shares = ", ".join(f"order {k}: {100 * v:.1f}%" for k, v in s["order_shares"].items())
        lines.append(f"  power-of-two terms per weight: {shares}")
    a = s["arithmetic"]
    lines.append(
        f"  multiplications: {a['multiplications_replaced']:,} of {a['weights']:,} replaced by "
        f"{a['shifts']:,} shifts + {a['adds']:,} adds; {a['zeros_skipped']:,} zero weights skipped; "
        f"{a['multiplications_kept']:,} kept"
    )
    o = result.get("onnx")
    if o:
        if o.get("skipped"):
            lines.append(f"  onnx: skipped: {o['skipped']}")
        else:
            so = (result.get("size") or {}).get("onnx") or {}
            vs = (f", weights {so['weight_bytes']:,} B = {so['weight_bytes_vs_int8']:.2f} x an int8 copy"
                  if so.get("weight_bytes_vs_int8") is not None else "")
            lines.append(f"  onnx: written and checked with onnxruntime (max |diff| {o['max_abs_diff']:.2e}); "
                         f"{o.get('coded_tensors', 0)} tensors as indices of at most {o.get('index_bits')} bits "
                         f"(K = {o.get('table_values', 0)}), {o.get('bytes', 0):,} B (fp32 ONNX "
                         f"{o.get('fp32_onnx_bytes', 0):,} B){vs}")
    return "\n".join(lines)


def format_targets(summary: Mapping[str, Any]) -> str:
    """The lines ``pwfn export --to`` prints."""
    lines = [f"  targets (fp32 weights {summary['fp32_bytes']:,} B, int8 {summary['int8_bytes']:,} B):",
             "  | target | file | bytes | fp32 / file | int8 / file | check | multiplications left |",
             "  |---|---|---|---|---|---|---|"]
    ops = summary.get("operations") or {}
    macs = (ops.get("total") or {}).get("macs")
    for n, t in summary["targets"].items():
        if n == "onnx":
            check = (f"{t.get('index_bits')}-bit indices: weights bit-identical, outputs = fp32 ONNX bit for bit")
        elif n == "tflm":
            check = "TFLM interpreter: LUT = uncompressed bit for bit"
        else:
            check = "C simulation = shift-add reference bit for bit"
        left = t.get("multiplications_left")
        left_s = f"{left:,} of {macs:,}" if isinstance(left, int) and macs else str(left)
        lines.append(f"  | {n} | {t['file']} | {t['bytes']:,} | {t['vs_fp32']:.1f}x | {t['vs_int8']:.2f}x | "
                     f"{check} (max |diff| to torch {t.get('max_abs_diff', t.get('max_abs_diff_to_float', 0)):.2g}) "
                     f"| {left_s} |")
    if ops:
        tot = ops["total"]
        lines.append(f"  shift-add reference: {tot['macs']:,} multiply-accumulates per input become "
                     f"{tot['shifts']:,} shifts + {tot['adds']:,} adds ({tot['zero_weight_macs_skipped']:,} "
                     "zero-weight products skipped), 0 multiplications")
    return "\n".join(lines)


def summarise_method_folder(folder: Path) -> str:
    """The report of one method folder with its per-layer table and sizes (when finished)."""
    method = read_method(folder)
    if method["report"] is None:
        return ("run in progress or interrupted; completed rounds:\n"
                + summarise_report({"method": method["method"], "rounds": method["rounds"]}))
    parts = [summarise_report(method["report"])]
    sizes = size_summary(method)
    if sizes:
        parts += ["", format_sizes(sizes)]
    layers = layer_table(method)
    if layers:
        parts += ["", format_layers(layers)]
    return "\n".join(parts)


def summarise_run_dir(run_dir: Union[str, Path], as_json: bool = False) -> str:
    """``pwfn report RUN_DIR``: a comparison or method folder as text (or its raw JSON with ``as_json``).

    A folder whose run is still going (only ``metrics.jsonl``) shows the completed rounds.
    Raises ``PwfnError`` for a folder that is not a run folder. Needs no torch.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PwfnError(f"run folder {str(folder)!r} does not exist")
    if (folder / "compare.json").exists():
        data = read_json(folder / "compare.json")
        if as_json:
            return json.dumps(data, indent=2)
        parts = [format_table(data["table"])]
        for method in data.get("methods", {}):
            if (folder / method / "report.json").exists():
                parts.append("")
                parts.append(summarise_method_folder(folder / method))
        return "\n".join(parts)
    if (folder / "report.json").exists():
        if as_json:
            return json.dumps(read_json(folder / "report.json"), indent=2)
        return summarise_method_folder(folder)
    if (folder / "metrics.jsonl").exists():
        rows = read_metrics(folder / "metrics.jsonl")
        return "run in progress or interrupted; completed rounds:\n" + summarise_report({"method": folder.name, "rounds": rows})
    raise PwfnError(f"{str(folder)!r} holds no report.json, compare.json or metrics.jsonl: is it a pwfn run folder?")
