"""Every benchmark script runs end to end in its tiny ``--quick --dry`` mode and writes its outputs.

Outputs go to pytest's tmp_path, never into benchmarks/results. The quantisation baselines the
compression benchmark compares against get a few direct checks too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--dry", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_compression_quality_dry(tmp_path):
    out = tmp_path / "out"
    _run("compression_quality.py", "--out", str(out), "--work", str(tmp_path / "work"))
    doc = json.loads((out / "compression_quality.json").read_text())
    rows = {r["method"]: r for r in doc["datasets"][0]["rows"]}
    assert {"float", "uniform 4-bit PTQ", "uniform 3-bit QAT", "APoT 4-bit PTQ"} <= set(rows)
    assert any(m.startswith("k-means") for m in rows) and any(m.startswith("PWFN") for m in rows)
    kmeans = next(r for m, r in rows.items() if m.startswith("k-means"))
    pwfn = next(r for m, r in rows.items() if m.startswith("PWFN"))
    assert kmeans["unique"] <= pwfn["unique"]
    assert rows["uniform 3-bit PTQ"]["unique"] <= 7 * rows["uniform 3-bit PTQ"]["quantised_tensors"]
    assert all(r["packed_bytes"] > 0 and r["top1"] >= 0 for r in rows.values())
    assert "cifar10_resnet20" not in [d["key"] for d in doc["datasets"]]
    md = (out / "compression_quality.md").read_text()
    assert "| method |" in md and "Command:" in md and "Machine:" in md
    assert (out / "compression_quality.png").is_file() == HAVE_MPL
    if HAVE_MPL:  # the plot can be redrawn from the JSON alone
        (out / "compression_quality.png").unlink()
        proc = subprocess.run([sys.executable, str(BENCH / "compression_quality.py"), "--replot", "--out", str(out)],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert (out / "compression_quality.png").is_file()
    assert not (BENCH / "results" / "runs").exists()


@pytest.mark.slow
def test_bayes_layer_cost_dry(tmp_path):
    _run("bayes_layer_cost.py", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "bayes_layer_cost.json").read_text())
    names = [r["variant"] for r in doc["models"][0]["rows"]]
    assert names[0] == "deterministic" and "bayes sample (ours)" in names and "bayes local (ours)" in names
    assert all(r["median_step_s"] > 0 for r in doc["models"][0]["rows"])
    assert "Target" in (tmp_path / "bayes_layer_cost.md").read_text()
    assert doc["models"][0]["verdict"]["vs_fastest_library"] in (None, "slower", "faster", "tie")
    # the Markdown can be re-rendered from the JSON alone, keeping command and date
    before = (tmp_path / "bayes_layer_cost.md").read_text()
    proc = subprocess.run([sys.executable, str(BENCH / "bayes_layer_cost.py"), "--rerender", "--out", str(tmp_path)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bayes_layer_cost.md").read_text() == before


@pytest.mark.slow
def test_noise_robustness_dry(tmp_path):
    _run("noise_robustness.py", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"))
    doc = json.loads((tmp_path / "out" / "noise_robustness.json").read_text())
    labels = [r["model"] for r in doc["datasets"][0]["rows"]]
    assert labels[0] == "float" and any(x.startswith("PWFN") for x in labels) and any(x.startswith("WFN") for x in labels)
    # the fixed models are reused on a second run instead of being trained again
    _run("noise_robustness.py", "--out", str(tmp_path / "out2"), "--runs", str(tmp_path / "runs"))
    doc2 = json.loads((tmp_path / "out2" / "noise_robustness.json").read_text())
    assert all(r["reused"] for r in doc2["datasets"][0]["rows"])
    assert doc2["datasets"][0]["rows"][2]["clean_top1"] == doc["datasets"][0]["rows"][2]["clean_top1"]


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
def test_plot_engine_scaling_dry(tmp_path):
    _run("plot_engine_scaling.py", "--out", str(tmp_path))
    assert (tmp_path / "engine_scaling.png").stat().st_size > 1000
    # a real engine_scaling.py document (same schema) plots too
    doc = {"device": "cpu", "machine": {"cpu": "x"}, "results": [
        {"n": 1000, "sort_floor_seconds": 0.001, "pwfn": {"total_seconds": 0.01}, "wfn": {"total_seconds": 0.01}},
        {"n": 10000, "sort_floor_seconds": 0.01, "pwfn": {"total_seconds": 0.1, "peak_extra_bytes_per_weight": 40},
         "wfn": {"total_seconds": 0.09}}]}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(doc))
    _run("plot_engine_scaling.py", "--input", str(src), "--out", str(tmp_path / "b"))
    assert (tmp_path / "b" / "engine_scaling.png").is_file()


# -------------------------------------------------------------------------------- baselines


@pytest.fixture()
def baselines():
    sys.path.insert(0, str(BENCH))
    try:
        import baselines as mod

        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_uniform_and_apot_levels(baselines):
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for bits, n in ((4, 15), (3, 7)):
        q = baselines.UniformQuantizer(bits)
        s = q.best_scale(w)
        qw = q.quantise(w, s)
        assert torch.unique(qw).numel() <= n
        steps = torch.unique(qw.abs()) / (s / (2 ** (bits - 1) - 1))  # integer multiples of the step
        assert torch.allclose(steps, steps.round(), atol=1e-5) and float(steps.max()) <= 2 ** (bits - 1) - 1 + 1e-5
        # MSE-chosen clipping beats plain max-abs scaling
        mx = float(w.abs().max())
        assert ((qw - w) ** 2).sum() <= ((q.quantise(w, mx) - w) ** 2).sum() + 1e-9
    mags = baselines.apot_magnitudes()
    assert mags.numel() == 8 and mags[0] == 0 and mags[-1] == 1
    qa = baselines.APoTQuantizer().quantise(w)
    assert torch.unique(qa).numel() <= 15


def test_kmeans_1d_is_a_local_optimum_and_not_worse_than_quantiles(baselines):
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=gen) * 0.05, torch.randn(500, generator=gen) * 0.3])
    centres, assign = baselines.kmeans_1d(x, 12)
    assert centres.numel() == 12 and torch.all(centres[1:] > centres[:-1])
    # every point sits with its nearest centre, and every centre is the mean of its points
    nearest = (x.double()[:, None] - centres[None, :]).abs().argmin(1)
    assert torch.equal(nearest, assign)
    for j in range(12):
        pts = x.double()[assign == j]
        if pts.numel():
            assert abs(float(pts.mean()) - float(centres[j])) < 1e-9
    err = float(((centres[assign] - x.double()) ** 2).sum())
    q = torch.quantile(x.double(), (torch.arange(12, dtype=torch.float64) + 0.5) / 12)
    err_q = float(((q[(x.double()[:, None] - q[None, :]).abs().argmin(1)] - x.double()) ** 2).sum())
    assert err <= err_q
    # fewer distinct values than K: the values themselves
    c, a = baselines.kmeans_1d(torch.tensor([0.5, 0.5, -1.0]), 5)
    assert c.tolist() == [-1.0, 0.5] and a.tolist() == [1, 1, 0]


def test_kmeans_share_and_qat_keep_the_shape_of_the_model(baselines):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    shared, names, centres = baselines.kmeans_share(model, 5)
    vals = torch.cat([p.detach().reshape(-1) for _, p in baselines.quantisable(shared)])
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.unique(vals).numel() <= 5
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    q = baselines.UniformQuantizer(3)
    tuned, names, stats = baselines.qat_finetune(model, q, loader, 2, lr=1e-2)
    assert stats["steps"] == 8
    for (n, p) in baselines.quantisable(tuned):
        assert torch.unique(p).numel() <= 7, n
    # the original is untouched
    assert torch.unique(model[0].weight).numel() == model[0].weight.numel()


@pytest.mark.slow
def test_pipeline_targets_dry(tmp_path):
    out = tmp_path / "targets.md"
    _run("pipeline_targets.py", "--seeds", "0", "1", "--out", str(out))
    text = out.read_text()
    assert "2 seeds (0, 1)" in text and "pwfn (paper lam 2^-11)" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["seed"] for r in data} == {0, 1}
    assert all(set(r["checks"]) == {"wfn_lossless", "pwfn_lossless", "pwfn_unique_le_wfn", "pwfn_entropy_le_wfn"}
               for r in data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_gpu_suite_skips_cleanly_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--out", str(tmp_path)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device here - skipped" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


@pytest.mark.slow
def test_gpu_suite_dry_run_on_cpu(tmp_path):
    """Every part of the prepared GPU benchmark at tiny sizes on the CPU (DDP with gloo)."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--dry-run",
                           "--out", str(tmp_path)], cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert {r["method"] for r in doc["engine"]["rows"]} == {"pwfn", "wfn"}
    assert all(r["all_fixed"] for r in doc["engine"]["rows"])
    names = [m["model"] for m in doc["step"]["models"]]
    assert names == ["resnet18-sized", "vit-s16-sized"]
    for m in doc["step"]["models"]:
        assert set(m["results"]) == {"eager", "compiled"}
        assert set(m["results"]["compiled"]) == {"float", "sample", "sample + sigma reg"}
    assert doc["ddp"]["world"] == 2 and doc["ddp"]["ranks_agree"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## Engine" in md and "## DDP" in md
