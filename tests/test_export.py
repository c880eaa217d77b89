"""Export: point model + packed artefact round trip bit for bit, refuse unfixed runs, sizes honest.

Run folders are written by hand (report.json, point_model.*) from models whose quantised
tensors already hold codebook values, so nothing here needs the fixing engine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pwfn.cli import main as cli_main
from pwfn.core import metrics as M
from pwfn.errors import ArtefactError, ModelError, PwfnError
from pwfn.export import (
    EXPORT_FORMAT,
    ExportError,
    export_model,
    export_run,
    load_exported_model,
    load_packed_model,
    packing,
)
from pwfn.model.zoo import create_model
from pwfn.run.pipeline import save_point_model

B = 7
PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def codebook_values(signed_terms: bool = False) -> torch.Tensor:
    """0 and +-(sums of up to 3 power-of-two terms) in [2^-7, 1): a realistic shared codebook."""
    n = torch.arange(1, 128, dtype=torch.float64)
    terms = M.term_counts(n / 128, b=B, signed_terms=signed_terms)
    mags = n[terms <= 3] / 128
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).float()


def snap(t: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Each value replaced by its nearest codebook value."""
    pos = torch.searchsorted(cb, t.reshape(-1).clamp(cb[0], cb[-1]))
    lo, hi = cb[(pos - 1).clamp(0)], cb[pos.clamp(max=len(cb) - 1)]
    flat = t.reshape(-1)
    return torch.where((flat - lo).abs() <= (hi - flat).abs(), lo, hi).reshape(t.shape)


def fixed_model(name: str, seed: int = 0, signed_terms: bool = False, **kwargs) -> tuple[nn.Module, list[str]]:
    """A zoo model whose Linear/Conv weights and biases are codebook values; BN stats non-trivial."""
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    cb = codebook_values(signed_terms)
    names = []
    with torch.no_grad():
        for mname, m in model.named_modules():
            if isinstance(m, PLAIN):
                for p in ("weight", "bias"):
                    t = getattr(m, p, None)
                    if t is not None:
                        t.copy_(snap(t * 2, cb))
                        names.append(f"{mname}.{p}")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
                m.num_batches_tracked.fill_(1234)
    return model.eval(), names


def write_run(folder: Path, model: nn.Module, recipe, quantised: list[str], method: str = "pwfn",
              fixed_fraction: float = 1.0) -> Path:
    """A minimal method folder as the pipeline leaves it, without a manifest: b and the signed terms
    come from the point model's checksummed description."""
    folder.mkdir(parents=True, exist_ok=True)
    values = torch.cat([model.state_dict()[n].reshape(-1) for n in quantised])
    cb, counts = M.codebook(values)
    report = {
        "method": method,
        "fractions": [0.5, 1.0],
        "quantised_tensors": quantised,
        "final": {
            "fixed_fraction": fixed_fraction,
            "codebook": [float(v) for v in cb.tolist()],
            "codebook_counts": [int(c) for c in counts.tolist()],
            "test": {"top1": 50.0},
        },
        "rounds": [],
    }
    (folder / "report.json").write_text(json.dumps(report))
    save_point_model(model, folder, recipe, method=method, b=B, signed_terms=method == "wfn")
    return folder


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def assert_same_model(ref: nn.Module, got: nn.Module, x: torch.Tensor) -> None:
    rs, gs = ref.state_dict(), got.state_dict()
    assert list(rs) == list(gs)
    for k in rs:
        assert bitwise_equal(rs[k], gs[k]), k
        assert torch.equal(rs[k], gs[k]), k
    ref.eval()
    got.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), got(x))


