"""Prepared GPU benchmark: one command, under ten minutes on one CUDA device.

Three parts, each recorded when a CUDA device is present (``benchmarks/results/gpu_suite.json``
and ``.md``):

* ``engine``: the full PWFN and WFN schedules (10 rounds each, as engine_scaling.py) over 25M
  and 1e8 synthetic weights on the GPU: seconds per schedule, and the engine's peak CUDA memory
  above its inputs (``torch.cuda.max_memory_allocated``), in bytes per weight.
* ``step``: a ResNet-18-sized CNN (224 px, batch 64) and a ViT-S/16-sized transformer (batch 64),
  built here (no torchvision/timm needed): the float training step against the Bayesian
  ``sample``-mode step with and without the sigma regulariser, eager and ``torch.compile``d, each
  as a ratio to the float step in the same mode (CUDA-event timing, interleaved rounds, medians).
* ``ddp``: DistributedDataParallel over every GPU present (NCCL; one process per GPU): the float
  and the Bayesian step of the CNN, and one fixing round whose result rank 0 broadcasts (every
  rank checks it holds the same values and masks).

Without CUDA the script says so and exits 0 without writing anything. ``--device cpu --dry-run``
runs every part at tiny sizes on the CPU (gloo for DDP) into ``--out``: the CI smoke test.

    python benchmarks/gpu_suite.py                          # on a CUDA machine: all parts
    python benchmarks/gpu_suite.py --parts engine,step      # a subset
    python benchmarks/gpu_suite.py --device cpu --dry-run --out /tmp/gpu_suite
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import _bench as BE  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bayes  # noqa: E402

PARTS = ("engine", "step", "ddp")


# ------------------------------------------------------------------------------------------
# models (plain torch, so the GPU machine needs nothing beyond torch)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def resnet18_sized(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """ResNet-18's layout (4 stages of 2 basic blocks, 64-512 channels): 11.7M parameters at width 64."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        for i in range(2):
            layers.append(_Block(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class ViTSized(nn.Module):
    """ViT-S/16's layout (patch 16, width 384, 12 pre-norm blocks of 6 heads, MLP 1536): 22M parameters."""

    def __init__(self, image: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.body(h))[:, 0])


def _step_models(dry: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]]:
    """name -> (builder, input shape, batch)."""
    if dry:
        return {"resnet18-sized": (lambda: resnet18_sized(10, width=4), (3, 32, 32), 4),
                "vit-s16-sized": (lambda: ViTSized(32, 16, 32, 2, 2, 10), (3, 32, 32), 4)}
    return {"resnet18-sized": (resnet18_sized, (3, 224, 224), 64),
            "vit-s16-sized": (ViTSized, (3, 224, 224), 64)}


# ------------------------------------------------------------------------------------------
# timing


