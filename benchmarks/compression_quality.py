"""Compression quality: PWFN and WFN side by side with standard quantisation baselines.

Per dataset (digits-MLP, MNIST-5k LeNet-5, and CIFAR-10 ResNet-20 when its files are on disk)
one float baseline is trained (``pwfn.run.pipeline.prepare_run``) and every method starts from it:

* float baseline (the reference; its time is the unit of the time ratios);
* uniform per-tensor 4- and 3-bit (symmetric, 15 / 7 levels, MSE-chosen clipping), post-training
  (PTQ) and with quantisation-aware fine-tuning (QAT, straight-through estimator) for as many
  epochs as PWFN trains in its rounds;
* APoT-style 4-bit (per-tensor scale x sums of two powers of two), PTQ and QAT;
* network-wide k-means weight sharing with K = the number of unique values PWFN ended with;
* WFN at delta 0.0075 / 0.01 / 0.015, and PWFN with the config's settings.

Baselines are in ``benchmarks/baselines.py``. Columns: top-1 on the test split, unique values
and entropy (bits per weight; with and without the zero value) over the quantised tensors,
the size of the whole state_dict packed with ``pwfn.export.packing.pack`` (quantised tensors as
entropy-coded codebook indices, the rest raw; for per-tensor-scale methods the codebook is the
union of the tensors' values), compression vs the fp32 state_dict, and wall time (absolute and
as a ratio to the float baseline's training time measured in the same invocation).

    python benchmarks/compression_quality.py            # every dataset, config settings
    python benchmarks/compression_quality.py --quick    # digits-MLP only (a few minutes)
    python benchmarks/compression_quality.py --dry      # tiny smoke run (seconds)
    python benchmarks/compression_quality.py --cifar-root /data/cifar10 --cifar-set baseline.epochs=30

Writes ``compression_quality.md``/``.json``/``.png`` into ``--out`` (default benchmarks/results);
run folders (baseline.pt, fixed models) go to ``--work`` (default: a new folder under /tmp).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench as BE  # noqa: E402  (puts the repository root on sys.path)
import baselines as BL  # noqa: E402
import torch  # noqa: E402

import bayes  # noqa: E402
from pwfn.core import metrics as M  # noqa: E402
from pwfn.export.packing import pack  # noqa: E402
from pwfn.model.config import load_config  # noqa: E402
from pwfn.run.experiment import prepare_run  # noqa: E402
from pwfn.run.pipeline import FixingRun  # noqa: E402
from pwfn.training.train import evaluate, seed_everything  # noqa: E402

DATASETS: dict[str, dict[str, Any]] = {
    "digits_mlp": {"config": "configs/digits_mlp.yaml", "title": "digits (8x8) - MLP 64-128-64-10"},
    "mnist5k_lenet5": {"config": "configs/mnist5k_lenet5.yaml", "title": "MNIST-5k - LeNet-5"},
    "cifar10_resnet20": {"config": "configs/cifar10_resnet20.yaml", "title": "CIFAR-10 - ResNet-20",
                         "needs_root": True},
}
FULL = ("digits_mlp", "mnist5k_lenet5", "cifar10_resnet20")
QUICK = ("digits_mlp",)
DRY = ("digits_mlp",)
DELTAS = (0.0075, 0.01, 0.015)

DRY_SET = ["baseline.epochs=2", "data.train_subset=300", "data.eval_subset=200",
           "pwfn.fractions=[0.5, 1.0]", "wfn.fractions=[0.5, 1.0]", "pwfn.first_round_epochs=0.1",
           "pwfn.round_epochs=0.3", "wfn.round_epochs=0.3", "pwfn.mc_samples=1"]
#: CIFAR on a CPU: a reduced budget in --quick (the config's 160 epochs are meant for a GPU)
CIFAR_QUICK_SET = ["data.train_subset=5000", "data.eval_subset=2000", "baseline.epochs=10",
                   "pwfn.first_round_epochs=0.05", "pwfn.round_epochs=0.5", "wfn.round_epochs=0.5"]


# ------------------------------------------------------------------------------------------
# one row


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # the point model's state (fixed masks live in pwfn's QuantView, never in the model; a Bayesian
    # model's mu is renamed to the parameter's own name and its sigma dropped)
    state = bayes.point_state_dict(model.state_dict())
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values())


def measure(model: torch.nn.Module, names: list[str], loader, device, method: str, seconds: float | None,
            extra: dict | None = None) -> dict[str, Any]:
    """Accuracy, codebook statistics and packed size of a (quantised) model."""
    state = _state(model)
    vals = [state[n] for n in names]
    row: dict[str, Any] = {"method": method, "top1": evaluate(model, loader, device)["top1"]}
    row["n_weights"] = int(sum(v.numel() for v in vals))
    row["unique"] = M.unique_count(vals, include_zero=True)
    row["unique_nonzero"] = M.unique_count(vals, include_zero=False)
    row["entropy"] = M.entropy_bits(vals, include_zero=True)
    row["entropy_nonzero"] = M.entropy_bits(vals, include_zero=False)
    row["fp32_bytes"] = _fp32_bytes(state)
    # the float model: nothing is coded as indices (its "codebook" would be every value)
    quantised = names if method != "float" else []
    row["packed_bytes"] = len(pack(state, quantised, metadata={"method": method}))
    row["compression"] = row["fp32_bytes"] / row["packed_bytes"]
    row["seconds"] = seconds
    row["quantised_tensors"] = len(names)
    if extra:
        row.update(extra)
    return row


# ------------------------------------------------------------------------------------------
# one dataset


def pwfn_epochs(cfg) -> float:
    """Epochs PWFN trains in all (warm-up + every round that is followed by training)."""
    p = cfg.pwfn
    return p.first_round_epochs + p.round_epochs * sum(1 for f in p.fractions if f < 1.0)


def run_dataset(key: str, cfg, deltas, log) -> dict[str, Any]:
    t0 = time.perf_counter()
    device, loaders, recipe, base_model, info = prepare_run(cfg)
    base_seconds = info.get("seconds")
    if not info.get("reused") and base_seconds is None:
        base_seconds = time.perf_counter() - t0
    test_loader = loaders.test or loaders.val
    folder = Path(cfg.out_dir) / cfg.name
    plain_names = [n for n, _ in BL.quantisable(base_model)]
    rows: list[dict[str, Any]] = []
    rows.append(measure(base_model, plain_names, test_loader, device, "float", base_seconds,
                        {"family": "float", "baseline_reused": bool(info.get("reused"))}))
    log(f"[{key}] float baseline: top-1 {rows[-1]['top1']:.2f} ({base_seconds or 0:.1f} s)")

    # PWFN first: its unique-value count sets K for k-means
    fixed: dict[str, dict[str, Any]] = {}

    def fixing(method: str, label: str, run_cfg, sub: str) -> dict[str, Any]:
        run_dir = folder / sub
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)  # every method starts from the same RNG state, whatever ran before
        t = time.perf_counter()
        res = FixingRun(method, run_cfg, base_model, loaders.train, loaders.val, loaders.test, device=device,
                        run_dir=run_dir, recipe=recipe).run(resume=False)
        secs = time.perf_counter() - t
        (run_dir / "bench_seconds.json").write_text(json.dumps({"seconds": secs}) + "\n")
        names = list(res.report["quantised_tensors"])
        row = measure(res.point_model, names, test_loader, device, label, secs,
                      {"family": method, "run_dir": str(run_dir)})
        if method == "pwfn" and "mc" in res.report["final"]:
            row["mc_top1"] = res.report["final"]["mc"]["top1"]
            row["ece"] = res.report["final"]["mc"]["ece"]
        fixed[label] = row
        log(f"[{key}] {label}: top-1 {row['top1']:.2f}, unique {row['unique']}, "
            f"entropy {row['entropy']:.3f} ({secs:.1f} s)")
        return row

    pwfn_row = fixing("pwfn", f"PWFN (k={cfg.pwfn.k:g})", cfg, "pwfn")
    wfn_rows = []
    for d in deltas:
        wcfg = copy.deepcopy(cfg)
        wcfg.wfn.delta = float(d)
        wfn_rows.append(fixing("wfn", f"WFN (delta={d:g})", wcfg, f"wfn_d{d:g}"))

    # post-training baselines
    ptq: list[dict[str, Any]] = []
    for label, q in (("uniform 4-bit PTQ", BL.UniformQuantizer(4)), ("uniform 3-bit PTQ", BL.UniformQuantizer(3)),
                     ("APoT 4-bit PTQ", BL.APoTQuantizer())):
        t = time.perf_counter()
        qm, names, _ = BL.quantise_model(base_model, q)
        secs = time.perf_counter() - t
        ptq.append(measure(qm, names, test_loader, device, label, secs, {"family": "ptq"}))
        log(f"[{key}] {label}: top-1 {ptq[-1]['top1']:.2f} ({secs:.1f} s)")
    k = int(pwfn_row["unique"])
    t = time.perf_counter()
    km, names, _ = BL.kmeans_share(base_model, k)
    secs = time.perf_counter() - t
    kmeans_row = measure(km, names, test_loader, device, f"k-means (K={k}, per network)", secs,
                         {"family": "kmeans", "k": k})
    log(f"[{key}] k-means K={k}: top-1 {kmeans_row['top1']:.2f} ({secs:.1f} s)")

    # quantisation-aware fine-tuning for PWFN's training budget
    budget = pwfn_epochs(cfg)
    b = cfg.baseline
    qat: list[dict[str, Any]] = []
    for label, q in (("uniform 4-bit QAT", BL.UniformQuantizer(4)), ("uniform 3-bit QAT", BL.UniformQuantizer(3)),
                     ("APoT 4-bit QAT", BL.APoTQuantizer())):
        seed_everything(cfg.seed)
        t = time.perf_counter()
        qm, names, stats = BL.qat_finetune(base_model, q, loaders.train, budget, optimizer=b.optimizer,
                                           lr=b.lr * 0.1, momentum=b.momentum, weight_decay=b.weight_decay,
                                           grad_clip=1.0, device=device)
        secs = time.perf_counter() - t
        qat.append(measure(qm, names, test_loader, device, label, secs,
                           {"family": "qat", "epochs": budget, "steps": stats["steps"]}))
        log(f"[{key}] {label}: top-1 {qat[-1]['top1']:.2f} ({secs:.1f} s)")

    rows += ptq + [kmeans_row] + qat + wfn_rows + [pwfn_row]
    ref = rows[0]["top1"]
    for r in rows:
        r["delta_top1"] = r["top1"] - ref
        r["time_ratio"] = (r["seconds"] / base_seconds) if (r["seconds"] is not None and base_seconds) else None
    return {"key": key, "title": DATASETS[key]["title"], "config": DATASETS[key]["config"],
            "overrides": list(getattr(cfg, "_bench_overrides", [])), "baseline_seconds": base_seconds,
            "baseline_reused": bool(info.get("reused")), "pwfn_epochs": budget,
            "n_train": len(loaders.train.dataset) if hasattr(loaders.train, "dataset") else None,
            "n_test": len(test_loader.dataset) if hasattr(test_loader, "dataset") else None,
            "rows": rows}


# ------------------------------------------------------------------------------------------
# output


HEADS = ["method", "top-1 %", "vs float", "unique", "unique (no 0)", "entropy bits", "entropy (no 0)",
         "packed B", "x vs fp32", "time s", "time / float training"]


def table(ds: dict[str, Any]) -> str:
    rows = []
    for r in ds["rows"]:
        rows.append([r["method"], f"{r['top1']:.2f}", f"{r['delta_top1']:+.2f}", r["unique"], r["unique_nonzero"],
                     f"{r['entropy']:.3f}", f"{r['entropy_nonzero']:.3f}", r["packed_bytes"], f"{r['compression']:.1f}",
                     None if r["seconds"] is None else f"{r['seconds']:.1f}",
                     None if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"])
    return BE.md_table(HEADS, rows)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (lower-or-equal x and higher-or-equal y)."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


COLOURS = {"ptq": "tab:gray", "kmeans": "tab:purple", "qat": "tab:blue", "wfn": "tab:orange", "pwfn": "tab:red"}
MARKERS = {"ptq": "o", "kmeans": "D", "qat": "s", "wfn": "^", "pwfn": "*"}


def short(method: str) -> str:
    """Compact point labels for the plot."""
    out = method.replace("uniform ", "U").replace("-bit", "").replace("APoT 4", "APoT4")
    out = out.replace(" (delta=", " d=").replace(", per network)", ")").replace("(k=", "k=").replace("(K=", "K=")
    return out.rstrip(")") if out.count("(") < out.count(")") else out


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    if not results or not BE.have_matplotlib():
        return None
    plt = BE.pyplot()
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.6 * len(results)), squeeze=False)
    for row_axes, ds in zip(axes, results):
        rows = [r for r in ds["rows"] if r["family"] != "float"]
        ref = ds["rows"][0]["top1"]
        for ax, key, xlabel, logx in ((row_axes[0], "entropy", "weight entropy (bits, zero included)", False),
                                      (row_axes[1], "unique", "unique weight values (log)", True)):
            pts = [(float(r[key]), float(r["top1"])) for r in rows]
            def nx(v: float, logx: bool = logx) -> float:
                return math.log10(v) if logx else v

            xr = (max(nx(p[0]) for p in pts) - min(nx(p[0]) for p in pts)) or 1.0
            yr = (max(p[1] for p in pts) - min(p[1] for p in pts)) or 1.0
            placed: list[tuple[float, float]] = []
            for r, (x, y) in zip(rows, pts):
                fam = r["family"]
                ax.scatter([x], [y], color=COLOURS.get(fam, "k"), marker=MARKERS.get(fam, "o"),
                           s=110 if fam == "pwfn" else 40, zorder=3)
                # labels of points close to an already labelled one are stacked below it
                k = sum(1 for (px, py) in placed if abs(nx(x) - px) < 0.25 * xr and abs(y - py) < 0.04 * yr)
                placed.append((nx(x), y))
                ax.annotate(short(r["method"]), (x, y), fontsize=7, xytext=(5, 3 - 9 * k), textcoords="offset points")
            front = pareto(pts)
            ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="k",
                    lw=1, alpha=0.6, label="Pareto front")
            ax.axhline(ref, color="k", ls="--", lw=0.8, label=f"float {ref:.2f} %")
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 % (test)")
            ax.set_title(ds["title"], fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(x=0.15, y=0.12)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(doc: dict[str, Any], argv) -> str:
    lines = BE.header("Compression quality: PWFN / WFN vs quantisation baselines", "compression_quality.py",
                      argv, doc["machine"], date=doc.get("date"))
    lines += [
        "Every method starts from the same float baseline (trained once per dataset in this invocation). "
        "Quantised tensors: every Linear/Conv weight and bias (WFN also quantises BatchNorm affine "
        "parameters, as the method prescribes). *unique*/*entropy* are over those tensors; *packed B* is the "
        "whole state_dict through `pwfn.export.packing.pack` (quantised tensors as entropy-coded codebook indices, "
        "everything else raw; the float row packs everything raw); *x vs fp32* = fp32 state_dict bytes / "
        "packed bytes. Per-tensor-scale methods (uniform, APoT) get the union of their tensors' values as "
        "codebook. *time / float training* divides each method's wall time by the float baseline's training "
        "time measured in the same run (absolute times on a shared machine drift; ratios less so). QAT "
        "fine-tunes for as many epochs as PWFN trains (warm-up + rounds), baseline optimizer at 0.1x its "
        "learning rate with cosine decay, grad-clip 1.0. k-means uses K = PWFN's unique count (zero included).",
        "",
    ]
    for ds in doc["datasets"]:
        extra = f", overrides {ds['overrides']}" if ds["overrides"] else ""
        lines += [f"## {ds['title']}", "",
                  f"Config `{ds['config']}`{extra}; {ds['n_train']} training / {ds['n_test']} test images; "
                  f"float training {ds['baseline_seconds'] or 0:.1f} s"
                  f"{' (reused from the work folder)' if ds['baseline_reused'] else ''}; "
                  f"PWFN / QAT budget {ds['pwfn_epochs']:g} epochs"
                  + (f"; one test image = {100 / ds['n_test']:.2f} points of top-1." if ds["n_test"] else "."),
                  "", table(ds), ""]
    for note in doc["notes"]:
        lines.append(f"- {note}")
    if doc.get("plot"):
        lines += ["", f"![accuracy vs entropy and unique values]({Path(doc['plot']).name})"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------


def _cifar_present(root: str | None) -> bool:
    if not root:
        return False
    r = Path(root)
    return (r / "cifar-10-batches-py" / "data_batch_1").is_file() or (r / "data_batch_1").is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits-MLP only (a few minutes)")
    ap.add_argument("--dry", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    ap.add_argument("--deltas", default=None, help="WFN deltas (default 0.0075,0.01,0.015; --dry: 0.01)")
    ap.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py (CIFAR is skipped otherwise)")
    ap.add_argument("--cifar-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for CIFAR only (repeatable), e.g. baseline.epochs=30")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every dataset (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="run folders (default: a new folder under /tmp)")
    ap.add_argument("--out", type=Path, default=BE.RESULTS, help="where the .md/.json/.png go")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON in --out")
    args = ap.parse_args(argv)
    if args.replot:
        doc = json.loads((args.out / "compression_quality.json").read_text())
        print(plot(doc["datasets"], args.out / "compression_quality.png"))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    keys = (args.datasets.split(",") if args.datasets else list(DRY if args.dry else QUICK if args.quick else FULL))
    for k in keys:
        if k not in DATASETS:
            ap.error(f"unknown dataset {k!r}; choose from {', '.join(DATASETS)}")
    deltas = [float(d) for d in args.deltas.split(",")] if args.deltas else ([0.01] if args.dry else list(DELTAS))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pwfn-bench-quality-"))
    doc: dict[str, Any] = {"benchmark": "compression_quality", "command": BE.command_line("compression_quality.py", argv),
                           "machine": BE.machine(), "date": BE.utc_now(), "mode": "dry" if args.dry else "quick" if args.quick else "full",
                           "work": str(work), "datasets": [], "skipped": [], "notes": []}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for key in keys:
        spec = DATASETS[key]
        overrides = [f"out_dir={work}", "progress=false", f"device={args.device}", f"threads={args.threads}"]
        extra = list(args.overrides)
        if args.dry:
            extra += DRY_SET
        if spec.get("needs_root"):
            if not _cifar_present(args.cifar_root):
                doc["skipped"].append(key)
                doc["notes"].append(f"{spec['title']}: skipped - no CIFAR-10 files on disk (pass --cifar-root "
                                    "FOLDER with cifar-10-batches-py; nothing is downloaded).")
                log(f"[{key}] skipped: no CIFAR-10 files (--cifar-root)")
                continue
            extra = [f"data.root={args.cifar_root}"] + (CIFAR_QUICK_SET if args.quick or args.dry else []) + extra
            extra += args.cifar_set
        cfg = load_config(BE.ROOT / spec["config"], overrides + extra)
        cfg._bench_overrides = extra  # type: ignore[attr-defined]
        doc["datasets"].append(run_dataset(key, cfg, deltas, log))
    doc["notes"] += [
        "No GPU on this machine: everything ran on the CPU with the thread count shown above. ImageNet "
        "(the papers' setting) is not measured here.",
        "Single seed per method (seed 0): on these small test splits, differences of a few test images "
        "are within noise.",
    ]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    png = plot(doc["datasets"], out / "compression_quality.png")
    doc["plot"] = str(png) if png else None
    if png is None and doc["datasets"]:
        doc["notes"].append("matplotlib is not installed: no plot.")
    text = markdown(doc, argv)
    BE.write_outputs(out, "compression_quality", doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
