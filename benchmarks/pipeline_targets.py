"""The pipeline issue's targets: digits and MNIST-5k, float vs WFN vs PWFN, from one baseline.

Checks (i) both methods within 0.5 points top-1 of the float baseline ("lossless") and
(ii) PWFN at no more unique values and no higher entropy than WFN. It also runs PWFN with the
paper's regulariser strength lam = 2^-11 on the same baseline, to show why the shipped small-data
configs scale lam up (see the note written into the table).

    python benchmarks/pipeline_targets.py            # both datasets, writes benchmarks/results/pipeline_targets.md
    python benchmarks/pipeline_targets.py --quick    # digits only
    python benchmarks/pipeline_targets.py --dry      # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pwfn.model.config import load_config
from pwfn.run.experiment import compare, run_method

ROOT = Path(__file__).resolve().parent.parent
DRY = ["baseline.epochs=2", "pwfn.round_epochs=0.2", "wfn.round_epochs=0.2", "pwfn.first_round_epochs=0.1",
       "pwfn.mc_samples=2", "data.train_subset=200", "model.kwargs={hidden: [16]}"]


def run_dataset(config: Path, work: Path, extra: list[str], seed: int = 0) -> dict:
    base = [f"out_dir={work}", "progress=false", f"seed={seed}"] + extra
    cfg = load_config(config, base)
    cfg.name = f"{cfg.name}_s{seed}"
    t0 = time.perf_counter()
    out = compare(cfg)
    seconds = time.perf_counter() - t0
    rows = {r["method"]: r for r in out["table"]}
    # the paper's lam on the same baseline (the baseline is reused from the run folder)
    paper_cfg = load_config(config, base + ["pwfn.lam=0.00048828125"])
    paper_cfg.name = cfg.name + "_paper_lam"
    # same float baseline: its checkpoint records the same data/model/baseline settings, so it is reused
    (work / paper_cfg.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(work / cfg.name / "baseline.pt", work / paper_cfg.name / "baseline.pt")
    paper = run_method(paper_cfg, "pwfn")["final"]
    rows["pwfn (paper lam 2^-11)"] = {"method": "pwfn (paper lam 2^-11)", "top1": paper["test"]["top1"],
                                      "unique": paper["unique"], "unique_nonzero": paper["unique_nonzero"],
                                      "entropy": paper["entropy"], "entropy_nonzero": paper["entropy_nonzero"]}
    f, w, p = rows["float"]["top1"], rows["wfn"], rows["pwfn"]
    checks = {
        "wfn_lossless": f - w["top1"] <= 0.5,
        "pwfn_lossless": f - p["top1"] <= 0.5,
        "pwfn_unique_le_wfn": p["unique"] <= w["unique"],
        "pwfn_entropy_le_wfn": p["entropy"] <= w["entropy"],
    }
    return {"config": str(config.relative_to(ROOT)), "seed": seed, "lam": cfg.pwfn.lam, "rows": list(rows.values()),
            "checks": checks, "seconds": seconds}


def seed_summary(results: list[dict]) -> list[str]:
    """Per config and method: mean, min and max over seeds, and how many seeds passed each check."""
    lines = []
    for config in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == config]
        if len(runs) < 2:
            continue
        lines += [f"## {config}: {len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)})", "",
                  "| method | top-1 % mean [min, max] | unique mean [min, max] | entropy bits mean [min, max] |",
                  "|---|---|---|---|"]
        for method in [row["method"] for row in runs[0]["rows"]]:
            cells = []
            for key in ("top1", "unique", "entropy"):
                vals = [row[key] for r in runs for row in r["rows"] if row["method"] == method and row.get(key) is not None]
                cells.append("-" if not vals else f"{sum(vals) / len(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        passed = {k: sum(r["checks"][k] for r in runs) for k in runs[0]["checks"]}
        lines += ["", "Seeds passing each check: " + ", ".join(f"{k} {v}/{len(runs)}" for k, v in passed.items()), ""]
    return lines


def to_markdown(results: list[dict], command: str) -> str:
    lines = ["# Pipeline targets: float vs WFN vs PWFN (top-1 on the test split)", "",
             f"Command: `{command}`  ", f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    lines += seed_summary(results)
    for r in results:
        lines += [f"## {r['config']}, seed {r['seed']} (shipped PWFN lam = {r['lam']:g})", "",
                  "| method | top-1 % | unique | unique (no 0) | entropy bits | entropy (no 0) |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            def fmt(v, nd=3):
                return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))
            lines.append(f"| {row['method']} | {fmt(row['top1'], 2)} | {fmt(row.get('unique'))} | "
                         f"{fmt(row.get('unique_nonzero'))} | {fmt(row.get('entropy'))} | {fmt(row.get('entropy_nonzero'))} |")
        lines += ["", "Checks: " + ", ".join(f"{k} = {'yes' if v else 'NO'}" for k, v in r["checks"].items()),
                  f"(wall time {r['seconds']:.0f} s)", ""]
    lines += [
        "## Why the small-data configs raise lam",
        "",
        "The sigma regulariser's gradient is `-lam * relu(tau - sigma) * |eps|`: over a round it moves sigma by about",
        "`steps x lr x lam x tau`. The paper's lam = 2^-11 is sized for ImageNet, ~30 000 SGD steps per 3-epoch",
        "round; digits has ~60 steps per round and MNIST-5k ~110, so with the paper's lam sigma stays at its",
        "initial value (mean ~0.002), the tolerance k*sigma is ~2 % of a typical weight, the late rounds must",
        "escalate to 3-4 power-of-two terms and k x 2^20, and PWFN ends with *more* unique values than WFN (the",
        "`paper lam` rows). Scaling lam so the total push matches the paper's (lam 0.1-0.2 here) lets sigma",
        "learn (mean ~0.015-0.03) and PWFN then beats WFN on unique values and entropy at equal accuracy.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="digits only")
    ap.add_argument("--dry", action="store_true", help="tiny settings, seconds (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the data split stays fixed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_targets.md"))
    args = ap.parse_args(argv)
    configs = [ROOT / "configs" / "digits_mlp.yaml"]
    if not (args.quick or args.dry):
        configs.append(ROOT / "configs" / "mnist5k_lenet5.yaml")
    extra = DRY if args.dry else []
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_dataset(c, Path(tmp), extra, seed) for c in configs for seed in args.seeds]
    md = to_markdown(results, "python benchmarks/pipeline_targets.py" + (" --quick" if args.quick else "")
                     + (" --dry" if args.dry else "") + (f" --seeds {' '.join(map(str, args.seeds))}"
                                                        if args.seeds != [0] else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
