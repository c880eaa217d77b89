"""Export targets (issue 16): shift-add reference, codebook ONNX, TFLite-Micro, hls4ml, CLI --to."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pwfn.core.centres import candidate_centres
from pwfn.errors import PwfnError
from pwfn.export.targets.shiftadd import FixedPoint, ShiftAddError, ShiftAddNet, calibrate
from pwfn.model.zoo import create_model

HAVE_ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
HAVE_TFLM = importlib.util.find_spec("tflite_micro") is not None
HAVE_HLS = importlib.util.find_spec("hls4ml") is not None and shutil.which("g++") is not None
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="the 'onnx' extra (onnx, onnxruntime) is not installed")
needs_tflm = pytest.mark.skipif(not HAVE_TFLM, reason="the 'tflm' extra (tflite-micro) is not installed")
needs_hls = pytest.mark.skipif(not HAVE_HLS, reason="the 'hls4ml' extra or g++ (hls4ml's C simulation) is missing")


def snapped(model: nn.Module, order: int = 2, signed: bool = False, seed: int = 0,
            max_abs: float = 0.5) -> nn.Module:
    """``model`` with every parameter on a power-of-two codebook (nearest value), like a fixed run."""
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.uniform_(p, -0.4, 0.4) if p.dim() == 1 else None
    cb = candidate_centres(max_abs, order, b=7, signed_terms=signed).values.double()
    with torch.no_grad():
        for p in model.parameters():
            idx = (p.double().reshape(-1, 1) - cb).abs().argmin(1)
            p.copy_(cb[idx].reshape(p.shape).to(p.dtype))
    return model.eval()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return snapped(create_model("mlp", hidden=[32, 16]))


def cnn() -> nn.Module:
    torch.manual_seed(2)
    return snapped(create_model("lenet5", in_channels=1, input_size=8))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)) + x
        return self.fc(torch.flatten(self.pool(y), 1))


# -------------------------------------------------------------------------------- shift-add


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("make,shape", [(mlp, (64,)), (cnn, (1, 8, 8)), (lambda: snapped(Residual()), (2, 8, 8))])
def test_shift_add_is_bit_exact_against_multiplies_and_close_to_float(make, shape, signed) -> None:
    model = make()
    if signed:  # WFN codebook: signed terms (7 = 8 - 1 has two terms, not three)
        model = snapped(model, order=2, signed=True)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(3))
    fp = calibrate(model, x, frac_bits=12)
    net = ShiftAddNet(model, b=7, fixed_point=fp, signed_terms=signed)
    xi = fp.quantise(x)
    shifted = net.forward_int(xi, "shift")
    multiplied = net.forward_int(xi, "multiply")
    assert shifted.dtype == torch.int64 and torch.equal(shifted, multiplied)
    with torch.no_grad():
        ref = model(x).double()
    err = float((net(x) - ref).abs().max())
    assert err <= net.error_bound()
    assert err < 1e-2  # 12 fractional bits: a few ulps, not a different function
    counts = net.operation_counts(shape)
    assert counts["total"]["multiplications_left"] == 0
    assert counts["total"]["terms"] >= counts["total"]["macs"] - counts["total"]["zero_weight_macs_skipped"]


def test_shift_add_follows_truncation_exactly() -> None:
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.25]]))
        lin.bias.copy_(torch.tensor([2.0**-7]))
    fp = FixedPoint(frac_bits=2, width=8)
    net = ShiftAddNet(nn.Sequential(lin), b=7, fixed_point=fp)
    # x = (0.75, 0.25) -> 0.375 - 0.0625 + 2^-7 = 0.3203...; floor to 2 fractional bits = 0.25
    assert float(net(torch.tensor([[0.75, 0.25]]))[0, 0]) == 0.25
    # negative values floor towards minus infinity: -0.3203... -> -0.5
    assert float(net(torch.tensor([[-0.75, -0.25]]))[0, 0]) == -0.5


def test_shift_add_refuses_what_it_cannot_do() -> None:
    off = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        off[0].weight.fill_(0.3)  # not a multiple of 2^-7
    with pytest.raises(ShiftAddError, match="powers of two"):
        ShiftAddNet(off)
    with pytest.raises(ShiftAddError, match="Sigmoid"):
        ShiftAddNet(snapped(nn.Sequential(nn.Linear(4, 2), nn.Sigmoid())))
    net = ShiftAddNet(snapped(nn.Sequential(nn.Linear(4, 2))), fixed_point=FixedPoint(4, 6))
    with pytest.raises(ShiftAddError, match="overflows"):
        net(torch.full((1, 4), 100.0))


# -------------------------------------------------------------------------------- ONNX


@needs_onnx
@pytest.mark.parametrize("make,shape", [(mlp, (64,)), (cnn, (1, 8, 8))])
def test_codebook_onnx_is_exact_and_small(make, shape) -> None:
    import onnx

    from pwfn.export.targets.onnx import decode_weights, export_onnx

    model = make()
    cb = torch.unique(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    data, info = export_onnx(model, torch.randn(2, *shape), cb)
    assert info["weights_bit_identical"] and info["bit_identical_to_fp32_onnx"]
    assert info["coded_tensors"] >= len([p for p in model.parameters() if p.dim() > 1])
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "Gather" in ops
    # the packed indices at ceil(log2 K) bits, one table, the few float tensors, the model's own
    # graph and a decoder of fixed size: nothing grows with the weights but the index stream
    n = sum(p.numel() for p in model.parameters())
    k = info["index_bits_global"]
    assert k == max(1, (info["table_values"] - 1).bit_length()) and info["coded_weights"] == n
    widths = {t["bits"] for t in info["tensors"].values()}
    assert all(max(1, (t["values"] - 1).bit_length()) <= t["bits"] <= k for t in info["tensors"].values())
    exact = sum(-(-sd_numel * t["bits"] // 8) for sd_numel, t in zip(
        [model.state_dict()[name].numel() for name in info["tensors"]], info["tensors"].values()))
    assert info["index_bytes"] <= exact + 3 * len(widths) + len(info["tensors"])
    own = sum(t["values"] for t in info["tensors"].values() if t["table"] == "own")
    shared = any(t["table"] == "shared" for t in info["tensors"].values())
    assert info["table_bytes"] == 4 * own + (4 * info["table_values"] if shared else 0)
    payload = info["index_bytes"] + info["table_bytes"] + info["float_bytes"]
    graph = info["fp32_onnx_bytes"] - 4 * n
    assert info["bytes"] < payload + graph + 1500
    assert info["bytes"] < info["fp32_onnx_bytes"] / 2
    sd = model.state_dict()
    for name, arr in decode_weights(data).items():
        assert np.array_equal(arr.view(np.uint32), sd[name].numpy().view(np.uint32))


@needs_onnx
@pytest.mark.parametrize("K", [1, 2, 3, 8, 100, 128, 129, 513, 3000])
def test_codebook_onnx_packs_indices_at_ceil_log2_k_bits_for_any_k(K: int) -> None:
    from pwfn.export.targets.onnx import export_onnx, pack_bits, unpack_bits

    g = torch.Generator().manual_seed(K)
    table = torch.randperm(1 << 14, generator=g)[:K].float().sub(1 << 13).mul(2.0**-10)  # K distinct values
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(table[torch.randint(0, K, p.shape, generator=g)] * 2.0**-4)
    cb = torch.unique(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    data, info = export_onnx(model, torch.randn(2, 64, generator=g), cb)
    assert info["weights_bit_identical"] and info["bit_identical_to_fp32_onnx"]
    n = sum(p.numel() for p in model.parameters())
    k = max(1, (len(cb) - 1).bit_length())
    assert info["index_bits_global"] == k and info["index_bits"] <= k and info["coded_weights"] == n
    groups = len({t["bits"] for t in info["tensors"].values()})
    assert info["index_bytes"] <= -(-n * k // 8) + 4 * groups  # each tensor at ceil(log2 K_t) <= ceil(log2 K)
    if len(cb) <= 128:  # below an int8 copy of the weights: one byte each and a scale per tensor
        assert info["index_bytes"] + info["table_bytes"] < n + 4 * len(info["tensors"])
    idx = torch.randint(0, 1 << k, (1001,), generator=g).numpy()
    assert (unpack_bits(pack_bits(idx, k), k, idx.size) == idx).all()


@needs_onnx
def test_codebook_onnx_handles_any_module_and_keeps_off_codebook_tensors_float() -> None:
    from pwfn.export.targets.onnx import export_onnx

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.emb(x)).mean(1))

    m = snapped(Tagger())
    with torch.no_grad():
        m.norm.weight.copy_(torch.linspace(0.9, 1.1, 16) + 1e-3)  # off the codebook: stays float
    cb = torch.unique(torch.cat([m.emb.weight.reshape(-1), m.fc.weight.reshape(-1)]))
    data, info = export_onnx(m, torch.randint(0, 50, (2, 7)), cb)
    assert "emb.weight" in info["tensors"]
    assert "norm.weight" not in info["tensors"]
    assert info["weights_bit_identical"]


# -------------------------------------------------------------------------------- TFLite-Micro


@needs_tflm
@pytest.mark.parametrize("make,shape", [(mlp, (64,)), (cnn, (1, 8, 8))])
def test_tflm_lut_compressed_model_runs_bit_identically(make, shape) -> None:
    from pwfn.export.targets.tflm import export_tflm, run_tflm

    model = make()
    files, info = export_tflm(model, torch.randn(1, *shape))
    assert info["bit_identical_to_uncompressed"] and info["max_abs_diff"] <= 1e-5
    assert info["compressed_tensors"] == sum(1 for _ in model.parameters())
    assert len(files["model.tflite"]) < len(files["model_uncompressed.tflite"]) / 2
    assert b"TFL3" == files["model.tflite"][4:8]
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_tflm(files["model.tflite"], x.numpy())
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@needs_tflm
def test_tflm_leaves_tensors_with_too_many_values_uncompressed() -> None:
    from pwfn.export.targets.tflm import export_tflm

    model = snapped(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), order=4, max_abs=2.0)
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(64 * 32).reshape(32, 64).double().mul(2.0**-7).sub(8).float())
    files, info = export_tflm(model, torch.randn(1, 64))
    assert info["not_compressed"] == {"0.weight": 64 * 32}
    assert info["compressed_tensors"] == 3 and info["bit_identical_to_uncompressed"]


# -------------------------------------------------------------------------------- hls4ml


def test_fill_terms_writes_every_value_with_exactly_T_nonzero_terms() -> None:
    from pwfn.core.centres import decompose
    from pwfn.export.targets.hls4ml import fill_terms

    values = torch.tensor([0.0, 2.0**-7, -0.5, 0.75, 7 * 2.0**-7, -(2.0**-3) - 2.0**-7, 1.0], dtype=torch.float64)
    d = decompose(values, b=7)
    for T in (3, 4, 5):
        s, e = fill_terms(d.signs.numpy(), d.exponents.numpy(), d.orders.numpy(), T, 7)
        assert (s != 0).all()
        assert np.array_equal((s * np.exp2(e.astype(np.float64))).sum(-1), values.numpy())
    from pwfn.export.targets.hls4ml import Hls4mlError

    with pytest.raises(Hls4mlError, match="3 terms"):
        fill_terms(d.signs.numpy(), d.exponents.numpy(), d.orders.numpy(), 2, 7)


@needs_hls
@pytest.mark.slow
@pytest.mark.parametrize("make,shape,mode", [(mlp, (64,), "auto"), (cnn, (1, 8, 8), "auto"), (mlp, (64,), "fixed")])
def test_hls4ml_c_simulation_matches_the_shift_add_reference(make, shape, mode) -> None:
    import io
    import tarfile

    from pwfn.export.targets.hls4ml import export_hls4ml

    model = make()
    if make is mlp and mode == "auto":
        torch.manual_seed(5)  # values with three terms: three parallel layers, odd T
        model = snapped(create_model("mlp", hidden=[32, 16]), order=3)
    data, info = export_hls4ml(model, torch.rand(3, *shape), mode=mode,
                               check_inputs=torch.randn(5, *shape, generator=torch.Generator().manual_seed(4)))
    assert info["bit_identical_to_reference"]
    assert info["max_abs_diff_to_float"] <= info["error_bound"]
    if mode == "auto":
        assert info["products"]["weight_exponential"] > 0 and info["products"]["mult"] == 0
        assert info["multiplications_left"] == 0
        assert all(v["path"] == "exponent" for v in info["layers"].values())
        if make is mlp:
            assert max(v["parallel_layers"] for v in info["layers"].values()) == 3
    else:
        assert info["products"]["weight_exponential"] == 0 and info["products"]["mult"] > 0
        assert info["multiplications_left"] == info["macs"]
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert "hls4ml_prj/firmware/myproject.cpp" in names and not any(n.endswith(".so") for n in names)


# -------------------------------------------------------------------------------- CLI


def _export_folder(tmp_path: Path) -> Path:
    from pwfn.export import export_model

    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    out = tmp_path / "export"
    export_model(model, names, out, {"name": "mlp", "kwargs": {"hidden": [32, 16]}})
    return out


@needs_onnx
@needs_tflm
@needs_hls
@pytest.mark.slow
def test_export_targets_writes_checked_files_and_reports_sizes(tmp_path: Path) -> None:
    from pwfn.export.targets import export_targets
    from pwfn.run.report import format_targets

    out = _export_folder(tmp_path)
    summary = export_targets(out, ["onnx,tflm", "hls4ml"])
    for name, fname in (("onnx", "model.onnx"), ("tflm", "model.tflite"), ("hls4ml", "hls4ml_prj.tar.gz")):
        t = summary["targets"][name]
        assert (out / fname).stat().st_size == t["bytes"] and t["file"] == fname
    assert summary["targets"]["onnx"]["vs_fp32"] > 2 and summary["targets"]["tflm"]["vs_fp32"] > 2
    assert summary["targets"]["hls4ml"]["multiplications_left"] == 0
    text = format_targets(summary)
    assert "| hls4ml |" in text and "0 multiplications" in text
    assert (out / "targets.json").exists()


def test_cli_refuses_unknown_targets_before_writing(tmp_path: Path, capsys) -> None:
    from pwfn.cli import main

    assert main(["export", str(tmp_path / "nowhere"), "--to", "onnx,coreml"]) == 2
    assert "unknown export target 'coreml'" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


@needs_onnx
@needs_tflm
@needs_hls
@pytest.mark.slow
def test_device_targets_benchmark_dry_run(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "device_targets.py"), "--dry", "--out",
                           str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "device_targets.json").read_text())
    for ds in doc["datasets"]:  # digits (a config run) and the Conv1d + BatchNorm signal model (from Python)
        by = {r["target"].split(" ")[0].rstrip(","): r for r in ds["targets"]["rows"]}
        assert not any(r.get("refused") for r in by.values()), by
        assert by["ONNX"]["agree"] == 100.0 and by["TFLite-Micro"]["agree"] == 100.0  # float runtimes: same
        assert by["hls4ml"]["agree"] >= 95.0  # fixed point: near-ties may flip
        assert by["ONNX"]["bytes"] < ds["targets"]["fp32_bytes"]
    digits, signal = doc["datasets"]
    assert {r["target"].split(" ")[0]: r for r in digits["targets"]["rows"]}["hls4ml"]["mult_left"] == 0
    assert signal["export_run"] == {"onnx": "exported", "tflm": "exported", "hls4ml": "exported"}
    assert signal["recipe"]["factory"] == "_device_models:SignalNet"
    assert signal["targets"]["operations"]["scale_multiplications"] > 0  # BatchNorm: its own layer
    assert any(r["method"] == "PWFN budget" and r["met"] for r in digits["budget"])
    assert "| K | method |" in (tmp_path / "out" / "device_targets.md").read_text()


# -------------------------------------------------------------------------------- more layers (issue 24)


def _with_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """``snapped`` model whose BatchNorms have non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    model = snapped(model, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
    return model.eval()


class SignalNet(nn.Module):
    """A keyword-spotting-shaped 1-D CNN: Conv1d + BatchNorm + pooling, a (N, L) input unsqueezed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 4, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(4)
        self.pool1 = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm1d(4)
        self.pool2 = nn.AvgPool1d(3)  # not a power of two: a division
        self.fc = nn.Linear(4 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.bn1(self.conv1(x.unsqueeze(1)))))
        x = self.pool2(self.bn2(self.conv2(x)))  # no ReLU: negative values reach the average
        return self.fc(x.view(x.size(0), -1))


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.AvgPool2d(3),
                         nn.MaxPool2d(3, 1, 1), nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Linear(8, 4))


def gap_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


LAYER_MODELS = [(lambda: _with_stats(SignalNet()), (24,)), (lambda: _with_stats(bn_cnn(), 1), (1, 6, 6)),
                (lambda: _with_stats(gap_cnn(), 2), (2, 8, 8))]


@pytest.mark.parametrize("make,shape", LAYER_MODELS)
def test_shift_add_takes_batchnorm_conv1d_pools_and_reshapes(make, shape) -> None:
    model = make()
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(5))
    fp = calibrate(model, x, frac_bits=12)
    net = ShiftAddNet(model, b=7, fixed_point=fp, example=x[:1])
    xi = fp.quantise(x)
    assert torch.equal(net.forward_int(xi, "shift"), net.forward_int(xi, "multiply"))
    with torch.no_grad():
        ref = model(x).double()
    err = float((net(x) - ref).abs().max())
    assert err <= net.error_bound() and err < 2e-2
    assert torch.equal(net(x).argmax(1), ref.argmax(1)) or err < 1e-3
    counts = net.operation_counts(shape)["total"]
    bn_values = sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert counts["scale_multiplications"] >= bn_values  # one product per value a BatchNorm scales
    assert counts["multiplications_left"] == counts["scale_multiplications"] + counts["divisions"]


def test_a_batchnorm_stays_its_own_layer_and_the_weights_stay_on_the_codebook() -> None:
    from pwfn.export.targets.graph import trace

    model = _with_stats(SignalNet())
    g = trace(model, torch.zeros(1, 24))
    assert [lay.kind for lay in g.layers].count("batchnorm") == 2
    bn = next(lay for lay in g.layers if lay.kind == "batchnorm")
    m = model.bn1
    x = torch.randn(4, 4, 7)
    expect = x * bn.extra["scale"].float().view(1, -1, 1) + bn.extra["shift"].float().view(1, -1, 1)
    assert torch.allclose(m(x), expect, atol=1e-5)  # scale and shift are the norm itself, in eval mode


@needs_tflm
@pytest.mark.parametrize("make,shape", LAYER_MODELS + [
    (lambda: snapped(nn.Sequential(nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8),
                                   nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 8), nn.Hardswish(),
                                   nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 4), nn.Softmax(-1))), (10,))])
def test_tflm_takes_batchnorm_conv1d_pools_reshapes_and_activations(make, shape) -> None:
    from pwfn.export.targets.tflm import export_tflm, run_tflm

    model = make()
    files, info = export_tflm(model, torch.randn(1, *shape))
    assert info["bit_identical_to_uncompressed"]
    n_fixed = sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
    assert info["compressed_tensors"] == 2 * n_fixed  # every weight and bias LUT-compressed, no folding
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_tflm(files["model.tflite"], x.numpy())
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


@pytest.mark.parametrize("target,module,words", [
    ("tflm", "pwfn.export.targets.tflm", ["'emb' (Embedding)", "'enc' (TransformerEncoderLayer)", "onnx"]),
    ("hls4ml", "pwfn.export.targets.hls4ml", ["'emb' (Embedding)", "'enc' (TransformerEncoderLayer)", "onnx"]),
])
def test_targets_refuse_what_they_cannot_take_naming_the_layer_and_what_works(target, module, words) -> None:
    import importlib

    check = importlib.import_module(module).check_model
    with pytest.raises(PwfnError) as info:
        check(TinyTransformer().eval(), torch.randint(0, 20, (1, 7)))
    for w in words:
        assert w in str(info.value)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(PwfnError, match=r"'0' \(Conv2d\): groups=2.*groups=1 works"):
        check(grouped, torch.zeros(1, 4, 3, 3))
    if target == "hls4ml":  # lookup-table activations have no bit-exact reference
        with pytest.raises(PwfnError, match=r"'1' \(Sigmoid\).*tflm targets take it in float"):
            check(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), torch.zeros(1, 3))


@needs_onnx
def test_onnx_takes_a_small_transformer_with_packed_indices() -> None:
    from pwfn.export.targets.onnx import export_onnx

    model = snapped(TinyTransformer())
    cb = torch.unique(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    data, info = export_onnx(model, torch.randint(0, 20, (2, 7)), cb)
    assert info["bit_identical_to_fp32_onnx"] and info["weights_bit_identical"]
    assert info["coded_weights"] >= sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")) // 2
    # the coded weights shrink to their index bits (a transformer's graph itself is most of its small file)
    assert info["fp32_onnx_bytes"] - info["bytes"] > 0.7 * info["coded_fp32_bytes"] - 1500


@needs_hls
@pytest.mark.slow
@pytest.mark.parametrize("make,shape", LAYER_MODELS)
def test_hls4ml_c_simulation_takes_batchnorm_conv1d_pools_and_reshapes(make, shape) -> None:
    from pwfn.export.targets.hls4ml import export_hls4ml

    model = make()
    g = torch.Generator().manual_seed(7)
    data, info = export_hls4ml(model, torch.randn(2, *shape, generator=g),
                               check_inputs=torch.randn(30, *shape, generator=g))
    assert info["bit_identical_to_reference"]  # C simulation == shift-add reference, bit for bit
    assert info["max_abs_diff_to_float"] <= info["error_bound"]
    assert info["products"]["weight_exponential"] > 0
    assert all(v["path"] == "exponent" for v in info["layers"].values())
    assert info["multiplications_left"] == info["scale_multiplications"] + info["divisions"] > 0
