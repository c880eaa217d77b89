"""Device targets and budget mode (issue 16): file sizes, accuracy, multiplications, K values.

Per dataset (digits-MLP, MNIST-5k LeNet-5) one float baseline is trained
(``pwfn.run.pipeline.prepare_run``) and every method starts from it; two more models are made from
Python with ``pwfn.compress(model, ..., run_dir=...)`` as a user would (``_device_models``: a
Conv1d + BatchNorm signal classifier and a small transformer, on generated data) and exported
with ``pwfn.export_run(run, targets=[...])``, their recipes recorded by ``pwfn.RecipeMixin``:

1. **Targets** for the PWFN point model (config settings): the codebook ONNX, the
   LUT-compressed TFLite-Micro model and the hls4ml project (power-of-two products), each
   checked by its exporter (``pwfn.export.targets``). Reported: file bytes against the fp32 and an
   int8 copy of the weights, top-1 on the test split *as each runtime computes it* (onnxruntime,
   the TFLite-Micro interpreter, hls4ml's C simulation, the shift-add reference) against the
   point model, and multiplications left per input. A target that cannot take a model is
   recorded with its message.
2. **Budget mode** at K = 16, 32, 64 unique values (``budget.max_values``, with
   ``budget.max_values_per_tensor: 128`` so the TFLite-Micro tables always fit) against
   network-wide k-means weight sharing with K values and uniform per-tensor quantisation
   (``benchmarks/baselines.py``, post-training) with the same number of values: K levels per
   tensor (what a per-tensor table of K entries holds) and the largest odd number of levels per
   tensor whose network-wide total stays <= K.

    python benchmarks/device_targets.py            # every dataset
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

from pwfn.core import metrics as M  # noqa: E402
from pwfn.export.targets import run_target  # noqa: E402
from pwfn.export.targets.shiftadd import ShiftAddNet, calibrate  # noqa: E402
from pwfn.model.config import load_config  # noqa: E402
from pwfn.run.experiment import prepare_run  # noqa: E402
from pwfn.run.pipeline import FixingRun  # noqa: E402
from pwfn.training.train import evaluate, seed_everything  # noqa: E402

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
    x = torch.cat(xs)
    return (x.float() if x.is_floating_point() else x), torch.cat(ys)


def _acc(logits: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.as_tensor(np.asarray(logits)).reshape(len(y), -1).argmax(1)
    return 100.0 * float((pred == y).float().mean())


def _state_sizes(model: torch.nn.Module) -> tuple[int, int]:
    from pwfn.export.targets import weight_sizes

    return weight_sizes(model)  # fp32; int8 + one fp32 scale per tensor


def _dense_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per input of the Linear/Conv layers and attention (inputs and outputs
    projections and its two matrix products), counted with hooks on one sample."""
    total = 0
    hooks = []

    def hook(m, inp, out):
        nonlocal total
        o = out[0] if isinstance(out, tuple) else out
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * o.numel()
        elif isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            total += o.numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        elif isinstance(m, torch.nn.MultiheadAttention):
            t, e = inp[0].shape[-2], m.embed_dim
            total += 4 * t * e * e + 2 * t * t * e
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return total


def _refused(rows: list, target: str, exc: Exception, log) -> None:
    rows.append({"target": target, "bytes": None, "top1": None, "agree": None, "mult_left": None,
                 "refused": str(exc)})
    log(f"  {target}: refused: {str(exc)[:160]}")


