"""Budget mode (issue 16): at most K values, H bits, M values per tensor."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from pwfn.core import metrics as M
from pwfn.core.engine import EngineConfig, fix_round
from pwfn.errors import ConfigError
from pwfn.model.config import load_config
from pwfn.training.budget import choose_allowed, merge_to_budget

HAVE_ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
HAVE_TFLM = importlib.util.find_spec("tflite_micro") is not None


def weights(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    w[:20] *= 12  # a few large weights, as trained networks have
    return w


@pytest.mark.parametrize("k", [2, 5, 16])
def test_allowed_set_has_at_most_k_representable_values_with_zero(k: int) -> None:
    w = weights()
    tol = w.abs() * 0.05 + 1e-4
    allowed = choose_allowed(w, tol, k, b=7, max_order=4)
    assert 0 < allowed.numel() <= k and bool((allowed == 0).any())
    assert bool((M.term_counts(allowed, b=7) >= 0).all()) and int(M.term_counts(allowed, b=7).max()) <= 4
    assert torch.equal(allowed, choose_allowed(w, tol, k, b=7, max_order=4))  # deterministic
    if k >= 5:  # the large weights keep a value of their own
        assert float(allowed.abs().max()) > 0.3


def test_engine_fixes_only_to_allowed_values() -> None:
    w = weights().float()
    tol = (w.abs() * 0.05 + 1e-4).float()
    allowed = tuple(float(v) for v in choose_allowed(w, tol, 6).tolist())
    cfg = EngineConfig(allowed=allowed)
    fixed = torch.zeros_like(w, dtype=torch.bool)
    for frac in (0.5, 0.9, 1.0):
        res = fix_round(w, tol, fixed, frac, config=cfg)
        w, fixed = res.values, res.fixed
    assert bool(fixed.all())
    assert set(torch.unique(w).tolist()) <= set(allowed) | {0.0}
    with pytest.raises(ConfigError):
        EngineConfig(allowed=(0.5, float("nan")))


def test_merging_meets_every_limit_with_values_already_present() -> None:
    g = torch.Generator().manual_seed(1)
    cb = torch.tensor([-0.5, -0.25, -0.125, -0.0625, 0.0, 0.0625, 0.125, 0.25, 0.5, 0.75], dtype=torch.float64)
    values = cb[torch.randint(0, cb.numel(), (3000,), generator=g)]
    fixed = torch.rand(3000, generator=g) < 0.9
    values[~fixed] = 0.3  # unfixed weights are never counted or moved
    slots = [("a", 0, 1000), ("b", 1000, 2000)]
    out, moved = merge_to_budget(values, fixed, slots, max_values=6, max_entropy_bits=2.0, max_values_per_tensor=4)
    assert moved > 0
    assert torch.equal(out[~fixed], values[~fixed])
    fv = out[fixed]
    assert M.unique_count(fv) <= 6 and M.entropy_bits(fv) <= 2.0
    for _, off, n in slots:
        seg = out[off:off + n][fixed[off:off + n]]
        assert M.unique_count(seg) <= 4
    assert set(fv.tolist()) <= set(cb.tolist())
    assert bool((fv == 0).any())  # zero is never merged away


def test_budget_config_is_validated() -> None:
    assert load_config(None, ["budget.max_values=16"]).budget.max_values == 16
    for bad in ("budget.max_values=1", "budget.max_entropy_bits=0", "budget.max_values_per_tensor=1",
                "budget.max_value=3"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


SMALL = ["progress=false", "baseline.epochs=3", "data.train_subset=600", "data.eval_subset=200",
         "pwfn.fractions=[0.5, 0.9, 1.0]", "pwfn.round_epochs=0.3", "pwfn.first_round_epochs=0.1",
         "pwfn.mc_samples=1", "contract.enforce=false"]  # budget mechanics; tests/test_contract.py checks both


@pytest.mark.slow
def test_budget_run_meets_its_limits_and_reports_them(tmp_path: Path, capsys) -> None:
    from pwfn.cli import main
    from pwfn.run.experiment import run_method

    cfg = load_config("configs/digits_mlp.yaml", [f"out_dir={tmp_path}", *SMALL, "budget.max_values=8",
                                                  "budget.max_values_per_tensor=6", "budget.max_entropy_bits=2.5"])
    report = run_method(cfg)
    b = report["budget"]
    assert b["met"] and b["max_values"]["achieved"] <= 8 and b["max_values_per_tensor"]["achieved"] <= 6
    assert b["max_entropy_bits"]["achieved"] <= 2.5 + 1e-9
    assert report["final"]["unique"] == b["max_values"]["achieved"]
    assert set(report["final"]["codebook"]) <= set(b["allowed_values"])
    assert all(v >= 0 for v in M.term_counts(torch.tensor(report["final"]["codebook"]), b=7).tolist())
    assert report["final"]["test"]["top1"] > 50.0
    run = tmp_path / "digits_mlp" / "pwfn"
    assert json.loads((run / "report.json").read_text())["budget"]["met"]
    # a different budget is a different run: resuming under it is refused
    changed = load_config("configs/digits_mlp.yaml", [f"out_dir={tmp_path}", *SMALL, "budget.max_values=12",
                                                      "budget.max_values_per_tensor=6",
                                                      "budget.max_entropy_bits=2.5"])
    with pytest.raises(ConfigError, match="budget.max_values"):
        run_method(changed)
    if HAVE_ONNX and HAVE_TFLM:
        assert main(["export", str(run), "--to", "onnx,tflm"]) == 0
        out = capsys.readouterr().out
        assert "| onnx | model.onnx |" in out and "| tflm | model.tflite |" in out
        summary = json.loads((run / "export" / "targets.json").read_text())
        assert summary["targets"]["tflm"]["not_compressed"] == {}
        assert summary["targets"]["onnx"]["weights_bit_identical"]
        # the budget's per-tensor limit (6 values) gives small tables: at most 4 index bits
        assert all(t["bits"] <= 4 for t in summary["targets"]["onnx"]["tensors"].values())
        assert math.isfinite(summary["targets"]["onnx"]["vs_fp32"])
