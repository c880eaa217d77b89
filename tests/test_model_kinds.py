"""The last gaps of coverage (issue 23): meta and lazy models, non-finite buffers, complex parameters.

* a model on the meta device: a clear ModelError saying how to materialize it;
* lazy modules (``nn.LazyLinear`` ...) that never ran: materialized by ``compress``'s first batch before
  any check; a Fixer (which sees no data) says to run one forward pass first;
* buffers may hold infinities (an attention mask built by torch's own helper), never NaN; weights
  must be finite;
* complex parameters stay float (the codebook is real) and are counted honestly: 8 bytes per
  complex64 entry, two real values, four real multiplications, in sizes, coverage and the log.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn
from pwfn.core.metrics import size_report
from pwfn.errors import ModelError
from pwfn.model.coverage import plan
from pwfn.model.recipes import RecipeMismatch, check_recipe
from pwfn.training.checks import check_materialized
from pwfn.training.fixer import Fixer
from pwfn.training.train import first_nonfinite_weight

CFG = {"pwfn": {"fractions": [0.5, 1.0], "round_epochs": 0.3, "first_round_epochs": 0.1, "mc_samples": 2},
       "wfn": {"fractions": [0.5, 1.0], "round_epochs": 0.3}, "progress": False,
       "contract": {"enforce": False}}  # entry checks on untrained models; the contract has its own tests


def _loader(shape=(6,), n=128, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.reshape(n, -1)[:, 0] > 0).long() % classes
    return DataLoader(TensorDataset(x, y), batch_size=32)


# --------------------------------------------------------------------------------------------
# meta device


def _meta_net():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("how", ["compress", "fixer", "fixer_inplace"])
def test_a_model_on_the_meta_device_is_a_clear_error(how):
    model = _meta_net()
    with pytest.raises(ModelError, match=r"meta device.*to_empty.*load_state_dict"):
        if how == "compress":
            pwfn.compress(model, _loader(), _loader(), method="wfn", config=CFG)
        else:
            Fixer(model, method="pwfn", config=CFG, inplace=how == "fixer_inplace")


def test_a_meta_model_materialized_and_loaded_is_fixed():
    trained = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    model = _meta_net().to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    fixer = Fixer(model, method="wfn", config=CFG)
    while not fixer.done:
        fixer.fix_next()
    assert isinstance(fixer.finalize(), nn.Module)


def test_a_meta_buffer_alone_is_caught():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    model[1].register_buffer("running_mean", torch.empty(4, device="meta"))
    with pytest.raises(ModelError, match=r"\['1.running_mean'\].*meta device"):
        check_materialized(model, lazy_ok=True)


# --------------------------------------------------------------------------------------------
# lazy modules


class LazyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3)
        self.bn = nn.LazyBatchNorm2d()
        self.fc = nn.LazyLinear(2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("method", ["wfn", "pwfn"])
def test_lazy_modules_are_materialized_by_the_first_batch_in_compress(method, tmp_path):
    loader = _loader(shape=(1, 6, 6))
    res = pwfn.compress(LazyConvNet(), loader, loader, method=method, config=CFG, run_dir=tmp_path / "run")
    assert res.report["final"]["fixed_fraction"] == 1.0
    names = res.report["quantised_tensors"]
    assert {"conv.weight", "fc.weight"} <= set(names)
    assert res.point_model.fc.weight.shape == (2, 64)
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in res.point_model.modules())


def test_a_lazy_run_records_its_recipe_and_exports_to_the_device_targets(tmp_path):
    """The recipe (a constructor without arguments) builds lazy modules: its check compares their names (their
    shapes come from the weights loaded into them), and the rebuilt model reaches every target as the layers
    it stands for (a LazyBatchNorm2d is no BatchNorm2d to a handler table)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra runs the ONNX target's check")
    pytest.importorskip("tflite_micro", reason="the tflm extra runs the TFLite-Micro target's check")
    from pwfn.export import export_run, load_exported_model

    loader = _loader(shape=(1, 6, 6))
    res = pwfn.compress(LazyConvNet(), loader, loader, method="wfn", config=CFG, run_dir=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["recipe"] == {"factory": f"{__name__}:LazyConvNet", "kwargs": {}}
    out = tmp_path / "run" / "export"
    export_run(tmp_path / "run", targets=["onnx", "tflm"])
    summary = json.loads((out / "targets.json").read_text())["targets"]
    assert summary["tflm"]["bit_identical_to_uncompressed"] is True
    assert summary["onnx"]["weights_bit_identical"] is True
    loaded = load_exported_model(out)
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), res.point_model.eval()(x))