class _Clock:
    """Seconds of a block of work: CUDA events on a GPU, the process clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any], n: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / n
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n


def _paired(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    out = {}
    for k, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times[base])]
        out[k] = {"median_s": statistics.median(ts), "ratio": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


# ------------------------------------------------------------------------------------------
# part 1: the engine


def _laplace(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(n, generator=g, device=device, dtype=torch.float32) - 0.5
    return -(0.03 / math.sqrt(2)) * torch.sign(u) * torch.log1p(-2 * u.abs())


def part_engine(device: torch.device, dry: bool, log) -> dict[str, Any]:
    from pwfn.core.engine import EngineCache, EngineConfig, fix_round
    from pwfn.core.schedules import pwfn_schedule, tolerance_for_round, wfn_schedule

    sizes = [20_000, 50_000] if dry else [25_000_000, 100_000_000]
    rows = []
    for n in sizes:
        w = _laplace(n, device)
        sigma = bayes.power_of_two_sigma(w)
        for method in ("pwfn", "wfn"):
            sched, cfg = ((pwfn_schedule(k=1.0), EngineConfig(sigma_update="std_mu")) if method == "pwfn"
                          else (wfn_schedule(0.01), EngineConfig(signed_terms=True)))
            values, fixed = w.clone(), torch.zeros(n, dtype=torch.bool, device=device)
            sig = sigma.clone() if method == "pwfn" else None
            cache, total, peak = EngineCache(), 0.0, 0
            for t, p in enumerate(sched.fractions):
                tol = tolerance_for_round(sched, t, values=values, sigma=sig)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                res = fix_round(values, tol, fixed, p, sigma=sig, config=cfg, cache=cache)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
                total += time.perf_counter() - start
                values, fixed, sig = res.values, res.fixed, res.sigma
                del res, tol
            rows.append({"n": n, "method": method, "seconds": total, "all_fixed": bool(fixed.all()),
                         "unique": int(torch.unique(values).numel()),
                         "peak_extra_bytes": peak if device.type == "cuda" else None,
                         "peak_extra_bytes_per_weight": peak / n if device.type == "cuda" else None})
            log(f"engine {method} N={n:,}: {total:.2f} s")
            del values, fixed, sig
        del w, sigma
    return {"rows": rows}


# ------------------------------------------------------------------------------------------
# part 2: float vs Bayesian step, eager and compiled


def part_step(device: torch.device, dry: bool, log, backend: str) -> dict[str, Any]:
    out = []
    amp = device.type == "cuda"
    rounds, block, warmup = (2, 1, 2) if dry else (7, 5, 3)
    for name, (build, shape, batch) in _step_models(dry).items():
        torch.manual_seed(0)
        float_model = build().to(device)
        bnn = bayes.bayesianize(float_model)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        compiled = {"float": torch.compile(float_model, backend=backend), "bayes": torch.compile(bnn, backend=backend)}
        steps: dict[str, Callable[[], None]] = {}
        for mode in ("eager", "compiled"):
            for kind in ("float", "sample", "sample + sigma reg"):
                root = float_model if kind == "float" else bnn
                call = root if mode == "eager" else compiled["float" if kind == "float" else "bayes"]
                opt = torch.optim.SGD(root.parameters(), lr=1e-4, momentum=0.9)
                steps[f"{mode}|{kind}"] = _train_step(call, root, opt, x, y, kind.endswith("reg"), amp)
        t0 = time.perf_counter()
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        clock = _Clock(device)
        times: dict[str, list[float]] = {k: [] for k in steps}
        order = list(steps)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                times[k].append(clock.time(steps[k], block))
        res = {}
        for mode in ("eager", "compiled"):
            sub = {k.split("|")[1]: v for k, v in times.items() if k.startswith(mode)}
            res[mode] = _paired(sub, "float")
        out.append({"model": name, "batch": batch, "input": list(shape),
                    "parameters": sum(p.numel() for p in float_model.parameters()),
                    "gaussian_tensors": len(bayes.gaussian_parameters(bnn)), "warmup_s": warm_s,
                    "autocast_bf16": amp, "results": res})
        log(f"step {name}: " + ", ".join(f"{m} {k} {v['ratio']:.3f}x" for m, r in res.items() for k, v in r.items()
                                         if k != "float"))
        del float_model, bnn, compiled, steps
    return {"models": out, "backend": backend}


def _train_step(call, root, opt, x, y, reg: bool, amp: bool) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(call(x), y)
        if reg:
            loss = loss + bayes.sigma_regularizer(root)
        loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------------
# part 3: DDP on the GPUs present


def _ddp_worker(rank: int, world: int, init: str, out_dir: str, dry: bool, device_type: str) -> None:
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pwfn
    from pwfn.training.distributed import DistContext, shutdown_distributed, tensor_checksum

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    ok = False
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        build, shape, batch = _step_models(dry)["resnet18-sized"]
        torch.manual_seed(0)
        float_model = build().to(device)
        fixer = pwfn.Fixer(copy.deepcopy(float_model), method="pwfn", config={"contract": {"enforce": False}},
                           inplace=True)
        models = {"float": DDP(float_model, device_ids=[rank] if device_type == "cuda" else None),
                  "bayes": DDP(fixer.model, device_ids=[rank] if device_type == "cuda" else None)}
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        clock = _Clock(device)
        steps = {}
        for kind, m in models.items():
            opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
            root = fixer.model if kind == "bayes" else float_model

            def step(m=m, opt=opt, reg=(kind == "bayes"), root=root) -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device_type == "cuda"):
                    loss = F.cross_entropy(m(x), y)
                if reg:
                    loss = loss + bayes.sigma_regularizer(root)
                loss.backward()
                opt.step()

            steps[kind] = step
            for _ in range(2):
                step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(2 if dry else 5):
            for k, fn in steps.items():
                times[k].append(clock.time(fn, 1 if dry else 5))
        ctx = DistContext(rank=rank, world_size=world, device=device)
        t = time.perf_counter()
        fixer.fix_next(broadcast=ctx.broadcast_)
        fix_s = time.perf_counter() - t
        local = tensor_checksum(fixer.view.values(), fixer.view.fixed())
        checks = [None] * world
        dist.all_gather_object(checks, local)
        if rank == 0:
            (Path(out_dir) / "ddp.json").write_text(json.dumps(
                {"world": world, "backend": backend, "times": times, "fix_round_s": fix_s,
                 "ranks_agree": len(set(checks)) == 1, "checksums": checks}))
        ok = True
    finally:
        shutdown_distributed(synchronise=ok)


def part_ddp(device: torch.device, dry: bool, log) -> dict[str, Any]:
    import json

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        return {"skipped": "torch.distributed is unavailable"}
    world = torch.cuda.device_count() if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        init = (Path(tmp) / "init").as_uri()
        mp.spawn(_ddp_worker, args=(world, init, tmp, dry, device.type), nprocs=world, join=True)
        doc = json.loads((Path(tmp) / "ddp.json").read_text())
    doc["summary"] = _paired(doc["times"], "float")
    log(f"ddp world {world}: bayes/float {doc['summary']['bayes']['ratio']:.3f}x, ranks agree: {doc['ranks_agree']}")
    return doc


# ------------------------------------------------------------------------------------------
# output


def markdown(doc: dict[str, Any]) -> str:
    lines = BE.header("GPU suite: engine, compiled Bayesian steps, DDP", "gpu_suite.py", None, doc["machine"],
                      command=doc["command"], date=doc["date"])
    lines += [f"Device: {doc['device_name']}.", ""]
    if "engine" in doc:
        lines += ["## Engine: full 10-round schedules on the device", ""]
        lines.append(BE.md_table(["N", "method", "seconds", "peak extra B/weight", "unique values", "all fixed"],
                                 [[r["n"], r["method"], r["seconds"], r["peak_extra_bytes_per_weight"], r["unique"],
                                   r["all_fixed"]] for r in doc["engine"]["rows"]]))
        lines.append("")
    if "step" in doc:
        lines += ["## Training step: Bayesian vs float, eager and compiled", "",
                  f"Median over interleaved rounds of the paired ratio to the float step in the same mode; "
                  f"`torch.compile` backend {doc['step']['backend']}; bf16 autocast on CUDA.", ""]
        rows = []
        for m in doc["step"]["models"]:
            for mode, res in m["results"].items():
                for kind, v in res.items():
                    rows.append([m["model"], mode, kind, f"{1000 * v['median_s']:.2f}", f"{v['ratio']:.3f}",
                                 f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}"])
        lines.append(BE.md_table(["model", "mode", "step", "median ms", "x float", "range"], rows))
        lines.append("")
    if "ddp" in doc:
        d = doc["ddp"]
        lines += ["## DDP", ""]
        if "skipped" in d:
            lines.append(f"Skipped: {d['skipped']}.")
        else:
            lines.append(BE.md_table(["world", "backend", "float ms", "bayes ms", "x float", "fix round s",
                                      "ranks agree"],
                                     [[d["world"], d["backend"], f"{1000 * d['summary']['float']['median_s']:.2f}",
                                       f"{1000 * d['summary']['bayes']['median_s']:.2f}",
                                       f"{d['summary']['bayes']['ratio']:.3f}", d["fix_round_s"], d["ranks_agree"]]]))
        lines.append("")
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (the CI smoke test)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --dry-run aot_eager)")
    ap.add_argument("--out", type=Path, default=BE.RESULTS)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here - skipped (nothing measured, nothing written). "
              "Run it on a machine with a GPU, or try the CPU paths with --device cpu --dry-run.")
        return 0
    device = torch.device(args.device)
    if device.type == "cpu" and not args.dry_run:
        ap.error("--device cpu runs the tiny --dry-run sizes only (the figures are for GPUs)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    doc: dict[str, Any] = {"benchmark": "gpu_suite", "command": BE.command_line("gpu_suite.py", argv),
                           "machine": BE.machine(), "date": BE.utc_now(), "dry_run": args.dry_run,
                           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "notes": []}
    t0 = time.perf_counter()
    if "engine" in parts:
        doc["engine"] = part_engine(device, args.dry_run, log)
    if "step" in parts:
        doc["step"] = part_step(device, args.dry_run, log, args.backend or ("aot_eager" if args.dry_run else "inductor"))
    if "ddp" in parts:
        doc["ddp"] = part_ddp(device, args.dry_run, log)
    doc["seconds"] = time.perf_counter() - t0
    doc["notes"].append(f"Whole run: {doc['seconds']:.0f} s.")
    if args.dry_run:
        doc["notes"].append("Dry run: tiny sizes, not figures to compare.")
    BE.write_outputs(args.out, "gpu_suite", doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    raise SystemExit(main())
