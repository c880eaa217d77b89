"""Device targets and budget mode (issue 16): file sizes, accuracy, multiplications, K values.

Per dataset (digits-MLP, MNIST-5k LeNet-5) one float baseline is trained
(``pwfn.pipeline.prepare_run``) and every method starts from it:

1. **Targets** for the PWFN point model (config settings): the codebook ONNX, the
   LUT-compressed TFLite-Micro model and the hls4ml project (power-of-two products), each
   checked by its exporter (``pwfn.export.targets``). Reported: file bytes against the fp32 and an
   int8 copy of the weights, top-1 on the test split *as each runtime computes it* (onnxruntime,
   the TFLite-Micro interpreter, hls4ml's C simulation, the shift-add reference) against the
   point model, and multiplications left per input.
2. **Budget mode** at K = 16, 32, 64 unique values (``budget.max_values``, with
   ``budget.max_values_per_tensor: 128`` so the TFLite-Micro tables always fit) against
   network-wide k-means weight sharing with K values and uniform per-tensor quantisation
   (``benchmarks/baselines.py``, post-training) with the same number of values: K levels per
   tensor (what a per-tensor table of K entries holds) and the largest odd number of levels per
   tensor whose network-wide total stays <= K.

    python benchmarks/device_targets.py            # both datasets
    python benchmarks/device_targets.py --quick    # digits-MLP only
    python benchmarks/device_targets.py --dry      # tiny smoke run (seconds)

Writes ``device_targets.md``/``.json`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench as BE  # noqa: E402  (puts the repository root on sys.path)
import baselines as BL  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pwfn import metrics as M  # noqa: E402
from pwfn.config import load_config  # noqa: E402
from pwfn.experiment import prepare_run  # noqa: E402
from pwfn.export.targets import run_target  # noqa: E402
from pwfn.export.targets.shiftadd import ShiftAddNet, calibrate  # noqa: E402
from pwfn.pipeline import FixingRun  # noqa: E402
from pwfn.train import evaluate, seed_everything  # noqa: E402

DATASETS = {
    "digits_mlp": {"config": "configs/digits_mlp.yaml", "title": "digits (8x8) - MLP 64-128-64-10"},
    "mnist5k_lenet5": {"config": "configs/mnist5k_lenet5.yaml", "title": "MNIST-5k - LeNet-5"},
}
KS = (16, 32, 64)
DRY_SET = ["baseline.epochs=2", "data.train_subset=300", "data.eval_subset=100", "pwfn.fractions=[0.5, 1.0]",
           "pwfn.first_round_epochs=0.1", "pwfn.round_epochs=0.3", "pwfn.mc_samples=1"]


def _test_arrays(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs).float(), torch.cat(ys)


def _acc(logits: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.as_tensor(np.asarray(logits)).reshape(len(y), -1).argmax(1)
    return 100.0 * float((pred == y).float().mean())


def _state_sizes(model: torch.nn.Module) -> tuple[int, int]:
    sd = [t for t in model.state_dict().values() if t.is_floating_point()]
    numel = sum(t.numel() for t in sd)
    return 4 * numel, numel + 4 * len(sd)  # fp32; int8 + one fp32 scale per tensor


def targets_rows(point: torch.nn.Module, report: dict, x: torch.Tensor, y: torch.Tensor, b: int,
                 log) -> dict[str, Any]:
    point = copy.deepcopy(point).cpu().eval()
    fp32, int8 = _state_sizes(point)
    with torch.no_grad():
        ref_logits = point(x)
    base_acc = _acc(ref_logits, y)
    codebook = torch.tensor(report["final"]["codebook"], dtype=torch.float32)
    fp = calibrate(point, x, frac_bits=12, headroom_bits=1)
    net = ShiftAddNet(point, b=b, fixed_point=fp)
    counts = net.operation_counts(tuple(x.shape[1:]))
    macs = counts["total"]["macs"]
    rows: list[dict[str, Any]] = [{"target": "point model (torch, fp32)", "bytes": fp32, "top1": base_acc,
                                   "agree": 100.0, "mult_left": macs}]
    sa = net(x)
    rows.append({"target": f"shift-add reference (ap_fixed<{fp.width},{fp.int_bits}>)", "bytes": None,
                 "top1": _acc(sa, y), "agree": _agree(sa, ref_logits), "mult_left": 0})
    example = x[:2]
    t = time.perf_counter()
    files, info = run_target("onnx", point, example, codebook=codebook, b=b)
    import onnxruntime

    sess = onnxruntime.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    rows.append({"target": "ONNX codebook + Gather (onnxruntime)", "bytes": len(files["model.onnx"]),
                 "top1": _acc(out, y), "agree": _agree(out, ref_logits), "mult_left": macs,
                 "detail": {k: info[k] for k in ("index_bytes", "table_bytes", "float_bytes", "fp32_onnx_bytes")},
                 "seconds": time.perf_counter() - t})
    log(f"  onnx: {len(files['model.onnx']):,} B")
    t = time.perf_counter()
    files, info = run_target("tflm", point, example, b=b)
    from pwfn.export.targets.tflm import run_tflm

    out = run_tflm(files["model.tflite"], x.numpy())
    rows.append({"target": "TFLite-Micro, LUT-compressed (TFLM interpreter)", "bytes": len(files["model.tflite"]),
                 "top1": _acc(out, y), "agree": _agree(out, ref_logits), "mult_left": macs,
                 "detail": {"uncompressed_bytes": info["uncompressed_bytes"],
                            "not_compressed": info["not_compressed"]},
                 "seconds": time.perf_counter() - t})
    log(f"  tflm: {len(files['model.tflite']):,} B")
    t = time.perf_counter()
    from pwfn.export.targets.hls4ml import export_hls4ml

    # the whole test split through the C simulation, checked bit for bit against the reference
    data, info = export_hls4ml(point, x[:2], b=b, fixed_point=fp, check_inputs=x[2:])
    hls_out = net(x)  # equal to the C simulation's outputs (checked inside, bit for bit)
    rows.append({"target": "hls4ml exponent products (C simulation)", "bytes": len(data),
                 "top1": _acc(hls_out, y), "agree": _agree(hls_out, ref_logits),
                 "mult_left": info["multiplications_left"],
                 "detail": {"layers": info["layers"], "products": info["products"],
                            "fixed_point": info["fixed_point"], "note": "bytes: the project tar.gz (sources, "
                            "weights as text, ap_types headers), not a device image"},
                 "seconds": time.perf_counter() - t})
    log(f"  hls4ml: bit-identical to the reference on {len(x)} test inputs")
    for r in rows:
        r["vs_fp32"] = fp32 / r["bytes"] if r["bytes"] else None
        r["vs_int8"] = int8 / r["bytes"] if r["bytes"] else None
    return {"fp32_bytes": fp32, "int8_bytes": int8, "macs": macs, "operations": counts["total"],
            "point_top1": base_acc, "rows": rows}


def _agree(a: Any, ref: torch.Tensor) -> float:
    pa = torch.as_tensor(np.asarray(a)).reshape(ref.shape[0], -1).argmax(1)
    return 100.0 * float((pa == ref.argmax(1)).float().mean())


def uniform_levels_for_total(n_tensors: int, k: int) -> int:
    """Largest odd level count m per tensor with 1 + n_tensors * (m - 1) <= k (zero shared)."""
    m = 3
    while 1 + n_tensors * (m + 1) <= k:
        m += 2
    return m


def budget_rows(key: str, cfg, prep, folder: Path, ks, log) -> list[dict[str, Any]]:
    device, loaders, recipe, base_model, _ = prep
    test_loader = loaders.test or loaders.val
    names = [n for n, _ in BL.quantisable(base_model)]
    rows = []
    for k in ks:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.budget.max_values = k
        run_cfg.budget.max_values_per_tensor = 128
        seed_everything(cfg.seed)
        t = time.perf_counter()
        res = FixingRun("pwfn", run_cfg, base_model, loaders.train, loaders.val, loaders.test, device=device,
                        run_dir=folder / f"budget_{k}", recipe=recipe).run(resume=False)
        b = res.report["budget"]
        rows.append({"K": k, "method": "PWFN budget", "top1": evaluate(res.point_model, test_loader, device)["top1"],
                     "unique": b["max_values"]["achieved"], "entropy": res.report["final"]["entropy"],
                     "per_tensor_max": b["max_values_per_tensor"]["achieved"], "met": b["met"],
                     "power_of_two": True, "seconds": time.perf_counter() - t})
        log(f"[{key}] K={k}: PWFN budget top-1 {rows[-1]['top1']:.2f} ({rows[-1]['unique']} values)")
        km, _, _ = BL.kmeans_share(base_model, k)
        vals = [p.detach() for n, p in BL.quantisable(km)]
        rows.append({"K": k, "method": "k-means (network-wide)", "top1": evaluate(km, test_loader, device)["top1"],
                     "unique": M.unique_count(vals), "entropy": M.entropy_bits(vals), "met": M.unique_count(vals) <= k,
                     "power_of_two": False})
        levels = uniform_levels_for_total(len(names), k)
        fits = 1 + len(names) * (levels - 1) <= k
        for lv, label in ((levels, f"uniform per tensor, {levels} levels "
                                   + ("(most with network total <= K)" if fits else "(fewest; network total > K)")),
                          (k - 1 if k % 2 == 0 else k, f"uniform per tensor, {k - 1 if k % 2 == 0 else k} levels")):
            bits = max(2, (lv + 1).bit_length() - 1 + (0 if ((lv + 1) & lv) == 0 else 1))
            q = BL.SymmetricGridQuantizer(torch.arange((lv - 1) // 2 + 1, dtype=torch.float64) / ((lv - 1) // 2),
                                          name=f"uniform{lv}")
            um, _, _ = BL.quantise_model(base_model, q)
            vals = [p.detach() for _, p in BL.quantisable(um)]
            rows.append({"K": k, "method": label, "top1": evaluate(um, test_loader, device)["top1"],
                         "unique": M.unique_count(vals), "entropy": M.entropy_bits(vals),
                         "met": M.unique_count(vals) <= k, "power_of_two": False, "bits": bits})
    return rows


def run_dataset(key: str, cfg, ks, log) -> dict[str, Any]:
    prep = prepare_run(cfg)
    device, loaders, recipe, base_model, info = prep
    folder = Path(cfg.out_dir) / cfg.name
    test_loader = loaders.test or loaders.val
    x, y = _test_arrays(test_loader)
    log(f"[{key}] float baseline: top-1 {info['test']['top1']:.2f}")
    seed_everything(cfg.seed)
    t = time.perf_counter()
    res = FixingRun("pwfn", cfg, base_model, loaders.train, loaders.val, loaders.test, device=device,
                    run_dir=folder / "pwfn", recipe=recipe).run(resume=False)
    log(f"[{key}] PWFN: top-1 {res.report['final']['test']['top1']:.2f}, {res.report['final']['unique']} values "
        f"({time.perf_counter() - t:.0f} s)")
    targets = targets_rows(res.point_model, res.report, x, y, cfg.pwfn.engine.b, log)
    budget = budget_rows(key, cfg, prep, folder, ks, log)
    return {"key": key, "title": DATASETS[key]["title"], "float_top1": info["test"]["top1"],
            "pwfn": {"top1": res.report["final"]["test"]["top1"], "unique": res.report["final"]["unique"],
                     "entropy": res.report["final"]["entropy"]},
            "test_images": len(y), "targets": targets, "budget": budget}


def markdown(doc: dict[str, Any], argv) -> str:
    lines = BE.header("Device targets and budget mode", "device_targets.py", argv, doc["machine"],
                      doc["command"], doc["date"])
    for ds in doc["datasets"]:
        t = ds["targets"]
        lines += [f"## {ds['title']}", "",
                  f"Float baseline {ds['float_top1']:.2f} %, PWFN point model {ds['pwfn']['top1']:.2f} % with "
                  f"{ds['pwfn']['unique']} values ({ds['pwfn']['entropy']:.2f} bits), {ds['test_images']} test images. "
                  f"Weights: fp32 {t['fp32_bytes']:,} B, int8 {t['int8_bytes']:,} B; {t['macs']:,} multiply-"
                  "accumulates per input.", "",
                  BE.md_table(["target", "file bytes", "fp32 / file", "int8 / file", "top-1 %",
                               "same prediction as point model %", "multiplications left"],
                              [[r["target"], r["bytes"], r["vs_fp32"], r["vs_int8"], r["top1"], r["agree"],
                                r["mult_left"]] for r in t["rows"]]), ""]
        ops = t["operations"]
        lines += [f"Shift-add: {ops['macs']:,} multiply-accumulates become {ops['shifts']:,} shifts and "
                  f"{ops['adds']:,} adds; {ops['zero_weight_macs_skipped']:,} products with a zero weight are "
                  "skipped.", "",
                  "Budget mode against k-means and uniform quantisation at the same K (post-training for the "
                  "baselines):", "",
                  BE.md_table(["K", "method", "top-1 %", "unique values", "entropy bits", "met K",
                               "power-of-two (no multiplier)"],
                              [[r["K"], r["method"], r["top1"], r["unique"], r["entropy"], r["met"],
                                r["power_of_two"]] for r in ds["budget"]]), ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits-MLP only")
    ap.add_argument("--dry", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    ap.add_argument("--ks", default=None, help="budget values K (default 16,32,64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="run folders (default: a new folder under /tmp)")
    ap.add_argument("--out", type=Path, default=BE.RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    keys = args.datasets.split(",") if args.datasets else (["digits_mlp"] if args.quick or args.dry else list(DATASETS))
    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([16] if args.dry else list(KS))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pwfn-bench-targets-"))
    doc: dict[str, Any] = {"benchmark": "device_targets", "command": BE.command_line("device_targets.py", argv),
                           "machine": BE.machine(), "date": BE.utc_now(), "datasets": [], "notes": [
        "int8 bytes: one byte per weight plus one fp32 scale per tensor (a nominal int8 copy, for scale).",
        "ONNX and TFLite-Micro decode the weights to float and multiply as usual: they save storage, not "
        "multiplications. The hls4ml project applies each weight as shifts (power-of-two products, values with "
        "several terms split into parallel layers); its C simulation equals the shift-add reference bit for bit "
        "on every test input (checked), so its accuracy is the reference's.",
        "hls4ml bytes are the project archive (C++ sources, weights as text, headers), not a bitstream.",
        "Baselines are post-training (no fine-tuning); budget-mode PWFN retrains between rounds as usual.",
        "Single seed (0); on these small test splits a few images are within noise.",
    ]}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for key in keys:
        extra = [f"out_dir={work}", "progress=false", "device=cpu", f"threads={args.threads}"]
        if args.dry:
            extra += DRY_SET
        cfg = load_config(BE.ROOT / DATASETS[key]["config"], extra)
        doc["datasets"].append(run_dataset(key, cfg, ks, log))
    md = markdown(doc, argv)
    jp, mp = BE.write_outputs(args.out, "device_targets", doc, md)
    print(md)
    log(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
