"""Plot ``engine_scaling.json`` (from ``benchmarks/engine_scaling.py``): engine time vs N, log-log.

Left: total seconds of the full 10-round PWFN and WFN schedules against the number of weights
N, with the sort floor (10 ``np.sort`` passes over N float32 values, measured in the same
process) and a dotted N log N guide through the floor's largest point. Right: the engine's peak
extra memory per weight (when the JSON has it).

    python benchmarks/plot_engine_scaling.py            # benchmarks/results/engine_scaling.json -> .png
    python benchmarks/plot_engine_scaling.py --quick    # same (plotting is quick anyway)
    python benchmarks/plot_engine_scaling.py --dry      # a built-in sample document (no input needed)
    python benchmarks/plot_engine_scaling.py --input other.json --out some/folder
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import _bench as BE  # noqa: E402

SAMPLE = {
    "benchmark": "engine_scaling", "command": "(built-in sample for --dry; not a measurement)",
    "machine": {}, "device": "cpu",
    "results": [
        {"n": 20_000, "sort_floor_seconds": 0.002,
         "pwfn": {"total_seconds": 0.05, "peak_extra_bytes_per_weight": 60.0},
         "wfn": {"total_seconds": 0.04, "peak_extra_bytes_per_weight": 55.0}},
        {"n": 200_000, "sort_floor_seconds": 0.025,
         "pwfn": {"total_seconds": 0.4, "peak_extra_bytes_per_weight": 50.0},
         "wfn": {"total_seconds": 0.35, "peak_extra_bytes_per_weight": 48.0}},
    ],
}


def series(doc: dict[str, Any]) -> dict[str, list]:
    res = sorted(doc.get("results", []), key=lambda r: r["n"])
    out: dict[str, list] = {"n": [r["n"] for r in res], "floor": [r.get("sort_floor_seconds") for r in res]}
    for m in ("pwfn", "wfn"):
        out[m] = [r.get(m, {}).get("total_seconds") for r in res]
        out[f"{m}_mem"] = [r.get(m, {}).get("peak_extra_bytes_per_weight") for r in res]
    return out


def plot(doc: dict[str, Any], path: Path, note: str | None = None) -> Path:
    s = series(doc)
    if not s["n"]:
        raise ValueError("the document holds no results")
    plt = BE.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"pwfn": ("tab:red", "o", "PWFN (10 rounds)"), "wfn": ("tab:orange", "s", "WFN (10 rounds)")}
    for m, (colour, marker, label) in styles.items():
        pts = [(n, t) for n, t in zip(s["n"], s[m]) if t]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=colour, label=label)
    floor = [(n, t) for n, t in zip(s["n"], s["floor"]) if t]
    if floor:
        ax.plot(*zip(*floor), marker="^", color="k", ls="--", label="sort floor (10 x np.sort)")
        n1, t1 = floor[-1]
        guide = [t1 * (n * math.log(n)) / (n1 * math.log(n1)) for n in s["n"]]
        ax.plot(s["n"], guide, color="gray", ls=":", lw=1, label="N log N guide")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights N")
    ax.set_ylabel("seconds (whole schedule)")
    ax.set_title(f"fixing engine time vs N ({doc.get('device', 'cpu')})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    any_mem = False
    for m, (colour, marker, label) in styles.items():
        pts = [(n, b) for n, b in zip(s["n"], s[f"{m}_mem"]) if b is not None]
        if pts:
            any_mem = True
            ax2.plot(*zip(*pts), marker=marker, color=colour, label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("weights N")
    ax2.set_ylabel("peak extra bytes per weight")
    ax2.set_title("engine memory (peak RSS above inputs, per weight)", fontsize=10)
    ax2.grid(alpha=0.3, which="both")
    if any_mem:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no memory figures in the JSON", ha="center", va="center", transform=ax2.transAxes)
    m = doc.get("machine") or {}
    title = note or (f"{m.get('cpu', '')} - torch {m.get('torch', '')} - threads {m.get('torch_threads', '')}"
                     if m else "")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, default=None,
                    help="engine_scaling JSON (default benchmarks/results/engine_scaling.json)")
    ap.add_argument("--out", type=Path, default=BE.RESULTS, help="folder for engine_scaling.png")
    ap.add_argument("--quick", action="store_true", help="accepted for symmetry; plotting is always quick")
    ap.add_argument("--dry", action="store_true", help="plot a built-in sample when no --input is given")
    args = ap.parse_args(argv)
    if not BE.have_matplotlib():
        print("matplotlib is not installed: nothing to plot (the 'plot' extra: pip install matplotlib)", file=sys.stderr)
        return 0
    if args.input is None and args.dry:
        doc, source = SAMPLE, "built-in sample"
    else:
        src = args.input or (BE.RESULTS / "engine_scaling.json")
        if not src.is_file():
            print(f"{src} does not exist: run `python benchmarks/engine_scaling.py --out {src}` first",
                  file=sys.stderr)
            return 2
        doc, source = json.loads(src.read_text()), str(src)
    note = "built-in sample for --dry: NOT a measurement" if source == "built-in sample" else None
    path = plot(doc, args.out / "engine_scaling.png", note)
    s = series(doc)
    rows = [[n, f, p, w, (p / f if p and f else None), (w / f if w and f else None)]
            for n, f, p, w in zip(s["n"], s["floor"], s["pwfn"], s["wfn"])]
    print(f"source: {source}\n")
    print(BE.md_table(["N", "sort floor s", "PWFN s", "WFN s", "PWFN / floor", "WFN / floor"], rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
