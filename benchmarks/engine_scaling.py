"""Scaling benchmark of the fixing engine: full PWFN and WFN schedules vs. a sort floor.

For each N: synthetic Laplace weights (std ~0.03, seeded), sigma from the PWFN
initialiser (distance to the nearest powers of two, computed here; the ``bayes`` package
will own it), then

* PWFN: 10 rounds, tolerance ``1.0 * sigma``, positive power-of-two terms, sigma update
  ``std_mu``;
* WFN:  10 rounds, tolerance ``delta_t * |w|`` (delta = 0.01), signed terms, no sigma;
  both with one ``EngineCache`` per schedule, as a run keeps one across its rounds;
* floor: 10 ``np.sort`` passes over N float32 values of the same distribution, in the same
  process (numpy's sort is single-threaded; ``--threads 1`` compares like with like, and
  on a busy shared machine torch's default 2 threads can be far slower than 1); and the same
  in a subprocess with ``NPY_DISABLE_CPU_FEATURES="AVX512_ICL X86_V4"`` (numpy's AVX2 sort: on
  some machines its AVX-512 sort is several times slower), so both ratios come from one run.

Timing: CPU time of the process (``time.process_time``; single-threaded work, so on a shared
machine this leaves out the time other processes hold the core).  The three are interleaved and
repeated (``--repeat``; default 5 for N <= 1e6, 3 up to 5e6, else 1) and the best total of each is
reported - other load can only add time.  All totals are kept in the JSON.

Memory: for each round, the peak resident set size (``VmHWM``) during the engine call
above the resident size just before it, after returning freed heap pages to the OS (glibc
``malloc_trim``) and resetting the peak through ``/proc/self/clear_refs`` (Linux); the
maximum over rounds is reported.  That is everything one ``fix_round`` call allocates on
top of its inputs (its outputs and temporaries), as the OS saw it.  Timings include the
tolerance computation and the engine call, not this bookkeeping.  Each N runs in a fresh
subprocess so peaks do not leak between sizes.

The Markdown ends with an estimate for a 7e9-weight model fixed on 8 ranks (FSDP2, each rank
fixing its shards, :mod:`pwfn.core.sharding`), from the per-weight time and memory measured at the
largest N.

Usage::

    python benchmarks/engine_scaling.py --threads 1      # 1e5, 1e6, 5e6, 2.5e7
    python benchmarks/engine_scaling.py --threads 1 --sizes 1e5,1e6,5e6,2.5e7,1e8   # + 1e8 (~4 GB)
    python benchmarks/engine_scaling.py --quick          # 1e5, 1e6
    python benchmarks/engine_scaling.py --dry            # tiny smoke test (about a second)
    python benchmarks/engine_scaling.py --sizes 1e6,5e6 --out results.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # the package, and _bench when loaded by path from a test
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from bayes import power_of_two_sigma  # noqa: E402
from pwfn.core.engine import EngineCache, EngineConfig, fix_round  # noqa: E402
from pwfn.core.schedules import pwfn_schedule, tolerance_for_round, wfn_schedule  # noqa: E402

SIGMA_FLOOR = 2.0**-30


def _clock() -> float:
    """CPU seconds of this process: the engine and the sort floor are single-threaded (``--threads 1``),
    and on a shared machine wall time also counts the time other processes hold the core."""
    return time.process_time()


def entropy_stats(values: torch.Tensor) -> dict:
    """Unique values and Shannon entropy (bits), with and without the zero value."""
    uniq, counts = torch.unique(values, return_counts=True)
    out = {}
    for name, keep in (("with_zero", torch.ones_like(uniq, dtype=torch.bool)),
                       ("without_zero", uniq != 0)):
        c = counts[keep].double()
        p = c / c.sum() if c.numel() else c
        h = float(-(p * torch.log2(p)).sum()) if c.numel() else 0.0
        out[f"unique_{name}"] = int(keep.sum())
        out[f"entropy_bits_{name}"] = round(h, 4)
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS counts live data only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_schedule(method: str, w: torch.Tensor, sigma: torch.Tensor, device: str,
                 measure_memory: bool = True) -> dict:
    """One full 10-round schedule; returns timings, memory and codebook statistics."""
    if method == "pwfn":
        sched = pwfn_schedule(k=1.0)
        cfg = EngineConfig(signed_terms=False, sigma_update="std_mu")
    else:
        sched = wfn_schedule(0.01)
        cfg = EngineConfig(signed_terms=True)
    values = w.to(device)
    sig = sigma.to(device) if method == "pwfn" else None
    fixed = torch.zeros_like(values, dtype=torch.bool)
    cache = EngineCache()
    rounds = []
    total = 0.0
    peak_kb = 0
    peak_ok = False
    for t, p in enumerate(sched.fractions):
        tr = _clock()
        tol = tolerance_for_round(sched, t, values=values, sigma=sig)
        dt = _clock() - tr
        # memory of the engine call: everything above its inputs (values, tol, fixed, sigma)
        if measure_memory:
            peak_ok = _reset_peak()
            rss0 = _status_kb("VmRSS")
        tr = _clock()
        res = fix_round(values, tol, fixed, p, sigma=sig, config=cfg, cache=cache)
        if device == "cuda":
            torch.cuda.synchronize()
        dt += _clock() - tr
        total += dt
        if peak_ok:
            peak_kb = max(peak_kb, _status_kb("VmHWM") - rss0)
        s = res.summary
        rounds.append({
            "fraction": p, "seconds": round(dt, 4),
            "engine_seconds": round(s["seconds"], 4), "newly_fixed": s["newly_fixed"],
            "picks": len(s["picks"]), "levels": s["levels"], "final_order": s["final_order"],
            "final_multiplier": s["final_multiplier"], "fallback": s["fallback"],
        })
        values, fixed, sig = res.values, res.fixed, res.sigma
        del res, tol
    peak_kb = peak_kb if peak_ok else None
    n = values.numel()
    out = {
        "total_seconds": round(total, 4),
        "round_seconds": [r["seconds"] for r in rounds],
        "rounds": rounds,
        "peak_extra_bytes": None if peak_kb is None else peak_kb * 1024,
        "peak_extra_bytes_per_weight": None if peak_kb is None else round(peak_kb * 1024 / n, 2),
        "all_fixed": bool(fixed.all()),
    }
    out.update(entropy_stats(values.cpu()))
    return out


def sort_floor(n: int, seed: int, passes: int = 10) -> float:
    """Seconds for ``passes`` np.sort calls over n float32 values (the floor we compare to)."""
    x = np.random.default_rng(seed).laplace(0.0, 0.03 / math.sqrt(2), n).astype(np.float32)
    np.sort(x[: min(n, 1000)])  # warm-up
    t = _clock()
    for _ in range(passes):
        np.sort(x)
    return _clock() - t


AVX2_ENV = {"NPY_DISABLE_CPU_FEATURES": "AVX512_ICL X86_V4"}
#: each size's process: glibc's mmap threshold held at 4 MiB (by default it rises with every freed
#: block up to 32 MiB, keeping freed blocks of a few MiB in the heap, so the peaks of sizes up to
#: ~5e6 depend on the order of earlier frees); chunk-sized temporaries stay in the heap, and blocks
#: of 25M+ weights are mmapped either way
CHILD_ENV = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


def sort_floor_avx2(n: int, seed: int) -> float | None:
    """:func:`sort_floor` in a subprocess whose numpy may not use its AVX-512 sort."""
    import os

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_sort", str(n), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **AVX2_ENV})
    if proc.returncode != 0:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def one_size(n: int, device: str, seed: int, repeats: int, warm_up: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    w = (-(0.03 / math.sqrt(2)) * torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    del u
    sigma = power_of_two_sigma(w)  # the paper's per-tensor rule, as bayes applies it
    # warm-up on a tiny problem: loads code paths and allocator pools, so the memory
    # figure below is data, not one-off page faults of library code
    for method in ("pwfn", "wfn") if warm_up else ():
        run_schedule(method, w[:4096].clone(), sigma[:4096].clone(), device)
    res = {"n": n, "weight_std": round(float(w.std()), 5), "max_abs": float(w.abs().max()),
           "repeats": repeats}
    floors, floors_avx2 = [], []
    for r in range(repeats):  # interleaved, best of `repeats` (other load only adds time)
        floors.append(sort_floor(n, seed))
        floors_avx2.append(sort_floor_avx2(n, seed))
        for method in ("pwfn", "wfn"):
            out = run_schedule(method, w, sigma, device, measure_memory=(r == 0))
            if r == 0:
                res[method] = out
                res[method]["all_totals"] = []
            else:
                for key in ("peak_extra_bytes", "peak_extra_bytes_per_weight"):
                    out[key] = res[method][key]
                if out["total_seconds"] < res[method]["total_seconds"]:
                    out["all_totals"] = res[method]["all_totals"]
                    res[method] = out
            res[method]["all_totals"].append(out["total_seconds"])
    res["sort_floor_seconds"] = round(min(floors), 4)
    res["sort_floor_all"] = [round(f, 4) for f in floors]
    avx2 = [f for f in floors_avx2 if f is not None]
    res["sort_floor_avx2_seconds"] = round(min(avx2), 4) if avx2 else None
    for method in ("pwfn", "wfn"):
        res[method]["ratio_to_sort_floor"] = round(
            res[method]["total_seconds"] / res["sort_floor_seconds"], 3)
        res[method]["ratio_to_sort_floor_avx2"] = (
            round(res[method]["total_seconds"] / res["sort_floor_avx2_seconds"], 3) if avx2 else None)
    return res


def estimate(row: dict, weights: float = 7e9, ranks: int = 8) -> dict:
    """A ``weights``-weight model fixed on ``ranks`` ranks, from one measured size's per-weight figures.

    Each rank fixes its 1/ranks share of the vector with the same per-weight work as one process
    (the reductions between ranks move a few histograms of at most 65,536 counts per level), so
    its time and memory scale from the measured ones; its inputs are values, tolerance and sigma
    (4 bytes each) and the fixed mask (1 byte) of its share.
    """
    share = weights / ranks
    out = {"weights": weights, "ranks": ranks, "weights_per_rank": share, "from_n": row["n"]}
    for method in ("pwfn", "wfn"):
        r = row[method]
        per_w = r["peak_extra_bytes_per_weight"]
        inputs = 13 if method == "pwfn" else 9  # WFN has no sigma
        out[method] = {
            "engine_extra_bytes_per_weight": per_w,
            "engine_extra_gb_per_rank": None if per_w is None else round(per_w * share / 1e9, 2),
            "inputs_gb_per_rank": round(inputs * share / 1e9, 2),
            "schedule_seconds_per_rank": round(r["total_seconds"] / row["n"] * share, 1),
            "single_process_engine_extra_gb": None if per_w is None else round(per_w * weights / 1e9, 1),
        }
    return out


def markdown(doc: dict) -> str:
    """A small table of the results, with the machine and the exact command."""
    m = doc["machine"]
    lines = [
        "# Fixing engine scaling",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count')} logical CPUs, torch "
        f"{m.get('torch')} with {m.get('torch_threads')} intra-op thread(s), numpy "
        f"{m.get('numpy')}, Python {m.get('python')}; load average at start "
        f"{m.get('loadavg_at_start')} (shared machine).  ",
        f"Device: {doc['device']}.  Memory: {doc['memory_measure']}.  ",
        "Times: CPU seconds, best of the repeats (interleaved with the sort floor); sort floor = 10 "
        "`np.sort` passes over N float32 (AVX2 floor: numpy with `NPY_DISABLE_CPU_FEATURES=\"AVX512_ICL X86_V4\"`).  Compare ratios only between runs on equally quiet "
        "machines: under load from other processes the vectorised sort slows down far more "
        "than the engine does.",
        "",
        "| N | PWFN s | WFN s | sort floor s | PWFN / floor | WFN / floor | AVX2 sort floor s "
        "| PWFN / AVX2 floor | WFN / AVX2 floor | PWFN peak B/w "
        "| WFN peak B/w | PWFN unique (w/o 0) | PWFN entropy bits (w/o 0) | WFN unique (w/o 0) "
        "| WFN entropy bits (w/o 0) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in doc["results"]:
        p, w = r["pwfn"], r["wfn"]
        lines.append(
            f"| {r['n']:,} | {p['total_seconds']:.3f} | {w['total_seconds']:.3f} "
            f"| {r['sort_floor_seconds']:.3f} | {p['ratio_to_sort_floor']:.2f} "
            f"| {w['ratio_to_sort_floor']:.2f} | {f(r.get('sort_floor_avx2_seconds'), '.3f')} "
            f"| {f(p.get('ratio_to_sort_floor_avx2'), '.2f')} | {f(w.get('ratio_to_sort_floor_avx2'), '.2f')} "
            f"| {p['peak_extra_bytes_per_weight']} "
            f"| {w['peak_extra_bytes_per_weight']} "
            f"| {p['unique_with_zero']} ({p['unique_without_zero']}) "
            f"| {p['entropy_bits_with_zero']} ({p['entropy_bits_without_zero']}) "
            f"| {w['unique_with_zero']} ({w['unique_without_zero']}) "
            f"| {w['entropy_bits_with_zero']} ({w['entropy_bits_without_zero']}) |")
    est = doc.get("estimate")
    if est:
        p, w = est["pwfn"], est["wfn"]
        lines += [
            "",
            f"## Estimate: {est['weights']:.0e} weights on {est['ranks']} ranks",
            "",
            f"From the figures measured at N = {est['from_n']:,} (per weight: time, and peak memory beyond the "
            f"inputs), scaled to each rank's {est['weights_per_rank']:.3g} weights (FSDP2: every rank fixes "
            "its own shards, `pwfn.core.sharding`; the reductions between ranks move a few histograms of at most "
            "65,536 counts per greedy level, not weights). Not measured at that size.",
            "",
            "| method | engine extra B/weight | engine extra GB per rank | inputs GB per rank (values, "
            "tolerance, sigma, mask) | schedule s per rank | one process, engine extra GB |",
            "|---|---:|---:|---:|---:|---:|",
            f"| PWFN | {p['engine_extra_bytes_per_weight']} | {p['engine_extra_gb_per_rank']} "
            f"| {p['inputs_gb_per_rank']} | {p['schedule_seconds_per_rank']} | {p['single_process_engine_extra_gb']} |",
            f"| WFN | {w['engine_extra_bytes_per_weight']} | {w['engine_extra_gb_per_rank']} "
            f"| {w['inputs_gb_per_rank']} | {w['schedule_seconds_per_rank']} | {w['single_process_engine_extra_gb']} |",
        ]
    return "\n".join(lines) + "\n"


def _parse_sizes(text: str) -> list:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_parse_sizes, default=None,
                    help="comma-separated N, e.g. 1e5,1e6 (default 1e5,1e6,5e6,2.5e7)")
    ap.add_argument("--quick", action="store_true", help="small sizes only (1e5, 1e6)")
    ap.add_argument("--dry", action="store_true",
                    help="tiny smoke run for CI (N = 1e4, one repeat, no warm-up, in-process)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=0,
                    help="timing repeats, best one reported (0: 5 for N <= 1e6, 3 up to 5e6, "
                         "else 1; 1 with --dry)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON here too, and a Markdown table next to it (.md)")
    ap.add_argument("--inline", action="store_true",
                    help="run sizes in this process (default: one subprocess per size)")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_sort", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    def repeats(n: int) -> int:
        if args.repeat > 0:
            return args.repeat
        if args.dry:
            return 1
        return 5 if n <= 1_000_000 else 3 if n <= 5_000_000 else 1

    if args._sort is not None:
        print(sort_floor(args._sort, args.seed))
        return 0
    if args._child is not None:
        print(json.dumps(one_size(args._child, args.device, args.seed, repeats(args._child))))
        return 0
    sizes = args.sizes or ([10_000] if args.dry else [100_000, 1_000_000] if args.quick
                           else [100_000, 1_000_000, 5_000_000, 25_000_000])
    results = []
    for n in sizes:
        if args.inline or args.dry:
            r = one_size(n, args.device, args.seed, repeats(n), warm_up=not args.dry)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(n),
                   "--device", args.device, "--threads", str(args.threads),
                   "--seed", str(args.seed), "--repeat", str(repeats(n))]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=CHILD_ENV)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"N={n:>10,d}  pwfn {r['pwfn']['total_seconds']:8.3f}s  "
              f"wfn {r['wfn']['total_seconds']:8.3f}s  sort floor "
              f"{r['sort_floor_seconds']:7.3f}s  ratio {r['pwfn']['ratio_to_sort_floor']:.2f}"
              f"/{r['wfn']['ratio_to_sort_floor']:.2f}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/engine_scaling.py"]
                       + (sys.argv[1:] if argv is None else list(argv)))
    doc = {"benchmark": "engine_scaling", "command": command,
           "machine": machine(), "device": args.device, "results": results,
           "estimate": estimate(max(results, key=lambda r: r["n"])),
           "memory_measure": ("max over rounds of VmHWM - VmRSS around one fix_round call, after "
                              "malloc_trim(0) and clear_refs=5, glibc mmap threshold held at 4 MiB "
                              "(MALLOC_MMAP_THRESHOLD_); bytes (and per weight)")}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