ZOO = {
    "mlp": ({"in_features": 64, "hidden": [32, 16], "num_classes": 10}, (3, 64)),
    "lenet5": ({"in_channels": 1, "num_classes": 10, "input_size": 28}, (3, 1, 28, 28)),
    "resnet20": ({"num_classes": 10}, (2, 3, 32, 32)),
    "resnet20_B": ({"num_classes": 10, "shortcut": "B"}, (2, 3, 16, 16)),
}


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> tuple[Path, nn.Module, list[str]]:
    """One exported ResNet-20 run shared by the size, CLI-free and corruption tests."""
    model, q = fixed_model("resnet20")
    folder = write_run(tmp_path_factory.mktemp("r20") / "demo" / "pwfn", model,
                       {"name": "resnet20", "kwargs": {"num_classes": 10}}, q)
    export_run(folder)
    return folder, model, q


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("key", list(ZOO))
def test_round_trip_model_zoo(key: str, tmp_path: Path) -> None:
    kwargs, shape = ZOO[key]
    name = key.split("_")[0]
    model, q = fixed_model(name, **kwargs)
    run = write_run(tmp_path / "run" / "pwfn", model, {"name": name, "kwargs": kwargs}, q)
    result = export_run(run)
    out = run / "export"
    assert result["fixed"] and result["unfixed_weights"] == 0
    assert sorted(os.listdir(out)) == ["model.json", "model.pwfn", "model.safetensors", "size.json"]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert_same_model(model, load_exported_model(out), x)
    assert_same_model(model, load_packed_model(out / "model.pwfn"), x)
    # The artefact codes exactly the quantised tensors; everything else (BN stats) is raw.
    manifest = packing.read_packed(out / "model.pwfn").manifest
    kinds = {e["name"]: e["kind"] for e in manifest["tensors"]}
    assert {n for n, k in kinds.items() if k == "quantised"} == set(q)
    assert list(kinds) == list(model.state_dict())


def test_batchnorm_statistics_and_counters_survive(resnet_run) -> None:
    folder, model, _ = resnet_run
    back = load_packed_model(folder / "export" / "model.pwfn").state_dict()
    sd = model.state_dict()
    for k in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "layers.4.bn2.running_var"):
        assert bitwise_equal(sd[k], back[k]), k
    assert back["bn1.num_batches_tracked"].dtype == torch.int64 and int(back["bn1.num_batches_tracked"]) == 1234


def test_codebook_terms_positive_for_pwfn_signed_for_wfn(tmp_path: Path) -> None:
    for method in ("pwfn", "wfn"):
        model, q = fixed_model("mlp", signed_terms=method == "wfn", in_features=64, hidden=[32], num_classes=10)
        sd = model.state_dict()
        sd[q[0]].view(-1)[:4] = torch.tensor([7 / 128, -7 / 128, 0.0, -0.0])  # 4+2+1 vs 8-1
        run = write_run(tmp_path / method, model, {"name": "mlp", "kwargs": {"hidden": [32]}}, q, method=method)
        export_run(run)
        back = load_packed_model(run / "export" / "model.pwfn").state_dict()[q[0]]
        assert bitwise_equal(back, sd[q[0]])  # both zeros keep their sign
        pm = packing.read_packed(run / "export" / "model.pwfn")
        assert pm.metadata["method"] == method and pm.metadata["signed_terms"] == (method == "wfn")
        assert pm.metadata["pwfn_export"] == EXPORT_FORMAT and pm.metadata["recipe"]["name"] == "mlp"
        terms = dict(zip(pm.codebook.tolist(), pm.terms))
        for value, entry in terms.items():
            assert sum(s * 2.0**e for s, e in entry) == value
        if method == "pwfn":
            assert terms[7 / 128] == [(1, -5), (1, -6), (1, -7)]
            assert all(s == (1 if v > 0 else -1) for v, e in terms.items() for s, _ in e)
        else:
            assert sorted(terms[7 / 128]) == [(-1, -7), (1, -4)]
        assert terms[0.0] == []


def test_signed_terms_come_from_the_run_record_not_the_method_name(tmp_path: Path) -> None:
    model, q = fixed_model("mlp", signed_terms=True, in_features=64, hidden=[32], num_classes=10)
    recipe = {"name": "mlp", "kwargs": {"hidden": [32]}}
    run = write_run(tmp_path / "a" / "pwfn", model, recipe, q, method="pwfn")
    save_point_model(model, run, recipe, method="pwfn", b=B, signed_terms=True)  # the run fixed with signed terms
    export_run(run)
    pm = packing.read_packed(run / "export" / "model.pwfn")
    assert pm.metadata["method"] == "pwfn" and pm.metadata["signed_terms"] is True
    assert json.loads((run / "export" / "size.json").read_text())["signed_terms"] is True
    # Neither a manifest nor the point model's description records them: refused, naming the manifest.
    run = write_run(tmp_path / "b" / "wfn", model, recipe, q, method="wfn")
    save_point_model(model, run, recipe)
    with pytest.raises(ExportError, match=r"manifest\.json is missing.*signed terms"):
        export_run(run)
    assert not (run / "export").exists()