def targets_rows(point: torch.nn.Module, codebook: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: int,
                 log) -> dict[str, Any]:
    from pwfn.errors import PwfnError

    point = copy.deepcopy(point).cpu().eval()
    fp32, int8 = _state_sizes(point)
    with torch.no_grad():
        ref_logits = point(x)
    base_acc = _acc(ref_logits, y)
    macs = _dense_macs(point, x)
    rows: list[dict[str, Any]] = [{"target": "point model (torch, fp32)", "bytes": fp32, "top1": base_acc,
                                   "agree": 100.0, "mult_left": macs}]
    counts = None
    fp = None
    try:
        ShiftAddNet(point, b=b, example=x[:1])  # refuses a layer it cannot take, naming it
        fp = calibrate(point, x, frac_bits=12, headroom_bits=1)
        net = ShiftAddNet(point, b=b, fixed_point=fp, example=x[:1])
        counts = net.operation_counts(tuple(x.shape[1:]))
        sa = net(x)
        rows.append({"target": f"shift-add reference (ap_fixed<{fp.width},{fp.int_bits}>)", "bytes": None,
                     "top1": _acc(sa, y), "agree": _agree(sa, ref_logits),
                     "mult_left": counts["total"]["multiplications_left"]})
    except PwfnError as exc:
        _refused(rows, "shift-add reference", exc, log)
    example = x[:2]
    t = time.perf_counter()
    try:
        files, info = run_target("onnx", point, example, codebook=codebook, b=b)
        import onnxruntime

        sess = onnxruntime.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        rows.append({"target": "ONNX, packed indices (onnxruntime)", "bytes": len(files["model.onnx"]),
                     "top1": _acc(out, y), "agree": _agree(out, ref_logits), "mult_left": macs,
                     "detail": {k: info.get(k) for k in ("index_bits", "table_values", "index_bytes", "table_bytes",
                                                         "float_bytes", "fp32_onnx_bytes")},
                     "seconds": time.perf_counter() - t})
        log(f"  onnx: {len(files['model.onnx']):,} B ({info.get('index_bits')}-bit indices)")
    except PwfnError as exc:
        _refused(rows, "ONNX", exc, log)
    t = time.perf_counter()
    try:
        files, info = run_target("tflm", point, example, b=b)
        from pwfn.export.targets.tflm import run_tflm

        out = run_tflm(files["model.tflite"], x.numpy())
        rows.append({"target": "TFLite-Micro, LUT-compressed (TFLM interpreter)", "bytes": len(files["model.tflite"]),
                     "top1": _acc(out, y), "agree": _agree(out, ref_logits), "mult_left": macs,
                     "detail": {"uncompressed_bytes": info["uncompressed_bytes"],
                                "not_compressed": info["not_compressed"]},
                     "seconds": time.perf_counter() - t})
        log(f"  tflm: {len(files['model.tflite']):,} B")
    except PwfnError as exc:
        _refused(rows, "TFLite-Micro", exc, log)
    t = time.perf_counter()
    try:
        from pwfn.export.targets.hls4ml import export_hls4ml

        if fp is None:  # the shift-add reference refused: hls4ml's own check names the layers
            from pwfn.export.targets.hls4ml import check_model

            check_model(point, x[:1])
            raise PwfnError("no fixed-point reference (see the shift-add row)")
        # the whole test split through the C simulation, checked bit for bit against the reference
        data, info = export_hls4ml(point, x[:2], b=b, fixed_point=fp, check_inputs=x[2:])
        hls_out = net(x)  # equal to the C simulation's outputs (checked inside, bit for bit)
        rows.append({"target": "hls4ml exponent products (C simulation)", "bytes": len(data),
                     "top1": _acc(hls_out, y), "agree": _agree(hls_out, ref_logits),
                     "mult_left": info["multiplications_left"],
                     "detail": {"layers": info["layers"], "other_layers": info.get("other_layers"),
                                "products": info["products"], "fixed_point": info["fixed_point"],
                                "scale_multiplications": info.get("scale_multiplications"),
                                "divisions": info.get("divisions"),
                                "note": "bytes: the project tar.gz (sources, weights as text, ap_types headers), "
                                        "not a device image"},
                     "seconds": time.perf_counter() - t})
        log(f"  hls4ml: bit-identical to the reference on {len(x)} test inputs")
    except PwfnError as exc:
        _refused(rows, "hls4ml", exc, log)
    for r in rows:
        r["vs_fp32"] = fp32 / r["bytes"] if r["bytes"] else None
        r["vs_int8"] = int8 / r["bytes"] if r["bytes"] else None
    return {"fp32_bytes": fp32, "int8_bytes": int8, "macs": macs,
            "operations": counts["total"] if counts else None, "point_top1": base_acc, "rows": rows}


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
    codebook = torch.tensor(res.report["final"]["codebook"], dtype=torch.float32)
    targets = targets_rows(res.point_model, codebook, x, y, cfg.pwfn.engine.b, log)
    budget = budget_rows(key, cfg, prep, folder, ks, log)
    return {"key": key, "title": DATASETS[key]["title"], "float_top1": info["test"]["top1"],
            "pwfn": {"top1": res.report["final"]["test"]["top1"], "unique": res.report["final"]["unique"],
                     "entropy": res.report["final"]["entropy"]},
            "test_images": len(y), "targets": targets, "budget": budget}


