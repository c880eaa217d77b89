"""Non-classification tasks end to end: the task metric of float / WFN / PWFN.

The models and data of ``tests/test_tasks_e2e.py`` (generated, nothing downloaded): a
regression MLP (MSE on y = (sin x0 + x1^2 / 2) / 2), a sigmoid model trained with BCE against
Gaussian soft targets, and a causal GRU language model with a per-token loss. Each float model
is trained first, then compressed with ``pwfn.compress(task=...)`` under the default method
settings (3 seeds where cheap); the table gives the task metric, unique values and entropy.

    python benchmarks/task_types.py          # 3 seeds
    python benchmarks/task_types.py --dry    # one seed, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _bench as B
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(B.ROOT / "tests"))


def _eval(task, model, loader):
    from pwfn.training.tasks import evaluate_task, resolve_task

    return evaluate_task(model, loader, "cpu", resolve_task(task))


def _bce():
    import test_tasks_e2e as T

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    soft = torch.exp(-(x[:, :1] - torch.linspace(-2, 2, 4)) ** 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4), nn.Sigmoid())
    train = DataLoader(TensorDataset(x[:384], soft[:384]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[384:], soft[384:]), batch_size=128)
    return T._fit(model, train, F.binary_cross_entropy, epochs=40), train, val


def _lm():
    import test_tasks_e2e as T

    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 32)
            self.rnn = nn.GRU(32, 32, batch_first=True)
            self.out = nn.Linear(32, 12)

        def forward(self, ids):
            return self.out(self.rnn(self.emb(ids))[0])

    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 12, (256, 1), generator=g)
    steps = torch.randint(1, 3, (256, 1), generator=g)  # sequences counting up by 1 or 2 (mod 12)
    seq = (starts + steps * torch.arange(16)) % 12
    train = DataLoader(TensorDataset(seq[:192], seq[:192]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(seq[192:], seq[192:]), batch_size=64)
    loss = lambda o, t: F.cross_entropy(o[:, :-1].reshape(-1, 12), t[:, 1:].reshape(-1))  # noqa: E731
    return T._fit(LM(), train, loss, epochs=30), train, val


def _regression():
    import test_tasks_e2e as T

    return T._regression()


CASES = {"regression MLP (mse, lower is better)": ("regression", _regression),
         "soft-target BCE, sigmoid outputs (accuracy@0.5, higher is better)": ("bce_probs", _bce),
         "causal GRU LM (bits per token, lower is better)": ("language_model", _lm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(B.RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import pwfn

    seeds = [0] if args.dry else args.seeds
    m = B.machine()
    rows = []
    for label, (task, build) in CASES.items():
        model, train, val = build()
        from pwfn.training.tasks import resolve_task

        primary = resolve_task(task).primary
        rows.append({"case": label, "method": "float", "metric": _eval(task, model, val)[primary]})
        for method in ("wfn", "pwfn"):
            vals, uniq, ent, secs, failures = [], [], [], [], []
            for seed in seeds:
                t0 = time.perf_counter()
                try:  # under the task's default accuracy contract: it holds, or the run fails saying so
                    res = pwfn.compress(model, train, val, method=method, task=task,
                                        config={"progress": False, "seed": seed, "pwfn": {"mc_samples": 1}})
                except pwfn.ContractError as exc:
                    secs.append(time.perf_counter() - t0)
                    failures.append(str(exc).split(". ")[0][:160])
                    continue
                secs.append(time.perf_counter() - t0)
                f = res.report["final"]
                vals.append(f["test"][primary])
                uniq.append(f["unique"])
                ent.append(f["entropy"])
            row = {"case": label, "method": method, "held": f"{len(vals)}/{len(seeds)}",
                   "seconds": statistics.mean(secs), "seeds": seeds, "failures": failures}
            if vals:
                row.update(metric=statistics.mean(vals), metric_min=min(vals), metric_max=max(vals),
                           unique=statistics.mean(uniq), entropy=statistics.mean(ent))
            rows.append(row)
            print(label, method, rows[-1], flush=True)
    lines = B.header("Non-classification tasks: float, WFN and PWFN", "task_types.py", argv, m)
    lines += [f"Default method settings (`pwfn.compress(..., task=...)`), training seeds {seeds}: mean "
              "(min-max) of the task metric on the validation split over the seeds that kept the task's default "
              "accuracy contract (0.5 points of an accuracy, 2 % of an MSE, 1 % of bits per token, against the float model; "
              "`contract held` counts them); the metric is the task's primary one (its direction in the case's name). "
              "Unique values and entropy are the means over the seeds. The seed sets PWFN's weight noise; the "
              "training loader's own shuffling generator runs on from one run to the next, so every run also "
              "sees another batch order (which is why WFN's runs differ slightly).", ""]
    lines.append(B.md_table(["case", "method", "contract held", "metric", "min-max", "unique", "entropy bits",
                             "time s"], [
        [r["case"], r["method"], r.get("held", "-"), f"{r['metric']:.4g}" if "metric" in r else "-",
         f"{r['metric_min']:.4g}-{r['metric_max']:.4g}" if "metric_min" in r else "-",
         r.get("unique"), r.get("entropy"), r.get("seconds")] for r in rows]))
    failed = [(r["case"], r["method"], f) for r in rows for f in r.get("failures", [])]
    if failed:
        lines += ["", "Runs that could not keep the contract (ContractError, the round it names):", ""]
        lines += [f"- {case}, {method}: {what}" for case, method, what in failed]
    text = "\n".join(lines)
    if args.dry:
        print(text)
    else:
        from pathlib import Path

        B.write_outputs(Path(args.out), "task_types", {"machine": m, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