def test_loading_needs_no_bayes(resnet_run) -> None:
    folder, _, _ = resnet_run
    code = (
        "import sys; from pwfn.export import load_packed_model, load_exported_model; "
        f"load_packed_model({str(folder / 'export' / 'model.pwfn')!r}); "
        f"load_exported_model({str(folder / 'export')!r}); "
        "assert 'bayes' not in sys.modules, sorted(m for m in sys.modules if 'bayes' in m); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_export_model_from_a_bayesian_model_with_masks(tmp_path: Path) -> None:
    import bayes
    from pwfn.model.plumbing import QuantView

    model, q = fixed_model("lenet5")
    bmodel = bayes.bayesianize(model, sigma_init=0.01)
    view = QuantView(bmodel, q)
    view.write(view.values(), torch.ones(view.numel, dtype=torch.bool))
    assert view.names() == q
    recipe = {"name": "lenet5", "kwargs": {}}
    result = export_model(bmodel, view.names(), tmp_path / "out", recipe, masks=view.masks())
    assert result["fixed"]
    x = torch.randn(2, 1, 28, 28)
    assert_same_model(model, load_packed_model(tmp_path / "out" / "model.pwfn"), x)
    # An unfixed mask entry makes the value unfixed even though it is a codebook value.
    view.write(view.values(), torch.arange(view.numel) > 0)
    with pytest.raises(ExportError, match="1 of"):
        export_model(bmodel, view.names(), tmp_path / "out2", recipe, masks=view.masks())
    # Without a recipe, one is recorded when the model's class builds it without arguments ...
    assert export_model(model, q, tmp_path / "own")["recipe"] == {"factory": "pwfn.model.zoo:LeNet5", "kwargs": {}}
    assert_same_model(model, load_packed_model(tmp_path / "own" / "model.pwfn"), x)
    # ... else the loaders need model= (LeNet5(input_size=32) is not what LeNet5() builds)
    model32, q32 = fixed_model("lenet5", input_size=32)
    assert export_model(model32, q32, tmp_path / "norecipe")["recipe"] is None
    with pytest.raises(ModelError, match="no model recipe"):
        load_packed_model(tmp_path / "norecipe" / "model.pwfn")
    fresh = create_model("lenet5", input_size=32)
    x32 = torch.randn(2, 1, 32, 32)
    assert_same_model(model32, load_packed_model(tmp_path / "norecipe" / "model.pwfn", model=fresh), x32)


# --------------------------------------------------------------------------- damage


def test_damaged_artefacts_raise_artefact_error_naming_the_problem(resnet_run, tmp_path: Path) -> None:
    folder, _, _ = resnet_run
    data = (folder / "export" / "model.pwfn").read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "checksum mismatch": bytes(data[:-100]) + bytes([data[-100] ^ 0x04]) + data[-99:],
        f"unsupported version {packing.FORMAT_VERSION + 1}": data[:8]
        + struct.pack("<I", packing.FORMAT_VERSION + 1)
        + data[12:],
        "bad magic": b"NOTPWFN!" + data[8:],
    }
    for expected, blob in cases.items():
        path = tmp_path / "bad.pwfn"
        path.write_bytes(blob)
        with pytest.raises(ArtefactError, match=expected):
            load_packed_model(path)
    # A flipped bit inside a coded tensor names that tensor's section.
    manifest = packing.unpack(data).manifest
    entry = next(e for e in manifest["tensors"] if e["kind"] == "quantised" and e.get("mode") == "ans")
    start = packing._HEADER.size + packing._HEADER.unpack_from(data, 0)[2]
    bad = bytearray(data)
    bad[start + entry["data"][0] + 1] ^= 0x10
    (tmp_path / "flip.pwfn").write_bytes(bytes(bad))
    with pytest.raises(ArtefactError, match=f"checksum mismatch in section data of tensor '{entry['name']}'"):
        load_packed_model(tmp_path / "flip.pwfn")
    with pytest.raises(ArtefactError, match="cannot read"):
        load_packed_model(tmp_path / "missing.pwfn")


def test_export_metadata_version_and_foreign_model_are_refused(resnet_run, tmp_path: Path) -> None:
    folder, model, q = resnet_run
    pm = packing.read_packed(folder / "export" / "model.pwfn")
    meta = dict(pm.metadata, pwfn_export=EXPORT_FORMAT + 1)
    packing.write_packed(tmp_path / "v.pwfn", pm.tensors, q, codebook=pm.codebook, metadata=meta)
    with pytest.raises(ArtefactError, match="unsupported version"):
        load_packed_model(tmp_path / "v.pwfn")
    meta = dict(pm.metadata, recipe={"name": "resnet32", "kwargs": {}})
    packing.write_packed(tmp_path / "r.pwfn", pm.tensors, q, codebook=pm.codebook, metadata=meta)
    with pytest.raises(ArtefactError, match="does not fit"):
        load_packed_model(tmp_path / "r.pwfn")


