"""Export size benchmark: how close the packed artefact gets to the entropy bound, and how fast.

For every model of the zoo, weights (He-initialised, i.e. trained-like bell shapes) are
snapped to a realistic shared codebook: 0 and +-(sums of up to 3 positive power-of-two
terms) down to 2^-7 for PWFN, up to 2 signed terms for WFN. A run folder is written the
way the pipeline leaves one, exported with ``pwfn.export.export_run`` and reloaded from
both the packed artefact and the safetensors. Real run folders can be added with
``--runs`` (method or comparison folders; they are copied first, never modified).

Writes ``export_size.md`` and ``export_size.json`` (into ``benchmarks/results`` unless
``--out``) with, per model: fp32, fp16, fixed-width, global and per-tensor entropy bounds,
packed bytes, packed/bound ratio, fixed overhead, and export/reload times (median of
``--repeat``).

    python benchmarks/export_size.py            # full zoo
    python benchmarks/export_size.py --quick    # mlp, lenet5, resnet20
    python benchmarks/export_size.py --dry      # CI smoke test: tiny, into a temp folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # _bench, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import machine  # noqa: E402

from pwfn.core import metrics as M  # noqa: E402
from pwfn.export import export_run, load_exported_model, load_packed_model  # noqa: E402
from pwfn.model.zoo import create_model  # noqa: E402
from pwfn.run.pipeline import save_point_model  # noqa: E402

ROOT = Path(__file__).resolve().parent
PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

ZOO: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": 64, "hidden": [128, 64], "num_classes": 10},
    "lenet5": {"in_channels": 1, "num_classes": 10, "input_size": 28},
    "resnet20": {"num_classes": 10},
    "resnet32": {"num_classes": 10},
}
QUICK = ("mlp", "lenet5", "resnet20")
DRY = ("mlp",)


def codebook(method: str, b: int = 7) -> torch.Tensor:
    """PWFN: up to 3 positive terms; WFN: up to 2 signed terms; |c| < 1, smallest term 2^-b."""
    n = torch.arange(1, 2**b, dtype=torch.float64)
    signed = method == "wfn"
    terms = M.term_counts(n / 2**b, b=b, signed_terms=signed)
    mags = n[terms <= (2 if signed else 3)] / 2**b
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).float()


def snap(t: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1).clamp(cb[0], cb[-1])
    pos = torch.searchsorted(cb, flat)
    lo, hi = cb[(pos - 1).clamp(0)], cb[pos.clamp(max=len(cb) - 1)]
    return torch.where((flat - lo).abs() <= (hi - flat).abs(), lo, hi).reshape(t.shape)


def snapped_model(name: str, method: str, seed: int = 0) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(seed)
    model = create_model(name, **ZOO[name])
    cb = codebook(method)
    names = []
    with torch.no_grad():
        for mname, m in model.named_modules():
            if isinstance(m, PLAIN):
                for p in ("weight", "bias"):
                    t = getattr(m, p, None)
                    if t is not None:
                        t.copy_(snap(t, cb))
                        names.append(f"{mname}.{p}")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):  # trained-like statistics
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(10_000)
    return model.eval(), names


def write_run(folder: Path, model: nn.Module, recipe: dict, quantised: list[str], method: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    values = torch.cat([model.state_dict()[n].reshape(-1) for n in quantised])
    cb, _ = M.codebook(values)
    report = {
        "method": method,
        "fractions": [1.0],
        "quantised_tensors": quantised,
        "final": {"fixed_fraction": 1.0, "codebook": [float(v) for v in cb.tolist()]},
        "rounds": [],
    }
    (folder / "report.json").write_text(json.dumps(report))
    # no manifest: export reads the run's signed terms from the point model's description
    save_point_model(model, folder, recipe, method=method, signed_terms=method == "wfn")


def measure(run_dir: Path, label: str, method: str, repeat: int) -> dict[str, Any]:
    """Export ``repeat`` times and reload from both files ``repeat`` times; sizes and medians."""
    t_export, t_packed, t_st = [], [], []
    result: dict[str, Any] = {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = export_run(run_dir)
        t_export.append(time.perf_counter() - t0)
    out = Path(result["out_dir"])
    for _ in range(repeat):
        t0 = time.perf_counter()
        a = load_packed_model(out / "model.pwfn")
        t_packed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = load_exported_model(out)
        t_st.append(time.perf_counter() - t0)
    sa, sb = a.state_dict(), b.state_dict()
    identical = list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    s = result["size"]
    q, pf = s["quantised"], s["packed_file"]
    return {
        "model": label,
        "method": method,
        "weights": s["weights"],
        "tensors": s["tensors"],
        "codebook_size": s["codebook_size"],
        "entropy_bits": s["global_entropy_bits"],
        "fp32_bytes": q["fp32_bytes"],
        "fp16_bytes": q["fp16_bytes"],
        "fixed_width_bytes": q["fixed_width_bytes"],
        "entropy_bound_bytes": q["entropy_bound_bytes"],
        "per_tensor_bound_bytes": q["per_tensor_entropy_bound_bytes"],
        "packed_bytes": q["packed_bytes"],
        "ratio_packed_to_bound": s["ratio_packed_to_bound"],
        "overhead_bytes": pf["overhead"],
        "manifest_bytes": pf["manifest"],
        "raw_tensor_bytes": pf["raw_tensors"],
        "file_bytes": pf["total"],
        "state_dict_fp32_bytes": s["total"]["fp32_bytes"],
        "within_target": q["packed_bytes"] + pf["overhead"] <= 1.02 * q["entropy_bound_bytes"] + 8192
        and pf["overhead"] < 8192,
        "order_shares": s["order_shares"],
        "multiplications_replaced": s["arithmetic"]["multiplications_replaced"],
        "export_s": statistics.median(t_export),
        "reload_packed_s": statistics.median(t_packed),
        "reload_safetensors_s": statistics.median(t_st),
        "reloads_identical": identical,
    }


def real_runs(paths: list[str], work: Path) -> list[tuple[Path, str, str]]:
    """Copies of the given run folders (without checkpoints), one entry per method folder."""
    out = []
    for i, p in enumerate(paths):
        src = Path(p)
        dst = work / f"real{i}" / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint.pt", "baseline.pt", "export"))
        folders = [dst] if (dst / "report.json").exists() else [d for d in sorted(dst.iterdir()) if (d / "report.json").exists()]
        for f in folders:
            method = json.loads((f / "report.json").read_text())["method"]
            out.append((f, f"{src.name}/{f.name} (real run)", method))
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    heads = ["model", "method", "weights", "K", "H bits", "fp32 B", "fp16 B", "fixed-width B", "entropy bound B",
             "per-tensor bound B", "packed B", "packed/bound", "overhead B", "file B", "export s",
             "reload .pwfn s", "reload .safetensors s"]
    lines = [
        "# Export size: packed artefact vs entropy bound",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine']['cpu_count']} cores "
        f"(torch threads {meta['machine']['torch_threads']}), load average at start "
        f"{meta['machine'].get('loadavg_at_start')}, Python {meta['machine']['python']}, torch {meta['machine']['torch']}  ",
        f"Date: {meta['date']}",
        "",
        "Byte columns are for the quantised weights (fp32/fp16/fixed-width/bounds: metrics.size_report; packed: "
        "coded indices + shared symbol tables from packing.size_breakdown). *overhead* is header + zlib-compressed "
        "manifest + trailer; *file* is the whole model.pwfn including raw BatchNorm statistics. Target: "
        "packed + overhead <= 1.02 x bound + 8 KiB, overhead < 8 KiB. Times are medians of "
        f"{meta['repeat']} runs (export includes the in-memory verification and writing all files).",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['weights']:,} | {r['codebook_size']} | {r['entropy_bits']:.3f} | "
            f"{r['fp32_bytes']:,} | {r['fp16_bytes']:,} | {r['fixed_width_bytes']:,.0f} | "
            f"{r['entropy_bound_bytes']:,.0f} | {r['per_tensor_bound_bytes']:,.0f} | {r['packed_bytes']:,} | "
            f"{r['ratio_packed_to_bound']:.4f} | {r['overhead_bytes']:,} | {r['file_bytes']:,} | "
            f"{r['export_s']:.3f} | {r['reload_packed_s']:.3f} | {r['reload_safetensors_s']:.3f} |"
        )
    bad = [r["model"] + "/" + r["method"] for r in rows if not (r["within_target"] and r["reloads_identical"])]
    lines += ["", "All within target and reloads bit-identical." if not bad else f"NOT within target: {bad}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="mlp, lenet5 and resnet20 only")
    ap.add_argument("--dry", action="store_true", help="CI smoke test: one tiny model, one repeat, temp output")
    ap.add_argument("--out", default=None, help="folder for export_size.md/.json (default benchmarks/results)")
    ap.add_argument("--runs", nargs="*", default=[], help="real run folders (method or comparison) to add")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    names = DRY if args.dry else QUICK if args.quick else tuple(ZOO)
    repeat = 1 if args.dry else max(1, args.repeat)
    meta = {
        "command": " ".join(["python", "benchmarks/export_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "repeat": repeat,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="pwfn-export-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            for method in ("pwfn", "wfn"):
                model, q = snapped_model(name, method)
                run = work / f"{name}_{method}" / method
                write_run(run, model, {"name": name, "kwargs": ZOO[name]}, q, method)
                rows.append(measure(run, name, method, repeat))
                print(f"{name}/{method}: packed/bound {rows[-1]['ratio_packed_to_bound']:.4f}, "
                      f"export {rows[-1]['export_s']:.3f}s", file=sys.stderr)
        for folder, label, method in real_runs(args.runs, work):
            rows.append(measure(folder, label, method, repeat))
        out = Path(args.out) if args.out else (work / "results" if args.dry else ROOT / "results")
        out.mkdir(parents=True, exist_ok=True)
        (out / "export_size.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "export_size.md").write_text(to_markdown(rows, meta))
        sys.stdout.write(to_markdown(rows, meta))
    ok = all(r["within_target"] and r["reloads_identical"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