def test_a_lazy_recipe_is_checked_by_names_and_refused_when_they_differ():
    trained = LazyConvNet()
    with torch.no_grad():
        trained(torch.randn(2, 1, 6, 6))
    state = trained.state_dict()
    assert check_recipe({"factory": f"{__name__}:LazyConvNet"}, state, "lazy") == \
        {"factory": f"{__name__}:LazyConvNet", "kwargs": {}}
    state.pop("fc.bias")
    with pytest.raises(RecipeMismatch, match=r"fc\.bias which the weights lack"):
        check_recipe({"factory": f"{__name__}:LazyConvNet"}, state, "lazy")


def test_lazy_modules_through_the_cli_path_are_deterministic():
    """The materialized weights come from the seeded RNG, and the first-batch check leaves the RNG as it was."""
    loader = _loader(shape=(1, 6, 6))
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        res = pwfn.compress(LazyConvNet(), loader, loader, method="wfn", config={**CFG, "seed": 3})
        outs.append(res.point_model.fc.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


def test_a_fixer_on_lazy_modules_says_to_run_a_forward_first_and_then_works():
    model = LazyConvNet()
    with pytest.raises(ModelError, match=r"not materialized yet \(lazy modules .*LazyLinear.*\).*forward pass"):
        Fixer(model, method="pwfn", config=CFG)
    with torch.no_grad():
        model(torch.randn(2, 1, 6, 6))
    fixer = Fixer(model, method="pwfn", config=CFG, inplace=True)
    fixer.fix_next()
    assert fixer.view.numel == sum(p.numel() for n, p in model.named_parameters() if "bn" not in n and "sigma" not in n)
    fixer.close()


def test_lazy_tensors_are_skipped_by_the_finite_check_until_materialized():
    model = LazyConvNet()
    assert first_nonfinite_weight(model) is None
    check_materialized(model, lazy_ok=True)


# --------------------------------------------------------------------------------------------
# non-finite buffers


class CausalNet(nn.Module):
    def __init__(self, steps=5):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(steps))  # -inf above the diagonal
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.enc(self.emb(x), mask=self.mask, is_causal=True)[:, -1])


@pytest.mark.parametrize("method", ["wfn", "pwfn"])
def test_a_causal_mask_buffer_with_minus_inf_is_allowed_end_to_end(method, tmp_path):
    loader = _loader(shape=(5, 4))
    assert bool(torch.isinf(CausalNet().mask).any())
    res = pwfn.compress(CausalNet(), loader, loader, method=method, config=CFG, run_dir=tmp_path / "run")
    assert torch.equal(res.point_model.mask, CausalNet().mask)
    assert math.isfinite(res.report["final"]["test"]["loss"])
    from pwfn.run.manifest import load_manifest, read_point_model

    _, state = read_point_model(tmp_path / "run", load_manifest(tmp_path / "run"))  # not "damaged"
    assert torch.equal(state["mask"], CausalNet().mask)


def test_weights_must_be_finite_and_buffers_must_not_be_nan():
    model = CausalNet()
    assert first_nonfinite_weight(model) is None
    model.mask[0, 0] = float("nan")
    assert "NaN buffer" in first_nonfinite_weight(model)
    model = CausalNet()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    assert "non-finite weights" in first_nonfinite_weight(model)
    with pytest.raises(ModelError, match="not finite"):
        Fixer(model, method="wfn", config=CFG)
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    bn[1].running_var.fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN buffer"):
        Fixer(bn, method="wfn", config=CFG)