def test_tampered_safetensors_is_detected(resnet_run, tmp_path: Path) -> None:
    folder, _, _ = resnet_run
    copy = tmp_path / "export"
    copy.mkdir()
    for f in ("model.json", "model.safetensors"):
        (copy / f).write_bytes((folder / "export" / f).read_bytes())
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtefactError, match="checksum mismatch"):
        load_exported_model(copy)


# --------------------------------------------------------------------------- unfixed runs


def test_unfixed_runs_are_refused_unless_allowed(tmp_path: Path) -> None:
    kwargs = {"in_features": 64, "hidden": [32], "num_classes": 10}
    model, q = fixed_model("mlp", **kwargs)
    recipe = {"name": "mlp", "kwargs": kwargs}
    # 1. the report says the last round did not reach 100 %
    run = write_run(tmp_path / "a" / "pwfn", model, recipe, q, fixed_fraction=0.9)
    with pytest.raises(ExportError, match=r"not 100% fixed.*90\.00% fixed.*--allow-unfixed"):
        export_run(run)
    assert not (run / "export").exists()
    # 2. values outside the codebook (a float weight left over)
    with torch.no_grad():
        model.net[1].weight[0, :5] = torch.tensor([0.3001, -0.2, 0.011, 1e-9, 0.1234567])
    run = write_run(tmp_path / "b" / "pwfn", model, recipe, q)
    with pytest.raises(ExportError, match=r"5 of .*net\.1\.weight: 5.*--allow-unfixed"):
        export_run(run)
    assert not (run / "export").exists()
    report_before = (run / "report.json").read_text()
    result = export_run(run, allow_unfixed=True)
    assert not result["fixed"] and result["unfixed_weights"] == 5
    pm = packing.read_packed(run / "export" / "model.pwfn")
    assert pm.metadata["fixed"] is False
    assert pm.metadata["unfixed"]["tensors"]["net.1.weight"] == {"count": 5, "storage": "split"}
    assert json.loads((run / "export" / "model.json").read_text())["fixed"] is False
    x = torch.randn(4, 64)
    assert_same_model(model, load_packed_model(run / "export" / "model.pwfn"), x)
    assert_same_model(model, load_exported_model(run / "export"), x)
    report = json.loads((run / "report.json").read_text())
    assert report["export"]["unfixed_weights"] == 5 and report_before != json.dumps(report)


def test_a_tensor_with_nothing_fixed_is_stored_raw(tmp_path: Path) -> None:
    model, q = fixed_model("mlp", in_features=64, hidden=[8], num_classes=3)
    with torch.no_grad():
        model.net[1].bias.copy_(torch.linspace(0.001, 0.0099, 8) / 3)
    result = export_model(model, q, tmp_path / "o", {"name": "mlp", "kwargs": {"hidden": [8], "num_classes": 3}},
                          allow_unfixed=True)
    assert result["unfixed_weights"] == 8
    kinds = {e["name"]: e["kind"] for e in packing.read_packed(tmp_path / "o" / "model.pwfn").manifest["tensors"]}
    assert kinds["net.1.bias"] == "raw" and kinds["net.1.weight"] == "quantised"
    assert_same_model(model, load_packed_model(tmp_path / "o" / "model.pwfn"), torch.randn(2, 64))


