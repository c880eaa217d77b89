"""Hugging Face-style sharing (issue 24): save_pretrained / from_pretrained, local folders only."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export import fixed_model, write_run
from torch import nn

import pwfn
from pwfn.export import ExportError, export_run
from pwfn.export.hub import HubError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: huggingface_hub is told so, and any connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


KW = {"in_features": 64, "hidden": [16], "num_classes": 10}


def _run(tmp_path: Path, contract: Any = None) -> tuple[Path, nn.Module]:
    model, q = fixed_model("mlp", **KW)
    run = write_run(tmp_path / "demo" / "pwfn", model, {"name": "mlp", "kwargs": KW}, q)
    report = json.loads((run / "report.json").read_text())
    report["pre"] = {"initial": {"top1": 52.5}}
    report["task"] = {"name": "classification", "primary": "top1", "higher_is_better": True}
    if contract is not None:
        report["contract"] = contract
    (run / "report.json").write_text(json.dumps(report))
    return run, model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_a_run_with_its_model_card(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    contract = {"metric": "top1", "max_drop": 1.0, "held": True}
    run, model = _run(tmp_path, contract)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    out = tmp_path / "shared"
    result = pwfn.save_pretrained(run, out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.pwfn", "size.json", "model.json",
                                                 "README.md"}
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")} == before
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: pwfn\n")
    described = json.loads((out / "model.json").read_text())
    k = len(described["codebook"])
    assert f"| unique values | {k} |" in card and "| top1 (fixed, point model) | 50.00 |" in card
    assert "| top1 (float model) | 52.50 |" in card and "| change | -2.50 |" in card
    assert "| max_drop | 1.0 |" in card and "| held | True |" in card  # the accuracy contract
    assert "bits per weight" in card and "2^-" in card  # entropy and the codebook's terms
    assert result["card"] == card
    for packed in (False, True):
        assert _same(pwfn.from_pretrained(out, packed=packed), model)
    pwfn.save_pretrained(run, out)  # provably pwfn's: replaced


def test_a_run_without_a_contract_says_so(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    run, _ = _run(tmp_path)
    card = pwfn.save_pretrained(run, tmp_path / "s")["card"]
    assert "recorded no accuracy contract" in card


@dataclass
class _Result:  # what pwfn.compress returns, as far as sharing is concerned
    method: str
    point_model: nn.Module
    report: dict
    history: list = field(default_factory=list)


def _result(model: nn.Module, q: list[str]) -> _Result:
    from pwfn.core import metrics as M

    values = torch.cat([model.state_dict()[n].reshape(-1) for n in q])
    cb, _ = M.codebook(values)
    report = {"method": "pwfn", "quantised_tensors": q, "task": {"primary": "top1"},
              "final": {"codebook": [float(v) for v in cb.tolist()], "test": {"top1": 90.0}, "entropy": 2.5},
              "pre": {"initial": {"top1": 91.0}}}
    return _Result("pwfn", model, report)


class HubNet(nn.Module):
    """A user's class with huggingface_hub's mixin (made one when the extra is installed)."""


try:
    from huggingface_hub import PyTorchModelHubMixin

    class HubNet(nn.Module, PyTorchModelHubMixin):  # type: ignore[no-redef]
        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.fc = nn.Linear(64, width)
            self.out = nn.Linear(width, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))
except ImportError:  # pragma: no cover - the test using it skips
    pass


def test_a_compress_result_of_a_hub_mixin_class_loads_with_the_class_own_from_pretrained(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    from test_export import codebook_values, snap

    model = HubNet(width=12).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(snap(p * 2, codebook_values()))
    q = [n for n, _ in model.named_parameters()]
    out = tmp_path / "hub"
    result = pwfn.save_pretrained(_result(model, q), out)
    assert result["recipe"] == {"factory": "test_hub:HubNet", "kwargs": {"width": 12}}
    assert json.loads((out / "config.json").read_text()) == {"width": 12}
    assert "| top1 (float model) | 91.00 |" in result["card"]
    assert _same(pwfn.from_pretrained(out), model)
    assert _same(HubNet.from_pretrained(out), model)  # huggingface_hub's own loader, from the local folder


def test_an_export_folder_can_be_shared_too(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    run, model = _run(tmp_path, {"max_drop": 0.5})
    export_run(run)
    result = pwfn.save_pretrained(run / "export", tmp_path / "from_export")
    assert "| max_drop | 0.5 |" in result["card"]  # the run's report, found through the export's source
    assert _same(pwfn.from_pretrained(tmp_path / "from_export", packed=True), model)


def test_from_pretrained_reads_local_folders_only(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="local folders only.*snapshot_download"):
        pwfn.from_pretrained("some-org/some-model")
    (tmp_path / "f").write_text("x")
    with pytest.raises(HubError, match="is not a folder"):
        pwfn.from_pretrained(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pwfn.export.ArtefactError, match="save_pretrained"):
        pwfn.from_pretrained(tmp_path / "empty")


def test_save_pretrained_refuses_cleanly_without_huggingface_hub(tmp_path: Path, monkeypatch) -> None:
    run, _ = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails
    with pytest.raises(HubError, match=r"huggingface_hub, which is not installed: pip install .*'hf' extra") as info:
        pwfn.save_pretrained(run, tmp_path / "out")
    assert "pip install '.[hf]'" in str(info.value)  # the command pwfn.common.hints gives for a clone
    assert not (tmp_path / "out").exists()
    run2 = tmp_path / "demo" / "pwfn"
    assert _same(pwfn.export.load_packed_model(export_run(run2)["out_dir"] + "/model.pwfn"),
                 fixed_model("mlp", **KW)[0])  # exporting and loading need no huggingface_hub


def test_save_pretrained_never_replaces_a_folder_of_the_users(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    run, _ = _run(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(ExportError, match="not a pwfn export"):
        pwfn.save_pretrained(run, out)
    assert (out / "README.md").read_text() == "my notes"