# --------------------------------------------------------------------------------------------
# complex parameters


class Spectral(nn.Module):
    """A 1-D spectral (FNO-style) layer: complex weights on the lowest Fourier modes, then a real head."""

    def __init__(self, n=16, modes=5):
        super().__init__()
        self.modes = modes
        self.w = nn.Parameter(torch.randn(modes, dtype=torch.complex64) * 0.5)
        self.head = nn.Linear(n, 2)

    def forward(self, x):
        f = torch.fft.rfft(x, dim=-1)
        out = torch.zeros_like(f)
        out[:, : self.modes] = f[:, : self.modes] * self.w
        return self.head(torch.fft.irfft(out, n=x.shape[-1], dim=-1))


def test_size_report_counts_a_complex64_entry_as_8_bytes_two_values_and_four_multiplications():
    state = {"w": torch.randn(5, dtype=torch.complex64), "lin": torch.full((3,), 0.5)}
    rep = size_report(state, ["lin"], b=7)
    w = rep.per_tensor["w"]
    assert (w.numel, w.fp32_bytes, w.fp16_bytes, w.raw_bytes) == (10, 40, 20, 40)
    assert w.multiplications_kept == 20 and w.fixed_width_bytes == 40.0
    assert rep.total.fp32_bytes == 40 + 12 and rep.total.multiplications_kept == 20
    state128 = {"w": torch.randn(5, dtype=torch.complex128)}
    assert size_report(state128, []).per_tensor["w"].raw_bytes == 80
    with pytest.raises(ValueError, match="complex"):
        size_report(state, ["w"])


def test_coverage_counts_complex_values_and_says_why_they_stay_float(caplog):
    cov = plan(Spectral())
    w = next(t for t in cov.tensors if t.name == "w")
    assert not w.quantised and w.numel == 10 and w.bytes == 40
    assert "codebook is real" in w.reason and "torch.complex(re, im)" in w.reason
    s = cov.summary()
    assert s["parameters"] == 34 + 10 and s["parameter_bytes"] == 136 + 40
    assert s["share"] == pytest.approx(34 / 44) and s["byte_share"] == pytest.approx(136 / 176)
    with caplog.at_level(logging.WARNING, logger="pwfn.model.coverage"):
        cov.log("wfn")
    assert "w (Spectral, 10 values) stays float: complex (complex64)" in caplog.text


@pytest.mark.parametrize("method", ["wfn", "pwfn"])
def test_a_spectral_model_is_fixed_with_its_complex_weights_float_and_counted_in_export(method, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)
    model = Spectral()
    w0 = model.w.detach().clone()
    res = pwfn.compress(model, loader, loader, method=method, config=CFG, run_dir=tmp_path / "run")
    assert res.point_model.w.dtype == torch.complex64 and res.report["quantised_tensors"] == ["head.weight",
                                                                                           "head.bias"]
    assert res.report["coverage"]["share"] == pytest.approx(34 / 44)
    assert not torch.equal(res.point_model.w.detach(), w0)  # trained between rounds, kept float
    from pwfn.export import export_run

    export_run(tmp_path / "run")
    import json

    size = json.loads((tmp_path / "run" / "export" / "size.json").read_text())
    assert size["per_tensor"]["w"]["fp32_bytes"] == 40 and size["per_tensor"]["w"]["numel"] == 10
    assert size["total"]["fp32_bytes"] == 136 + 40
    assert size["arithmetic"]["multiplications_kept"] == 20
    assert size["coverage"]["share"] == pytest.approx(34 / 44)
    from pwfn.run.rundata import layer_table

    rows = {r["layer"]: r for r in layer_table({"folder": str(tmp_path / "run"), "report": res.report})}
    assert rows["w"]["params"] == 10 and rows["w"]["fp32_bytes"] == 40


def test_strict_coverage_refuses_a_complex_model():
    with pytest.raises(ModelError, match="strict coverage.*complex"):
        Fixer(Spectral(), method="wfn", config={**CFG, "quantise": {"strict": True}})