def test_interrupted_run_is_exported_from_its_checkpoint_only_when_allowed(tmp_path: Path) -> None:
    import bayes
    from pwfn.common.io import save_checkpoint
    from pwfn.model.plumbing import QuantView
    from pwfn.run.manifest import new_manifest, write_manifest

    kwargs = {"in_features": 64, "hidden": [16], "num_classes": 10}
    model, q = fixed_model("mlp", **kwargs)
    bmodel = bayes.bayesianize(model, sigma_init=0.01)
    view = QuantView(bmodel, q)
    fixed = torch.rand(view.numel, generator=torch.Generator().manual_seed(0)) < 0.8
    values = view.values()
    values[~fixed] += 1e-4  # the unfixed weights have moved off the grid during training
    view.write(values, fixed)
    top = tmp_path / "demo"
    run = top / "pwfn"
    run.mkdir(parents=True)
    save_checkpoint(run / "checkpoint.pt", {"model": bmodel.state_dict(), "masks": view.mask_state(),
                                            "next_round": 3}, kind="run-pwfn")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 2, "fixed_fraction": 0.8}) + "\n")
    with pytest.raises(ExportError, match=r"no report\.json \(1 round\(s\) completed, 80\.0% fixed\)"):
        export_run(run)
    # The manifest, written when the run started, records the engine settings and the recipe.
    with pytest.raises(ExportError, match=r"manifest\.json is missing"):
        export_run(run, allow_unfixed=True)
    sd = model.state_dict()

    def manifest(recipe: dict) -> None:
        write_manifest(run, new_manifest(method="pwfn", engine={"b": B, "max_order": 3, "signed_terms": False},
                                         recipe=recipe, inputs={},
                                         quantised=[{"name": n, "numel": sd[n].numel()} for n in q]))

    # a hand-edited recipe is a clear error (it was torch's "negative dimension" from this path)
    for hidden, expect in (([-5], "negative dimension"), ([10**9], r"\[1000000000, 64\] in the recipe")):
        manifest({"name": "mlp", "kwargs": dict(kwargs, hidden=hidden)})
        with pytest.raises(ExportError, match=f"{expect}.*was the recipe edited"):
            export_run(run, allow_unfixed=True)
        assert not (run / "export").exists()
    manifest({"name": "mlp", "kwargs": kwargs})
    result = export_run(run, allow_unfixed=True)
    assert result["unfixed_weights"] == int((~fixed).sum())
    back = load_packed_model(run / "export" / "model.pwfn")
    point = bayes.to_point_estimate(bmodel)
    assert_same_model(point, back, torch.randn(2, 64))
    assert not (run / "report.json").exists()  # an unfinished run must not look finished
    assert json.loads((run / "export" / "size.json").read_text())["unfixed"]["weights"] == result["unfixed_weights"]


# --------------------------------------------------------------------------- sizes


def test_resnet20_packed_size_is_within_the_entropy_bound(resnet_run) -> None:
    folder, model, q = resnet_run
    size = json.loads((folder / "export" / "size.json").read_text())
    n = sum(model.state_dict()[k].numel() for k in q)
    assert 250_000 < n < 300_000 and size["weights"] == n
    quant, pf = size["quantised"], size["packed_file"]
    bound = quant["entropy_bound_bytes"]
    assert quant["per_tensor_entropy_bound_bytes"] <= bound + 1e-6
    assert quant["fixed_width_bytes"] > bound
    assert pf["overhead"] < 8192 and pf["manifest"] < 4096  # was ~16 KB of JSON before compression
    assert quant["packed_bytes"] <= 1.02 * bound
    assert quant["packed_bytes"] + pf["overhead"] <= 1.02 * bound + 8192
    assert pf["total"] == (folder / "export" / "model.pwfn").stat().st_size
    assert pf["total"] == pf["quantised_coded"] + pf["shared_tables"] + pf["raw_tensors"] + pf["overhead"]
    assert size["total"]["fp32_bytes"] == 4 * sum(t.numel() for t in model.state_dict().values())
    assert abs(sum(size["order_shares"].values()) - 1.0) < 1e-9
    assert set(size["order_shares"]) <= {"0", "1", "2", "3"}
    a = size["arithmetic"]
    assert a["multiplications_replaced"] + a["zeros_skipped"] + a["multiplications_kept_quantised"] == n
    assert a["multiplications_kept_quantised"] == 0 and a["shifts"] - a["adds"] == a["multiplications_replaced"]
    # whole model: every float value (BatchNorm parameters and statistics here) keeps its multiplication
    sd = model.state_dict()
    floats = sum(sd[k].numel() for k in sd if k not in set(q) and sd[k].is_floating_point())
    assert a["multiplications_kept"] == floats > 0
    assert size["coverage"]["share"] == pytest.approx(n / sum(t.numel() for t in sd.values()))
    assert set(size["per_tensor"]) == set(model.state_dict())
    # Merged into report.json, where `pwfn report` shows the totals.
    report = json.loads((folder / "report.json").read_text())
    assert report["size"]["total"]["packed_bytes"] == pf["total"]
    from pwfn.run.report import summarise_run_dir

    assert "size of the" in summarise_run_dir(folder) and "quantised weights" in summarise_run_dir(folder)


# --------------------------------------------------------------------------- CLI


