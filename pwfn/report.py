"""``pwfn report RUN_DIR``: a readable summary of a run folder (one method or a comparison)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from .errors import PwfnError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PwfnError(f"cannot read {path}: {exc}") from exc


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def summarise_report(report: dict) -> str:
    lines = [f"method: {report.get('method')}"]
    lines.append("| round | fraction | fixed % | top-1 after fix | top-1 after train | unique | entropy | entropy (no 0) | s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in report.get("rounds", []):
        lines.append(
            f"| {r['round'] + 1} | {r['fraction']} | {100 * r.get('fixed_fraction', 0):.1f} | "
            f"{_fmt(r['after_fix'].get('top1'), 2)} | {_fmt(r.get('after_train', {}).get('top1'), 2)} | "
            f"{_fmt(r.get('unique'))} | {_fmt(r.get('entropy'))} | {_fmt(r.get('entropy_nonzero'))} | "
            f"{_fmt(r.get('wall_seconds'), 1)} |"
        )
    f = report.get("final", {})
    if f:
        t = f.get("test", {})
        lines.append(
            f"final: top-1 {_fmt(t.get('top1'), 2)}%"
            + (f", top-5 {_fmt(t.get('top5'), 2)}%" if t.get("top5") is not None else "")
            + f", unique {f.get('unique')} ({f.get('unique_nonzero')} without 0), entropy {_fmt(f.get('entropy'))} bits "
            f"({_fmt(f.get('entropy_nonzero'))} without 0)"
        )
        if "order_shares" in f:
            shares = ", ".join(f"order {k}: {100 * v:.1f}%" for k, v in sorted(f["order_shares"].items()))
            lines.append(f"power-of-two terms per weight: {shares}")
        if "mc" in f:
            lines.append(f"calibration ({f['mc']['samples']} MC samples): NLL {_fmt(f['mc']['nll'], 4)}, "
                         f"ECE {_fmt(f['mc']['ece'], 4)}")
        if "size" in report:
            lines.append(f"sizes: {json.dumps(report['size'].get('total', {}))}")
    base = report.get("baseline")
    if base:
        lines.append(f"float baseline: top-1 {_fmt(base['test'].get('top1'), 2)}%")
    return "\n".join(lines)


def summarise_run_dir(run_dir: Union[str, Path], as_json: bool = False) -> str:
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PwfnError(f"run folder {str(folder)!r} does not exist")
    if (folder / "compare.json").exists():
        data = _read_json(folder / "compare.json")
        if as_json:
            return json.dumps(data, indent=2)
        from .pipeline import format_table

        parts = [format_table(data["table"])]
        for method in data.get("methods", {}):
            rep = folder / method / "report.json"
            if rep.exists():
                parts.append("")
                parts.append(summarise_report(_read_json(rep)))
        return "\n".join(parts)
    if (folder / "report.json").exists():
        data = _read_json(folder / "report.json")
        return json.dumps(data, indent=2) if as_json else summarise_report(data)
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return "run in progress or interrupted; completed rounds:\n" + summarise_report({"method": folder.name, "rounds": rows})
    raise PwfnError(f"{str(folder)!r} holds no report.json, compare.json or metrics.jsonl: is it a pwfn run folder?")
