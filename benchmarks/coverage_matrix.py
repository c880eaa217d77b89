"""Coverage of real architectures, and the cost of sampling every weight of a transformer.

Part 1 (the matrix): each architecture of ``tests/test_coverage_matrix.py`` (built in code,
random weights, tiny dims; Hugging Face models from tiny configs) is compressed with PWFN and
WFN on a generated 3-class task, then exported. Per architecture and method: share of the
parameters quantised (default settings, then the whole model with ``quantise_norms``),
unique values, entropy, packed bytes against fp32.

Part 2 (the cost): a training step of a small ``nn.TransformerEncoder`` classifier (d=64,
2 layers, 4 heads, batch 32 x 16 tokens) with every weight Gaussian in ``sample`` mode, against
the same deterministic step; interleaved repeats, median ratio. Target: <= 1.3x.

    python benchmarks/coverage_matrix.py            # both parts
    python benchmarks/coverage_matrix.py --dry      # seconds: two architectures, few steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import _bench as B
import torch
from torch import nn

import bayes

sys.path.insert(0, str(B.ROOT / "tests"))


def matrix(names, fast: dict, out_dir: Path) -> list[dict]:
    import test_coverage_matrix as T  # the architectures the tests check

    from pwfn import compress
    from pwfn.export import export_model

    rows = []
    for name in names:
        for method in ("pwfn", "wfn"):
            model, inputs = T.build(name)
            train, val = T.loaders(inputs, n=96)
            default = {**fast, "quantise": {"strict": False},
                       "pwfn": {**fast["pwfn"], "quantise_norms": False},
                       "wfn": {**fast["wfn"], "quantise_norms": True}}
            t0 = time.perf_counter()
            res = compress(copy.deepcopy(model), train, val, method=method, config=default)
            seconds = time.perf_counter() - t0
            full = compress(copy.deepcopy(model), train, val, method=method, config=fast)
            exp = export_model(res.point_model, res.report["quantised_tensors"], out_dir / f"{name}-{method}",
                               method=method)
            size = exp["size"]
            final = res.report["final"]
            rows.append({
                "architecture": name, "method": method,
                "parameters": res.report["coverage"]["parameters"],
                "share_default": res.report["coverage"]["share"],
                "share_with_norms": full.report["coverage"]["share"],
                "unique": final.get("unique"), "entropy": final.get("entropy"),
                "fp32_bytes": size["total"]["fp32_bytes"], "packed_bytes": size["total"]["packed_bytes"],
                "ratio": size["ratio_fp32_to_packed"], "top1": final["test"]["top1"], "seconds": seconds,
            })
            print(f"{name:28s} {method}: share {rows[-1]['share_default']:.3f} / {rows[-1]['share_with_norms']:.3f}"
                  f", {final.get('unique')} values, {final.get('entropy'):.2f} bits, x{size['ratio_fp32_to_packed']:.2f}",
                  flush=True)
    return rows


class _Clf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)).mean(1))


def step_cost(repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    det = _Clf()
    bnn = bayes.bayesianize(det, sigma_init=1e-3, mode="sample")
    ids = torch.randint(0, 100, (32, 16))
    y = torch.randint(0, 10, (32,))

    def run(model, n, reg=True):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(ids), y)
            if model is bnn and reg:
                loss = loss + bayes.sigma_regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / n

    run(det, 3)
    run(bnn, 3)
    ratios, plain, td, tb, tn = [], [], [], [], []
    for _ in range(repeats):
        a = run(det, steps)
        b = run(bnn, steps)
        c = run(bnn, steps, reg=False)
        td.append(a)
        tb.append(b)
        tn.append(c)
        ratios.append(b / a)
        plain.append(c / a)
    return {"deterministic_ms": 1e3 * statistics.median(td), "sample_ms": 1e3 * statistics.median(tb),
            "sample_no_reg_ms": 1e3 * statistics.median(tn), "ratio_no_reg_median": statistics.median(plain),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "target": 1.3,
            "gaussian_tensors": len(bayes.gaussian_parameters(bnn)),
            "parameters": sum(p.numel() for p in det.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="two architectures, a few steps (a smoke run)")
    ap.add_argument("--out", type=Path, default=B.RESULTS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import test_coverage_matrix as T

    names = ["mobilenet_like", "tied_and_shared"] if args.dry else sorted(T.ARCHS)
    fast = {**T.FAST, "pwfn": {**T.FAST["pwfn"], "round_epochs": 1.0},
            "wfn": {**T.FAST["wfn"], "round_epochs": 1.0}}
    import tempfile

    m = B.machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = matrix(names, fast, Path(tmp))
    cost = step_cost(repeats=2 if args.dry else 7, steps=3 if args.dry else 30)
    print(f"sample-mode step: {cost['ratio_no_reg_median']:.2f}x the deterministic step, "
          f"{cost['ratio_median']:.2f}x with the regulariser", flush=True)
    lines = B.header("Coverage of real architectures, and the cost of sampling every weight", "coverage_matrix.py", argv, m)
    lines += ["Share = quantised parameters / all parameters: with the default settings (PWFN keeps norm layers "
              "float as the papers do; WFN quantises them) and with `quantise_norms` on for both (the whole model). "
              "Bytes: whole model (float leftovers and buffers at their real size) in fp32 against the packed "
              "`.pwfn` file. Task: a generated 3-class problem (96 examples), so top-1 is not meaningful here; "
              "the unique values and entropy are what the default PWFN / WFN settings reach on random weights.", ""]
    lines.append(B.md_table(
        ["architecture", "method", "parameters", "share (default)", "share (norms on)", "unique", "entropy bits",
         "fp32 bytes", "packed bytes", "fp32 / packed"],
        [[r["architecture"], r["method"], r["parameters"], r["share_default"], r["share_with_norms"], r["unique"],
          r["entropy"], r["fp32_bytes"], r["packed_bytes"], r["ratio"]] for r in rows]))
    lines += ["", "## Sample-mode training step, small transformer", "",
              f"{cost['parameters']:,} parameters, {cost['gaussian_tensors']} Gaussian tensors (every weight; norms "
              f"float), batch 32 x 16 tokens, {args.threads} thread(s), interleaved repeats.", "",
              B.md_table(["step", "ms (median)", "x deterministic (median of paired ratios)", "target"],
                         [["deterministic", cost["deterministic_ms"], 1.0, ""],
                          ["sample mode, task loss only", cost["sample_no_reg_ms"], cost["ratio_no_reg_median"], "<= 1.3"],
                          ["sample mode + sigma regulariser (PWFN's step)", cost["sample_ms"], cost["ratio_median"],
                           "<= 1.3"]])]
    if not args.dry:
        B.write_outputs(args.out, "coverage_matrix", {"machine": m, "rows": rows, "step_cost": cost},
                        "\n".join(lines))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