def test_cli_export_end_to_end(tmp_path: Path, capsys) -> None:
    kwargs = {"in_features": 64, "hidden": [32], "num_classes": 10}
    top = tmp_path / "runs" / "demo"
    for method in ("wfn", "pwfn"):
        model, q = fixed_model("mlp", signed_terms=method == "wfn", **kwargs)
        write_run(top / method, model, {"name": "mlp", "kwargs": kwargs}, q, method=method)
    (top / "compare.json").write_text(json.dumps({"methods": {"wfn": {}, "pwfn": {}}}))
    # One method folder.
    assert cli_main(["export", str(top / "pwfn")]) == 0
    out = capsys.readouterr().out
    assert "packed / global entropy bound" in out and "fp16" in out and "multiplications" in out
    assert (top / "pwfn" / "export" / "model.pwfn").exists()
    # A comparison folder exports every method, into --out/<method>.
    assert cli_main(["export", str(top), "--out", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert out.count("exported") == 2
    for method in ("wfn", "pwfn"):
        load_packed_model(tmp_path / "exp" / method / "model.pwfn")
    # Errors: exit 2 with `pwfn: error:`.
    assert cli_main(["export", str(tmp_path / "nowhere")]) == 2
    assert "pwfn: error: run folder" in capsys.readouterr().err
    model, q = fixed_model("mlp", **kwargs)
    write_run(tmp_path / "half" / "pwfn", model, {"name": "mlp", "kwargs": kwargs}, q, fixed_fraction=0.5)
    assert cli_main(["export", str(tmp_path / "half" / "pwfn")]) == 2
    err = capsys.readouterr().err
    assert "pwfn: error:" in err and "not 100% fixed" in err and "--allow-unfixed" in err
    assert cli_main(["export", str(tmp_path / "half" / "pwfn"), "--allow-unfixed"]) == 0
    assert "WARNING: not 100% fixed" in capsys.readouterr().out


def test_cli_onnx_export_or_clear_skip(tmp_path: Path, capsys, monkeypatch) -> None:
    kwargs = {"in_channels": 1, "num_classes": 10, "input_size": 28}
    model, q = fixed_model("lenet5", **kwargs)
    run = write_run(tmp_path / "l" / "pwfn", model, {"name": "lenet5", "kwargs": kwargs}, q)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        have_onnx = True
    except ImportError:
        have_onnx = False
    if have_onnx:
        assert cli_main(["export", str(run), "--onnx"]) == 0
        assert "checked with onnxruntime" in capsys.readouterr().out
        assert (run / "export" / "model.onnx").stat().st_size > 1000
        files = json.loads((run / "export" / "model.json").read_text())["files"]
        assert "model.onnx" in files
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    assert cli_main(["export", str(run), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "onnx: skipped" in out and "pip install '.[onnx]'" in out
    assert not (run / "export" / "model.onnx").exists()  # the earlier one would be stale


# --------------------------------------------------------------------------- atomicity


def test_a_refused_or_failed_export_leaves_the_previous_one_intact(tmp_path: Path, monkeypatch) -> None:
    kwargs = {"in_features": 64, "hidden": [16], "num_classes": 10}
    model, q = fixed_model("mlp", **kwargs)
    run = write_run(tmp_path / "r" / "pwfn", model, {"name": "mlp", "kwargs": kwargs}, q)
    export_run(run)
    before = {f: (run / "export" / f).read_bytes() for f in os.listdir(run / "export")}
    # A failure while packing: nothing is written.
    import pwfn.export as E

    def boom(*a, **k):
        raise packing.PackError("simulated")

    monkeypatch.setattr(E.packing, "pack", boom)
    with pytest.raises(PwfnError, match="simulated"):
        export_run(run)
    monkeypatch.undo()
    after = {f: (run / "export" / f).read_bytes() for f in os.listdir(run / "export")}
    assert after == before  # no temp files either
    assert_same_model(model, load_packed_model(run / "export" / "model.pwfn"), torch.randn(2, 64))


def test_not_a_run_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="is it a pwfn method folder"):
        export_run(tmp_path / "empty")


# --------------------------------------------------------------------------- benchmark smoke


def test_benchmark_dry_run(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_size.py"
    spec = importlib.util.spec_from_file_location("export_size_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "export_size.json").read_text())["rows"]
    assert rows and all(r["within_target"] and r["reloads_identical"] for r in rows)
    assert "packed/bound" in (tmp_path / "export_size.md").read_text()
