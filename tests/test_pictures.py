"""Pictures, logs and inspection of a real (tiny) comparison: `pwfn plot`, `report --plot`,
`pwfn inspect`, metrics.csv, the INFO round line, TensorBoard, and compare.json times on a rerun."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pwfn.cli import main as cli_main
from pwfn.errors import ArtefactError, PwfnError

ROOT = Path(__file__).resolve().parent.parent

TINY = ["progress=false", "baseline.epochs=3", "pwfn.round_epochs=0.3", "pwfn.first_round_epochs=0.1",
        "pwfn.mc_samples=1", "wfn.round_epochs=0.3", "data.batch_size=64", "model.kwargs={hidden: [16]}",
        "data.train_subset=300", "contract.enforce=false"]  # mechanics; the contract has its own tests


def _compare_args(out: Path, name: str, *extra: str) -> list[str]:
    args = ["compare", "digits_mlp", "--out", str(out), "--no-progress", "--set", f"name={name}"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished comparison on the digits config (by name), exported."""
    out = tmp_path_factory.mktemp("runs")
    assert cli_main(_compare_args(out, "cmp")) == 0
    assert cli_main(["export", str(out / "cmp")]) == 0
    return out / "cmp"


def _decode(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size, np.asarray(im.convert("RGB"))


def _assert_picture(path: Path, kind: str) -> None:
    from pwfn.tools.plot import expected_size, png_size

    assert path.is_file(), path
    size, pixels = _decode(path)  # decodes (a truncated or invalid PNG raises here)
    assert size == expected_size(kind) == png_size(path), (path, size)
    # not blank: many colours, and a good share of pixels that are not the background
    colours = len({tuple(p) for p in pixels.reshape(-1, 3)[::7].tolist()})
    assert colours > 20, (path, colours)
    background = pixels[0, 0]
    drawn = (abs(pixels.astype(int) - background.astype(int)).sum(axis=2) > 30).mean()
    assert drawn > 0.02, (path, drawn)


def test_plot_writes_every_picture_of_a_comparison(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pics"
    assert cli_main(["plot", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = {"rounds.png": "rounds", "compare.png": "compare", "weights_wfn.png": "weights",
                "weights_pwfn.png": "weights", "layers_wfn.png": "layers", "layers_pwfn.png": "layers"}
    assert {p.name for p in out.iterdir()} == set(expected)
    for name, kind in expected.items():
        _assert_picture(out / name, kind)
        assert f"wrote {out / name}" in printed


def test_report_plot_draws_a_method_folder(run, capsys):
    pytest.importorskip("matplotlib")
    assert cli_main(["report", str(run / "pwfn"), "--plot"]) == 0
    text = capsys.readouterr().out
    assert "method: pwfn" in text and "codebook (" in text and "per layer:" in text
    plots = run / "pwfn" / "plots"
    assert {p.name for p in plots.iterdir()} == {"rounds.png", "weights_pwfn.png", "layers_pwfn.png"}
    for name, kind in [("rounds.png", "rounds"), ("weights_pwfn.png", "weights"), ("layers_pwfn.png", "layers")]:
        _assert_picture(plots / name, kind)


def test_the_float_distribution_is_recorded_by_every_run(run, tmp_path):
    """The weights picture draws the float model under the fixed one from the run's own report, also for a
    pwfn.compress folder, which has no baseline.pt: the histogram counts every quantised float weight."""
    import numpy as np
    import torch
    from torch import nn

    import pwfn
    from pwfn.run.rundata import float_histogram, read_method

    for method in ("wfn", "pwfn"):  # a comparison's methods
        hist = float_histogram(read_method(run / method))
        report = json.loads((run / method / "report.json").read_text())
        assert hist is not None and sum(hist["counts"]) == report["final"]["n_weights"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    float_weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    pwfn.compress(model, data, data, method="wfn", run_dir=tmp_path / "mine",
                  config={"progress": False, "wfn": {"fractions": [0.5, 1.0], "round_epochs": 0.5}})
    assert not (tmp_path / "baseline.pt").exists()
    hist = float_histogram(read_method(tmp_path / "mine"))
    expected, _ = np.histogram(float_weights.astype(np.float64), bins=np.asarray(hist["edges"]))
    assert hist["counts"] == expected.tolist()  # numpy's histogram of the float model, on the same edges
    assert hist["edges"][0] == float(float_weights.min()) and hist["edges"][-1] == float(float_weights.max())
    if importlib.util.find_spec("matplotlib") is not None:
        from pwfn.tools.plot import plot_run_dir

        (path,) = [p for p in plot_run_dir(tmp_path / "mine", tmp_path / "pics") if p.name == "weights_wfn.png"]
        _assert_picture(path, "weights")


def test_plot_without_matplotlib_says_what_to_install(run, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from pwfn.tools.plot import plot_run_dir

    with pytest.raises(PwfnError, match=r"pip install '\.\[plot\]'"):
        plot_run_dir(run, run / "never")
    assert not (run / "never").exists()


def test_plot_of_a_non_run_folder_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "is it a pwfn run folder?" in capsys.readouterr().err


def test_report_shows_codebook_terms_sizes_and_layers(run, capsys):
    report = json.loads((run / "wfn" / "report.json").read_text())
    assert cli_main(["report", str(run / "wfn")]) == 0
    text = capsys.readouterr().out
    codebook = report["final"]["codebook"]
    assert f"codebook ({len(codebook)} values):" in text
    assert "size of the" in text and "entropy bound" in text and "packed" in text  # exported: packed bytes too
    layers = [line for line in text.splitlines() if line.startswith("| net.")]
    assert [line.split(" | ")[0] for line in layers] == ["| net.1", "| net.3"]
    assert all("| 100.0 |" in line for line in layers)  # every parameter of both layers quantised


def test_per_layer_table_counts_every_parameter(run):
    import numpy as np
    from safetensors.numpy import load_file

    from pwfn.run.rundata import layer_table, read_method

    rows = {r["layer"]: r for r in layer_table(read_method(run / "pwfn"))}
    tensors = load_file(str(run / "pwfn" / "point_model.safetensors"))
    for layer in ("net.1", "net.3"):
        w, b = tensors[f"{layer}.weight"], tensors[f"{layer}.bias"]
        assert rows[layer]["params"] == w.size + b.size
        values, counts = np.unique(np.concatenate([w.ravel(), b.ravel()]), return_counts=True)
        p = counts / counts.sum()
        assert rows[layer]["unique"] == len(values)
        assert rows[layer]["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
        assert rows[layer]["packed_bits"] is not None and rows[layer]["packed_bits"] > 0


def test_coverage_section_of_the_report_is_used_when_present(tmp_path, run):
    import shutil

    from pwfn.run.rundata import layer_table, read_method

    folder = tmp_path / "wfn"
    shutil.copytree(run / "wfn", folder)
    rep = json.loads((folder / "report.json").read_text())
    rep["coverage"] = {"owners": {"net.1": {"quantised": 1, "total": 4}}}
    (folder / "report.json").write_text(json.dumps(rep))
    rows = {r["layer"]: r for r in layer_table(read_method(folder))}
    assert rows["net.1"]["coverage"] == 0.25 and rows["net.3"]["coverage"] == 1.0


def test_inspect_describes_the_packed_file(run, capsys):
    from pwfn.export import load_packed_model  # noqa: F401 - the artefact is the export's
    from pwfn.tools.inspection import inspect_file

    path = run / "pwfn" / "export" / "model.pwfn"
    info = inspect_file(path)
    size = json.loads((run / "pwfn" / "export" / "size.json").read_text())
    assert info["header"]["bytes"] == path.stat().st_size == size["packed_file"]["total"]
    assert len(info["codebook"]) == size["codebook_size"]
    assert sum(c["weights"] for c in info["codebook"]) == size["quantised"]["numel"]
    for c in info["codebook"]:  # each value equals the sum of its power-of-two terms
        assert sum(s * 2.0**e for s, e in c["terms"]) == c["value"]
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["net.1.weight"]["shape"] == [16, 64]
    assert sum(int(v) for v in by_name["net.1.weight"]["symbol_counts"].values()) == 16 * 64
    assert info["checksums"]["file_sha256_verified"]
    assert cli_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "net.1.weight | 16x64 | float32 | quantised" in text and "file SHA-256:" in text
    assert cli_main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["quantised_tensors"] == 4


def test_inspect_refuses_a_damaged_file(run, tmp_path, capsys):
    data = bytearray((run / "wfn" / "export" / "model.pwfn").read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "bad.pwfn"
    bad.write_bytes(bytes(data))
    from pwfn.tools.inspection import inspect_file

    with pytest.raises(ArtefactError, match="checksum mismatch"):
        inspect_file(bad)
    assert cli_main(["inspect", str(bad)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "missing.pwfn")]) == 2


def test_power_of_two_terms_are_exact():
    from pwfn.run.report import format_terms, power_of_two_terms

    assert power_of_two_terms(0.0) == []
    assert power_of_two_terms(0.375) == [(1, -2), (1, -3)]
    assert power_of_two_terms(-0.0703125) == [(-1, -4), (-1, -7)]
    assert power_of_two_terms(0.1) is None  # not a short sum of powers of two
    assert format_terms([(1, -2), (1, -3)]) == "2^-2 + 2^-3"
    assert format_terms([(-1, -4), (-1, -7)]) == "-2^-4 - 2^-7"


def test_metrics_csv_matches_metrics_jsonl(run):
    for method in ("wfn", "pwfn"):
        rows = [json.loads(line) for line in (run / method / "metrics.jsonl").read_text().splitlines()]
        with open(run / method / "metrics.csv", newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(table) == len(rows) == 10
        for r, c in zip(rows, table):
            assert int(c["round"]) == r["round"]
            assert float(c["after_fix.top1"]) == pytest.approx(r["after_fix"]["top1"])
            assert int(c["unique"]) == r["unique"]
            assert float(c["entropy"]) == pytest.approx(r["entropy"])
        assert list(table[0])[:3] == ["round", "fraction", "fixed_fraction"]


@pytest.mark.slow
def test_round_summary_is_logged_at_info_without_a_terminal(tmp_path):
    """Output to a file (no terminal, no -v): one INFO line per round and the baseline line."""
    args = [sys.executable, "-m", "pwfn", "run", "digits_mlp", "--method", "wfn", "--out", str(tmp_path),
            "--set", "name=logged"]
    for item in TINY + ["wfn.fractions=[0.5, 1.0]"]:
        args += ["--set", item]
    with open(tmp_path / "log.txt", "w") as fh:
        proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=600)
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("INFO pwfn.run.pipeline: wfn round")]
    assert len(lines) == 2, text
    assert "wfn round 1/2: 50.0% fixed, val top-1" in lines[0] and "bits" in lines[0]
    assert "wfn round 2/2: 100.0% fixed" in lines[1]
    assert "INFO pwfn.run.experiment: float baseline (trained): test top-1" in text
    assert "checksum" not in text  # per-rank checksums are -v (debug) only
    quiet = subprocess.run([*args[:3], "-q", *args[3:]], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr


def test_round_line_and_csv_helpers():
    from pwfn.run.runlog import metrics_csv_text, round_line

    row = {"round": 2, "fraction": 0.6, "fixed_fraction": 0.6, "after_fix": {"top1": 90.5},
           "after_train": {"top1": 91.25, "train": {"loss": 0.3}}, "unique": 12, "entropy": 2.5,
           "wall_seconds": 3.25, "codebook": [0.5], "engine": {"order": 2}}
    assert round_line("pwfn", row, 10) == ("pwfn round 3/10: 60.0% fixed, val top-1 91.25 (after fix 90.50), "
                                           "unique 12, entropy 2.500 bits, 3.2 s")
    text = metrics_csv_text([row, {"round": 3, "fraction": 1.0, "after_fix": {"top1": 80.0}}])
    lines = text.splitlines()
    assert lines[0].split(",")[:5] == ["round", "fraction", "fixed_fraction", "after_fix.top1", "after_train.top1"]
    assert "codebook" not in lines[0] and "engine.order" in lines[0] and "after_train.train.loss" in lines[0]
    assert len(lines) == 3


def test_tensorboard_logger_writes_each_round():
    from pwfn.run.runlog import TensorBoardLogger

    class Writer:
        def __init__(self):
            self.calls, self.flushed, self.closed = [], 0, False

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            self.flushed += 1

        def close(self):
            self.closed = True

    w = Writer()
    tb = TensorBoardLogger("unused", writer=w)
    tb.log_round({"round": 0, "after_fix": {"top1": 50.0}, "unique": 4, "entropy": 1.5, "fixed_fraction": 0.2,
                  "sigma": {"mean": 0.01}, "entropy_nonzero": float("nan")})
    tb.close()
    assert ("accuracy/after_fix", 50.0, 1) in w.calls and ("codebook/unique", 4.0, 1) in w.calls
    assert ("sigma/mean", 0.01, 1) in w.calls
    assert not any(tag == "codebook/entropy_bits_nonzero" for tag, _, _ in w.calls)  # nan is left out
    assert w.flushed == 1 and w.closed


def test_tensorboard_option_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from pwfn.model.config import load_config
    from pwfn.run.experiment import run_method

    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=tb", "tensorboard=true", "wfn.fractions=[0.5, 1.0]"])
    run_method(cfg, "wfn")
    events = list((tmp_path / "tb" / "wfn" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("codebook/unique")]
    assert steps == [1, 2]


def test_rerun_of_a_finished_compare_keeps_each_methods_time(tmp_path, capsys):
    args = _compare_args(tmp_path, "again", "wfn.fractions=[0.5, 1.0]", "pwfn.fractions=[0.5, 1.0]")
    assert cli_main(args) == 0
    first = json.loads((tmp_path / "again" / "compare.json").read_text())
    # make the recorded times unmistakable, then run the finished comparison again
    first["methods"]["wfn"]["seconds"] = 1234.5
    first["methods"]["pwfn"]["seconds"] = 678.25
    (tmp_path / "again" / "compare.json").write_text(json.dumps(first))
    assert cli_main(args) == 0
    second = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert second["methods"]["wfn"]["seconds"] == 1234.5
    assert second["methods"]["pwfn"]["seconds"] == 678.25
    rows = {r["method"]: r for r in second["table"]}
    assert rows["wfn"]["seconds"] == 1234.5 and rows["float"]["seconds"] == first["baseline"]["seconds"]
    capsys.readouterr()


def test_resumed_method_adds_the_earlier_rounds_time(tmp_path):
    from pwfn.run.experiment import _method_seconds

    done = [{"wall_seconds": 2.0}, {"wall_seconds": 3.0}]
    assert _method_seconds(1.0, [], 4, None) == 1.0  # fresh
    assert _method_seconds(1.0, done, 4, None) == 6.0  # resumed mid-way: earlier rounds + this session
    assert _method_seconds(1.0, done, 2, {"seconds": 40.0}) == 40.0  # finished before: kept
    assert _method_seconds(1.0, done, 2, None) == 6.0  # finished before, no earlier comparison


def test_logging_default_levels():
    from argparse import Namespace

    from pwfn.cli import _log_level

    assert _log_level(Namespace(quiet=False, verbose=0)) == logging.INFO
    assert _log_level(Namespace(quiet=False, verbose=1)) == logging.DEBUG
    assert _log_level(Namespace(quiet=True, verbose=0)) == logging.WARNING