PYTHON_MODELS = {
    "signal_conv1d_bn": {"kind": "signal", "title": "generated signals (4 waveforms) - Conv1d + BatchNorm CNN",
                         "model": "SignalNet", "epochs": 15},
    "tokens_transformer": {"kind": "tokens", "title": "generated tokens (majority of 3) - small transformer",
                           "model": "TinyTransformer", "epochs": 30},
}
PY_PWFN = {"progress": False, "pwfn": {"round_epochs": 1, "first_round_epochs": 0.5, "mc_samples": 2}}


def run_python(key: str, work: Path, threads: int, dry: bool, log) -> dict[str, Any]:
    """A model made and compressed from Python (``pwfn.compress`` with ``run_dir``), exported to each
    target with ``pwfn.export_run`` from its recorded recipe; then every runtime on the test split."""
    import _device_models as D

    import pwfn
    from pwfn.errors import PwfnError
    from pwfn.training.train import evaluate

    spec = PYTHON_MODELS[key]
    seed_everything(0)
    tr, va, te = D.loaders(spec["kind"])
    model = D.train(getattr(D, spec["model"])(), tr, 1 if dry else spec["epochs"])
    float_top1 = evaluate(model, te, torch.device("cpu"))["top1"]
    cfg = copy.deepcopy(PY_PWFN)
    cfg["threads"] = threads
    if dry:
        cfg["pwfn"].update(fractions=[0.5, 1.0], round_epochs=0.2, first_round_epochs=0.1, mc_samples=1)
    run = work / key / "pwfn"
    t = time.perf_counter()
    res = pwfn.compress(model, tr, va, method="pwfn", test_loader=te, run_dir=run, config=cfg, resume=False)
    final = res.report["final"]
    log(f"[{key}] PWFN: top-1 {final['test']['top1']:.2f} (float {float_top1:.2f}), {final['unique']} values "
        f"({time.perf_counter() - t:.0f} s)")
    routes = {}
    for target in ("onnx", "tflm", "hls4ml"):  # the user's route: the run folder, its recipe, one target each
        try:
            pwfn.export_run(run, work / key / f"export_{target}", targets=[target])
            routes[target] = "exported"
        except PwfnError as exc:
            routes[target] = f"refused: {exc}"
        log(f"  export_run --to {target}: {routes[target][:160]}")
    x, y = _test_arrays(te)
    codebook = torch.tensor(final["codebook"], dtype=torch.float32)
    targets = targets_rows(res.point_model, codebook, x, y, 7, log)
    return {"key": key, "title": spec["title"], "float_top1": float_top1,
            "pwfn": {"top1": final["test"]["top1"], "unique": final["unique"], "entropy": final["entropy"]},
            "recipe": pwfn.model.recipes.recipe_of(model)[0], "export_run": routes,
            "test_images": len(y), "targets": targets, "budget": []}


def markdown(doc: dict[str, Any], argv) -> str:
    lines = BE.header("Device targets and budget mode", "device_targets.py", argv, doc["machine"],
                      doc["command"], doc["date"])
    for ds in doc["datasets"]:
        t = ds["targets"]
        lines += [f"## {ds['title']}", "",
                  f"Float baseline {ds['float_top1']:.2f} %, PWFN point model {ds['pwfn']['top1']:.2f} % with "
                  f"{ds['pwfn']['unique']} values ({ds['pwfn']['entropy']:.2f} bits), {ds['test_images']} test inputs. "
                  f"Weights: fp32 {t['fp32_bytes']:,} B, int8 {t['int8_bytes']:,} B; {t['macs']:,} multiply-"
                  "accumulates per input.", ""]
        if ds.get("recipe"):
            lines += [f"Made from Python: `pwfn.compress(model, ..., run_dir=...)`, recipe recorded as "
                      f"`{ds['recipe']['factory']}({', '.join(f'{k}={v}' for k, v in ds['recipe']['kwargs'].items())})`; "
                      "`pwfn.export_run(run, targets=[target])` per target: "
                      + ", ".join(f"{k}: {v.split(':')[0]}" for k, v in ds["export_run"].items()) + ".", ""]
        lines += [BE.md_table(["target", "file bytes", "fp32 / file", "int8 / file", "top-1 %",
                               "same prediction as point model %", "multiplications left"],
                              [[r["target"], r["bytes"], r["vs_fp32"], r["vs_int8"], r["top1"], r["agree"],
                                r["mult_left"] if r.get("refused") is None else "refused"] for r in t["rows"]]), ""]
        onnx = next((r for r in t["rows"] if r["target"].startswith("ONNX") and not r.get("refused")), None)
        if onnx and onnx.get("detail", {}).get("index_bytes") is not None:
            d = onnx["detail"]
            w = d["index_bytes"] + d["table_bytes"] + d["float_bytes"]
            lines += [f"ONNX weights: {d['index_bytes']:,} B of indices (at most {d['index_bits']} bits, K = "
                      f"{d['table_values']}) + {d['table_bytes']:,} B of value tables + {d['float_bytes']:,} B kept "
                      f"float = {w:,} B, {w / t['int8_bytes']:.2f} x the int8 copy; the rest of the file is the "
                      "model's graph.", ""]
        for r in t["rows"]:
            if r.get("refused"):
                lines += [f"- {r['target']} refused: {r['refused']}"]
        if any(r.get("refused") for r in t["rows"]):
            lines.append("")
        ops = t["operations"]
        if ops:
            extra = ""
            if ops.get("scale_multiplications") or ops.get("divisions"):
                extra = (f" Left: {ops.get('scale_multiplications', 0):,} BatchNorm scale products and "
                         f"{ops.get('divisions', 0):,} pooling divisions.")
            lines += [f"Shift-add: {ops['macs']:,} multiply-accumulates become {ops['shifts']:,} shifts and "
                      f"{ops['adds']:,} adds; {ops['zero_weight_macs_skipped']:,} products with a zero weight are "
                      f"skipped.{extra}", ""]
        if ds["budget"]:
            lines += ["Budget mode against k-means and uniform quantisation at the same K (post-training for the "
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
    ap.add_argument("--datasets", default=None,
                    help=f"comma-separated subset of {','.join([*DATASETS, *PYTHON_MODELS])}")
    ap.add_argument("--ks", default=None, help="budget values K (default 16,32,64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="run folders (default: a new folder under /tmp)")
    ap.add_argument("--out", type=Path, default=BE.RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    keys = args.datasets.split(",") if args.datasets else (
        ["digits_mlp", "signal_conv1d_bn"] if args.quick or args.dry else [*DATASETS, *PYTHON_MODELS])
    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([16] if args.dry else list(KS))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pwfn-bench-targets-"))
    doc: dict[str, Any] = {"benchmark": "device_targets", "command": BE.command_line("device_targets.py", argv),
                           "machine": BE.machine(), "date": BE.utc_now(), "datasets": [], "notes": [
        "int8 bytes: one byte per weight plus one fp32 scale per tensor (a nominal int8 copy, for scale).",
        "ONNX holds one table of the K values and every weight's index at ceil(log2 K) bits, unpacked in the graph "
        "(onnxruntime folds it once at session start); TFLite-Micro holds per-tensor lookup tables. Both decode "
        "the weights to float and multiply as usual: they save storage, not multiplications (their multiplications "
        "left are the dense layers' multiply-accumulates, counted with hooks, attention included). The hls4ml project applies each weight as shifts (power-of-two products, values with "
        "several terms split into parallel layers); its C simulation equals the shift-add reference bit for bit "
        "on every test input (checked), so its accuracy is the reference's.",
        "hls4ml bytes are the project archive (C++ sources, weights as text, headers), not a bitstream.",
        "Baselines are post-training (no fine-tuning); budget-mode PWFN retrains between rounds as usual.",
        "Single seed (0); on these small test splits a few images are within noise.",
        "BatchNorm stays its own per-channel scale-and-shift layer on every target (folding it into the weights "
        "would take them off the codebook): in hls4ml and the shift-add reference one fixed-point product per "
        "value, counted under multiplications left, as is a division per output of an average pool whose window "
        "is not a power of two.",
        "The Python-made models (signal CNN, transformer) train on generated data with pwfn.compress's defaults "
        "but 1-epoch rounds; their runs are exported with pwfn.export_run from the recorded recipe, as a user's "
        "would be.",
    ]}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for key in keys:
        if key in PYTHON_MODELS:
            doc["datasets"].append(run_python(key, work, args.threads, args.dry, log))
            continue
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
