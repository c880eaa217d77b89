"""A run folder you can trust (issue 14): one owner (the manifest), fingerprinted inputs, a lock,
validated reads, and every failure a clear ``pwfn: error:`` with exit 2.

Each test attacks a run folder the way a user (or a script) might and checks that the answer
is a clear error that changes nothing, or a correct result. Runs use the tiny digits config of
``tests/test_reliability.py`` with two rounds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn.common.io as pio
from pwfn.cli import main as cli_main
from pwfn.common.files import count_values
from pwfn.errors import StorageError, os_error_message
from pwfn.model.config import ConfigError, load_config
from pwfn.model.zoo import create_model
from pwfn.run.fingerprints import InputsChangedError
from pwfn.run.lock import LOCK_FILE, RunFolderBusyError, acquire, is_locked
from pwfn.run.manifest import (
    MANIFEST_FILE,
    DamagedPointModelError,
    RunFileError,
    load_manifest,
    read_metrics,
    read_point_model,
    read_report,
)
from pwfn.run.pipeline import compress, load_point_model

ROOT = Path(__file__).resolve().parents[1]

TINY = ["progress=false", "threads=1", "baseline.epochs=1", "pwfn.round_epochs=0.3", "pwfn.first_round_epochs=0.1",
        "pwfn.mc_samples=2", "wfn.round_epochs=0.3", "data.batch_size=64", "model.kwargs={hidden: [16]}",
        "data.train_subset=300", "pwfn.fractions=[0.5, 1.0]", "wfn.fractions=[0.5, 1.0]",
        "contract.enforce=false"]  # mechanics; the contract has its own tests


def _sets(extra=()):
    out = []
    for item in list(TINY) + list(extra):
        out += ["--set", item]
    return out


def _run_args(out: Path, name: str, extra=(), method: str = "pwfn"):
    return ["-q", "run", "--method", method, "--out", str(out), "--set", f"name={name}"] + _sets(extra)


def _cli(capsys, args) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _snapshot(root: Path, lock: bool = True) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: SHA-256 and mtime (a refused command must change neither).

    ``lock=False`` leaves out the lock files (a writer that took the lock records itself there)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (lock or p.name != LOCK_FILE):
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _doctor(folder: Path) -> tuple[int, str]:
    """``pwfn doctor FOLDER`` without the environment checks: (exit code, text)."""
    from pwfn.tools.doctor import check_run_dir, format_findings

    findings = check_run_dir(folder)
    return (1 if any(f.level == "problem" for f in findings) else 0), format_findings(findings)


def _clear_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("pwfn: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished (not exported) PWFN run: runs/base/pwfn."""
    out = tmp_path_factory.mktemp("runs")
    assert cli_main(_run_args(out, "base")) == 0
    return out / "base"


def _copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "base"
    shutil.copytree(finished, dst)
    (dst / LOCK_FILE).unlink(missing_ok=True)
    return dst


# --------------------------------------------------------------------------------------------
# 1. the manifest owns the folder


def test_manifest_records_method_engine_recipe_tensors_codebook_and_inputs(finished):
    m = load_manifest(finished / "pwfn")
    assert m["status"] == "finished" and m["method"] == "pwfn" and m["version"] == 1
    assert m["engine"] == {"b": 7, "max_order": 4, "signed_terms": False}
    assert m["recipe"] == {"name": "mlp", "kwargs": {"hidden": [16], "num_classes": 10, "in_features": 64}}
    assert [q["name"] for q in m["quantised"]] == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    first = m["quantised"][0]
    assert first["numel"] == 16 * 64 and isinstance(first["shared"], list) and isinstance(first["owner"], str)
    assert m["codebook"] and m["codebook"] == sorted(m["codebook"])
    data = m["inputs"]["data"]
    assert data["train"]["kind"] == "arrays" and data["train"]["n"] == 300 and len(data["train"]["sha256"]) == 64
    assert data["input_shape"] == [1, 8, 8] and data["num_classes"] == 10
    assert set(m["inputs"]["model"]) == {"architecture", "weights"}
    # the point model is the one the manifest vouches for, in the one checksummed format
    raw = (finished / "pwfn" / "point_model.safetensors").read_bytes()
    assert m["point_model"]["sha256"] == hashlib.sha256(raw).hexdigest()
    desc, state = read_point_model(finished / "pwfn", m)
    assert desc["format"] == "pwfn-point-model" and list(state) == m["point_model"]["tensors"]
    assert isinstance(load_point_model(finished / "pwfn"), nn.Module)


def test_export_reads_settings_from_the_manifest_not_the_config(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    # config.yaml says b = 3: export must not re-derive b (or reload the data) from it
    for cfg in (run / "config.yaml", run / "pwfn" / "config.yaml"):
        cfg.write_text(cfg.read_text().replace("b: 7", "b: 3"))
    (run / "pwfn" / "config.yaml").write_text("not: [valid")
    rc, _, err = _cli(capsys, ["export", run / "pwfn"])
    assert rc == 0, err
    size = json.loads((run / "pwfn" / "export" / "size.json").read_text())
    assert size["b"] == 7


# --------------------------------------------------------------------------------------------
# 2. resume refuses changed inputs


def test_replaced_model_checkpoint_is_refused_naming_it(tmp_path, capsys):
    ckpt = tmp_path / "float.pt"
    torch.manual_seed(0)
    torch.save(create_model("mlp", in_features=64, hidden=[16], num_classes=10).state_dict(), ckpt)
    args = _run_args(tmp_path / "runs", "ck", [f"model.checkpoint={ckpt}"])
    assert _cli(capsys, args)[0] == 0
    torch.manual_seed(1)
    torch.save(create_model("mlp", in_features=64, hidden=[16], num_classes=10).state_dict(), ckpt)
    before = _snapshot(tmp_path / "runs")
    rc, _, err = _cli(capsys, args)
    _clear_error(rc, err, "model.checkpoint file changed", "--fresh")
    assert _snapshot(tmp_path / "runs") == before
    rc, _, err = _cli(capsys, args + ["--fresh"])
    assert rc == 0, err


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_root(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 240), ("t10k", 80)):
        labels = rng.integers(0, 10, n)
        images = (rng.random((n, 8, 8)) * 40 + labels[:, None, None] * 20).astype(np.uint8)
        _write_idx(root / f"{split}-images-idx3-ubyte", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def test_data_files_replaced_between_kill_and_resume_are_refused(tmp_path, capsys):
    from pwfn.run.experiment import run_method

    data = _mnist_root(tmp_path / "mnist")
    extra = ["data.name=mnist", f"data.root={data}", "data.train_subset=null"]
    args = _run_args(tmp_path / "runs", "m", extra)

    def stop_after_round_one(state):  # "killed" right after the first round's checkpoint
        assert state.checkpoint is not None and state.checkpoint.exists()
        raise KeyboardInterrupt

    cfg = load_config(None, TINY + extra + [f"out_dir={tmp_path / 'runs'}", "name=m"])
    with pytest.raises(KeyboardInterrupt):
        run_method(cfg, "pwfn", callbacks=[stop_after_round_one])
    blob = bytearray((data / "train-images-idx3-ubyte").read_bytes())
    blob[-1] ^= 0xFF  # one pixel of one training image changed on disk
    (data / "train-images-idx3-ubyte").write_bytes(bytes(blob))
    before = _snapshot(tmp_path / "runs")
    rc, _, err = _cli(capsys, args)
    _clear_error(rc, err, "the data changed", "train split")
    assert _snapshot(tmp_path / "runs") == before
    blob[-1] ^= 0xFF  # restored: the resume goes on
    (data / "train-images-idx3-ubyte").write_bytes(bytes(blob))
    rc, _, err = _cli(capsys, args)
    assert rc == 0, err


def _loaders(seed: int = 0, n: int = 96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=32, shuffle=True), DataLoader(ds, batch_size=64)


API_CFG = {"progress": False, "pwfn": {"fractions": [0.5, 1.0], "round_epochs": 0.5, "first_round_epochs": 0.1,
                                       "mc_samples": 2},
           "wfn": {"fractions": [0.5, 1.0], "round_epochs": 0.5}}


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_compress_another_model_or_data_into_a_finished_run_dir_is_refused(method, tmp_path):
    run_dir = tmp_path / "r"
    train, val = _loaders()
    first = compress(_net(0), train, val, method=method, config=API_CFG, run_dir=run_dir)
    fingerprint = load_manifest(run_dir)["inputs"]["model"]
    before = _snapshot(run_dir)
    with pytest.raises(InputsChangedError, match=r"the model to fix changed \(its weights differ\).*resume=False"):
        compress(_net(1), train, val, method=method, config=API_CFG, run_dir=run_dir)
    other_train, other_val = _loaders(seed=5)
    with pytest.raises(InputsChangedError, match="the data changed"):
        compress(_net(0), other_train, other_val, method=method, config=API_CFG, run_dir=run_dir)
    assert _snapshot(run_dir) == before
    # the same inputs resume (to the same weights); resume=False starts over with the new model
    again = compress(_net(0), train, val, method=method, config=API_CFG, run_dir=run_dir)
    want, got = first.point_model.state_dict(), again.point_model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    compress(_net(1), train, val, method=method, config=API_CFG, run_dir=run_dir, resume=False)
    assert load_manifest(run_dir)["inputs"]["model"]["weights"] != fingerprint["weights"]
    assert load_manifest(run_dir)["inputs"]["model"]["architecture"] == fingerprint["architecture"]


def test_compress_with_an_empty_or_unfit_loader_is_refused(tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    _, val = _loaders()
    with pytest.raises(ConfigError, match="training loader yields no batch"):
        compress(_net(0), empty, val, method="wfn", config=API_CFG, run_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()
    train, val = _loaders()
    two = nn.Sequential(nn.Linear(8, 2))  # labels go up to 3
    with pytest.raises(ConfigError, match=r"training loader's labels .*3.* model outputs 2 classes|model outputs 2 "
                                          r"classes but the training loader's labels go up to 3"):
        compress(two, train, val, method="wfn", config=API_CFG, run_dir=tmp_path / "u")
    wide = nn.Sequential(nn.Linear(5, 4))  # inputs have 8 features
    with pytest.raises(ConfigError, match="cannot take the training loader's batches"):
        compress(wide, train, val, method="pwfn", config=API_CFG, run_dir=tmp_path / "w")
    assert not (tmp_path / "u").exists() and not (tmp_path / "w").exists()


# --------------------------------------------------------------------------------------------
# 3. the lock


HOLDER = r"""
import sys, time
from pwfn.run.lock import acquire
lock = acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _hold(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_fails_at_once_and_changes_nothing(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    holder = _hold(run)
    try:
        before = _snapshot(run)
        t0 = time.perf_counter()
        rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "base"))
        _clear_error(rc, err, "is in use by pid", str(holder.pid), "another name")
        assert time.perf_counter() - t0 < 5  # at once: before loading data or models
        rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "base", ["pwfn.k=2"]) + ["--fresh"])
        _clear_error(rc, err, "is in use")
        rc, _, err = _cli(capsys, ["export", run / "pwfn"])
        _clear_error(rc, err, "is in use")
        assert _snapshot(run) == before
        assert is_locked(run / "pwfn")["pid"] == holder.pid
        rc, out, _ = _cli(capsys, ["doctor", run])
        assert "is in use by pid" in out
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead holder: the OS drops its lock
        holder.wait()
    assert is_locked(run) is None
    rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "base"))
    assert rc == 0, err
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_and_released(tmp_path):
    a = acquire(tmp_path / "f")
    b = acquire(tmp_path / "f")
    b.release()
    assert is_locked(tmp_path / "f") is None  # our own lock never blocks us
    a.release()
    holder = _hold(tmp_path / "f")
    try:
        with pytest.raises(RunFolderBusyError, match=f"pid {holder.pid}"):
            acquire(tmp_path / "f")
    finally:
        holder.kill()
        holder.wait()
    acquire(tmp_path / "f").release()


# --------------------------------------------------------------------------------------------
# 4. every read validated; damaged point models never exported


def _rewrite_point_model(folder: Path, change) -> None:
    """Change the point model and reseal its own description (as a careful hand-edit would)."""
    st = folder / "point_model.safetensors"
    state = {k: change(v.clone()) for k, v in st_load(st.read_bytes()).items()}
    data = st_save(state)
    st.write_bytes(data)
    desc = json.loads((folder / "point_model.json").read_text())
    desc["files"]["point_model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "point_model.json").write_text(json.dumps(desc))


def _edit_description(folder: Path, **changes) -> None:
    desc = json.loads((folder / "point_model.json").read_text())
    desc.update(changes)
    (folder / "point_model.json").write_text(json.dumps(desc))


DAMAGE = [
    ("zeroed", lambda f: _rewrite_point_model(f, torch.zeros_like), "damaged"),
    ("nan", lambda f: _rewrite_point_model(f, lambda t: t.fill_(float("nan"))), "damaged"),
    ("zeroed unsealed", lambda f: (f / "point_model.safetensors").write_bytes(
        st_save({k: torch.zeros_like(v) for k, v in st_load((f / "point_model.safetensors").read_bytes()).items()})),
     "does not match the checksum"),
    ("changed recipe", lambda f: _edit_description(f, recipe={"name": "mlp", "kwargs": {"hidden": [32]}}), "recipe"),
    ("string recipe", lambda f: _edit_description(f, recipe="mlp"), "'recipe' should be an object"),
]


@pytest.mark.parametrize("label,damage,expect", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_point_model_is_never_exported_and_doctor_says_so(label, damage, expect, finished, tmp_path,
                                                                      capsys):
    run = _copy(finished, tmp_path)
    damage(run / "pwfn")
    rc, _, err = _cli(capsys, ["export", run / "pwfn"])
    _clear_error(rc, err, expect)
    assert not (run / "pwfn" / "export").exists()
    assert not list((run / "pwfn").glob(".export.*"))
    rc, out = _doctor(run / "pwfn")
    assert rc == 1 and "PROBLEM pwfn:" in out and expect in out, out
    with pytest.raises(RunFileError):
        load_point_model(run / "pwfn")


REPORTS = [
    ("list", "[]", "should be an object"),
    ("null", "null", "should be an object"),
    ("missing keys", '{"method": "pwfn"}', "lacks the key"),
    ("wrong types", None, "'rounds' should be a list"),
    ("deep", "[" * 100_000 + "]" * 100_000, "nests deeper than"),
    ("not json", "{oops", "is not valid JSON"),
]


@pytest.mark.parametrize("label,text,expect", REPORTS, ids=[r[0] for r in REPORTS])
def test_hand_edited_report_is_a_clear_error_everywhere(label, text, expect, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    path = run / "pwfn" / "report.json"
    if text is None:
        report = json.loads(path.read_text())
        report["rounds"] = "many"
        text = json.dumps(report)
    path.write_text(text)
    for cmd in (["report", run / "pwfn"], ["report", run / "pwfn", "--json"], ["export", run / "pwfn"]):
        rc, _, err = _cli(capsys, cmd)
        _clear_error(rc, err, "report.json", expect)
    rc, out = _doctor(run / "pwfn")
    assert rc == 1 and expect in out
    with pytest.raises(RunFileError, match=expect):
        read_report(path)


def test_garbage_metrics_line_and_compare_without_table(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "pwfn" / "report.json").unlink()
    lines = (run / "pwfn" / "metrics.jsonl").read_text().splitlines()
    (run / "pwfn" / "metrics.jsonl").write_text(lines[0] + "\n{garbage\n" + "\n".join(lines[1:]) + "\n")
    rc, _, err = _cli(capsys, ["report", run / "pwfn"])
    _clear_error(rc, err, "metrics.jsonl", "line 2")
    with pytest.raises(RunFileError, match="line 2"):
        read_metrics(run / "pwfn" / "metrics.jsonl")
    rc, out = _doctor(run / "pwfn")
    assert "line 2" in out
    (run / "compare.json").write_text(json.dumps({"methods": {"pwfn": {}}, "baseline": {}}))
    rc, _, err = _cli(capsys, ["report", run])
    _clear_error(rc, err, "compare.json", "lacks the key 'table'")


# --------------------------------------------------------------------------------------------
# 5. operating-system errors: clear, exit 2, nothing half-written


def _fail_writes(monkeypatch, name: str, code: int) -> None:
    real = pio._write_replace

    def failing(path, data):
        if Path(path).name == name:
            raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(pio, "_write_replace", failing)


@pytest.mark.parametrize("code,hint", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                       (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")])
def test_os_errors_during_a_run_are_clear_errors(code, hint, tmp_path, capsys, monkeypatch):
    _fail_writes(monkeypatch, "checkpoint.pt", code)
    rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "full"))
    _clear_error(rc, err, "cannot write", "checkpoint.pt", os.strerror(code), hint)
    assert not list((tmp_path / "runs").rglob(".*.tmp"))


def test_disk_full_during_export_leaves_nothing_half_written(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    _fail_writes(monkeypatch, "model.pwfn", errno.ENOSPC)
    rc, _, err = _cli(capsys, ["export", run / "pwfn"])
    _clear_error(rc, err, "No space left on device", "the disk is full")
    assert not (run / "pwfn" / "export").exists() and not list((run / "pwfn").glob(".export*"))
    monkeypatch.undo()
    assert _cli(capsys, ["export", run / "pwfn"])[0] == 0
    before = _snapshot(run, lock=False)
    _fail_writes(monkeypatch, "model.json", errno.ENOSPC)  # the last file: everything else already staged
    rc, _, err = _cli(capsys, ["export", run / "pwfn"])
    _clear_error(rc, err, "No space left on device")
    assert _snapshot(run, lock=False) == before  # the previous export and report.json untouched
    assert not list((run / "pwfn").glob(".export*"))


def test_paths_that_cannot_work_are_clear_errors(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (tmp_path / "afile").write_text("x")
    rc, _, err = _cli(capsys, ["export", run / "pwfn", "--out", tmp_path / "afile"])
    _clear_error(rc, err, "is a file, not a folder")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "mine.txt").write_text("keep me")
    rc, _, err = _cli(capsys, ["export", run / "pwfn", "--out", tmp_path / "stuff"])
    _clear_error(rc, err, "is not a pwfn export")
    assert (tmp_path / "stuff" / "mine.txt").read_text() == "keep me"
    rc, _, err = _cli(capsys, ["export", tmp_path / "afile"])
    _clear_error(rc, err, "is a file")
    rc, _, err = _cli(capsys, _run_args(tmp_path / "afile", "x"))  # --out is a file
    _clear_error(rc, err, "afile")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "taken").write_text("x")
    rc, _, err = _cli(capsys, _run_args(tmp_path / "o", "taken"))  # the run folder is a file
    _clear_error(rc, err, "is a file, not a folder")
    train, val = _loaders()
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        compress(_net(0), train, val, method="wfn", config=API_CFG, run_dir=tmp_path / "afile")
    rc, _, err = _cli(capsys, _run_args(tmp_path / "o", "n" * 300))
    _clear_error(rc, err, "300 bytes long", "255")
    assert sorted(os.listdir(tmp_path / "o")) == ["taken"]


def test_os_error_message_names_file_and_hint():
    exc = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "/x/" + "n" * 300)
    msg = os_error_message(exc, "cannot write")
    assert msg.startswith("cannot write '/x/nnn") and "ENAMETOOLONG" in msg and "at most 255 bytes" in msg
    err = StorageError(errno.ENOSPC, "cannot write 'a': full")
    assert isinstance(err, OSError) and str(err) == "cannot write 'a': full"


# --------------------------------------------------------------------------------------------
# 6/7. configs and settings


def _alias_bomb(levels: int = 9) -> str:
    lines = ["model:", "  kwargs:", "    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 2000  # a few hundred bytes that would expand to 9^9 values
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(path)
    rc, _, err = _cli(capsys, ["run", path, "--out", tmp_path / "runs"])
    _clear_error(rc, err, "nested YAML aliases")
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(None, ["model.kwargs=" + "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                           "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                           "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"])
    assert count_values({"a": list(range(10))}) is None
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError, match="is larger than"):
        load_config(big)


def test_special_files_as_config_or_checkpoint_are_named(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, what in ((fifo, "FIFO"), (Path("/dev/zero"), "a device"), (tmp_path, "a folder")):
        rc, _, err = _cli(capsys, ["run", path, "--out", tmp_path / "runs"])
        _clear_error(rc, err, what)
        rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "c", [f"model.checkpoint={path}"]))
        _clear_error(rc, err, "model.checkpoint", what)
    assert not (tmp_path / "runs").exists()


BAD_SETTINGS = [
    ("sigma floor 1e300", ["pwfn.sigma_floor=1e300"], "pwfn.sigma_floor"),
    ("sigma floor 10", ["pwfn.sigma_floor=10"], "must be < 1"),
    ("baseline lr 1e300", ["baseline.lr=1e300"], "baseline.lr"),
    ("k 1e300", ["pwfn.k=1e300"], "pwfn.k"),
    ("mps here", ["device=mps"], "MPS"),
    ("cuda here", ["device=cuda:7"], "device 'cuda:7'"),
    ("unknown device", ["device=xla"], "device"),
    ("num_classes 2 on 10 classes", ["model.kwargs={hidden: [16], num_classes: 2}"], "the model outputs 2 classes"),
    ("in_features wrong", ["model.kwargs={hidden: [16], in_features: 10}"], "cannot take the training data's"),
    ("misspelt kwarg", ["model.kwargs={hiden: [16]}"], "Did you mean 'hidden'"),
    ("yaml without space", ["model.kwargs={num_classes:2}"], "YAML needs a space after ':'"),
]


@pytest.mark.parametrize("label,extra,expect", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_bad_settings_are_clear_errors_before_anything_is_written(label, extra, expect, tmp_path, capsys):
    if label == "cuda here" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    rc, _, err = _cli(capsys, _run_args(tmp_path / "runs", "bad", extra))
    _clear_error(rc, err, expect)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# rerunning a finished, exported run keeps its export sections


def test_rerunning_a_finished_exported_run_keeps_size_and_export(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    assert _cli(capsys, ["export", run / "pwfn"])[0] == 0
    exported = json.loads((run / "pwfn" / "report.json").read_text())
    assert "size" in exported and "export" in exported
    assert _cli(capsys, _run_args(tmp_path / "runs", "base"))[0] == 0
    again = json.loads((run / "pwfn" / "report.json").read_text())
    assert again["size"] == exported["size"] and again["export"] == exported["export"]
    rc, out = _doctor(run / "pwfn")
    assert rc == 0 and "export verified" in out


# --------------------------------------------------------------------------------------------
# 6. SIGTERM is handled like Ctrl-C

DRIVER = r"""
import os, signal, sys
nth = int(sys.argv[1])
count = [0]
def bang(*a):
    count[0] += 1
    if count[0] == nth:
        os.kill(os.getpid(), signal.SIGTERM)
import torch.optim.optimizer as O
O.register_optimizer_step_post_hook(lambda opt, args, kwargs: bang())
from pwfn.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigterm_stops_cleanly_prints_the_resume_command_and_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    straight = _run_args(tmp_path / "a", "t")
    assert subprocess.run([sys.executable, "-m", "pwfn.cli"] + straight, cwd=ROOT, env=env,
                          capture_output=True).returncode == 0
    args = _run_args(tmp_path / "b", "t")
    # optimizer steps: 5 baseline, 1 warm-up, 2 in round 1: stop during round 1's training
    proc = subprocess.run([sys.executable, "-c", DRIVER, "7"] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "pwfn: terminated (SIGTERM)" in proc.stderr and "resume with the same command" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "b").rglob(".*.tmp"))
    assert (tmp_path / "b" / "t" / "pwfn" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "t" / "pwfn" / "report.json").exists()
    proc = subprocess.run([sys.executable, "-m", "pwfn.cli"] + args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = (tmp_path / "a" / "t" / "pwfn" / "point_model.safetensors").read_bytes()
    b = (tmp_path / "b" / "t" / "pwfn" / "point_model.safetensors").read_bytes()
    assert a == b


def test_sigterm_is_held_back_during_a_file_write(tmp_path):
    """A SIGTERM that arrives while a file is written is delivered once the file is complete."""
    from pwfn.cli import _sigterm_as_interrupt, _Terminated

    real = os.replace
    seen = []

    def replace(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives between fsync and rename
        seen.append(Path(src).exists())
        return real(src, dst)

    pio.os.replace = replace
    try:
        with pytest.raises(_Terminated), _sigterm_as_interrupt():
            pio.atomic_write_bytes(tmp_path / "f.bin", b"complete")
    finally:
        pio.os.replace = real
    assert seen == [True] and (tmp_path / "f.bin").read_bytes() == b"complete"
    assert not list(tmp_path.glob(".*.tmp"))


def test_damaged_point_model_error_type():
    assert issubclass(DamagedPointModelError, RunFileError)


# --------------------------------------------------------------------------------------------
# fingerprints and the manifest file itself


def test_image_folder_fingerprint_sees_replaced_files_and_samples_large_folders(tmp_path, monkeypatch):
    from PIL import Image

    import pwfn.run.fingerprints as man
    from pwfn.data import ImageFolderDataset

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (6, 6), (40 * i, 10, 200 if cls == "a" else 0)).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolderDataset.from_folder(tmp_path, image_size=4)
    fp = man._dataset_content(ds)
    assert fp["kind"] == "files" and fp["n"] == 6 and not fp["stat_sampled"]
    assert man._dataset_content(ImageFolderDataset.from_folder(tmp_path, image_size=4)) == fp
    Image.new("RGB", (7, 7), (1, 2, 3)).save(tmp_path / "a" / "1.png")  # same name, other content
    changed = man._dataset_content(ImageFolderDataset.from_folder(tmp_path, image_size=4))
    assert changed["sha256"] != fp["sha256"]
    monkeypatch.setattr(man, "MAX_STAT_FILES", 2)  # a huge folder: names always, sizes of a sample
    sampled = man._dataset_content(ImageFolderDataset.from_folder(tmp_path, image_size=4))
    assert sampled["stat_sampled"] and sampled["sha256"] != changed["sha256"]


def test_model_fingerprint_separates_architecture_and_weights():
    from pwfn.run.fingerprints import model_fingerprint

    a, b = model_fingerprint(_net(0)), model_fingerprint(_net(1))
    assert a["architecture"] == b["architecture"] and a["weights"] != b["weights"]
    assert model_fingerprint(_net(0)) == a
    assert model_fingerprint(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)))["architecture"] != \
        a["architecture"]


MANIFESTS = [
    ("newer version", lambda m: m.update(version=99), "manifest version 99"),
    ("not a manifest", lambda m: m.update(format="x"), "is not a pwfn run manifest"),
    ("bad b", lambda m: m["engine"].update(b=99), "outside [0, 24]"),
    ("finished without point model", lambda m: m.update(point_model=None), "records no point model"),
]


@pytest.mark.parametrize("label,change,expect", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_an_edited_manifest_is_a_clear_error(label, change, expect, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    path = run / "pwfn" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    rc, _, err = _cli(capsys, ["export", run / "pwfn"])
    _clear_error(rc, err, MANIFEST_FILE, expect)
    rc, out = _doctor(run / "pwfn")
    assert rc == 1 and expect in out


def test_an_export_killed_mid_write_leaves_only_a_staging_folder_that_is_reported_and_cleaned(finished, tmp_path,
                                                                                             capsys):
    run = _copy(finished, tmp_path)
    stale = run / "pwfn" / ".export.abc123.tmp-export"
    stale.mkdir()
    (stale / "model.pwfn").write_bytes(b"half")
    rc, out = _doctor(run / "pwfn")
    assert rc == 0 and "unfinished export folder(s)" in out
    assert _cli(capsys, ["export", run / "pwfn"])[0] == 0
    assert not stale.exists() and (run / "pwfn" / "export" / "model.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert (run / "pwfn" / "export").stat().st_mode & 0o777 == 0o777 & ~mask  # an ordinary folder, not 0700


def test_loader_fingerprint_of_an_ordered_loader_hashes_its_first_batch_whatever_its_layout():
    from pwfn.run.fingerprints import loader_fingerprint

    class Items(torch.utils.data.Dataset):  # a custom dataset: no content hash, so the first batch counts
        def __init__(self, shift):
            self.shift = shift

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.full((3,), float(i + self.shift)), "y": i % 2}

    a = DataLoader(Items(0), batch_size=4)
    fa = loader_fingerprint(a, next(iter(a)))
    assert fa["kind"] == "first batch" and fa["n"] == 8 and fa["batches"] == 2
    assert loader_fingerprint(a, next(iter(a))) == fa
    b = DataLoader(Items(1), batch_size=4)
    assert loader_fingerprint(b, next(iter(b)))["sha256"] != fa["sha256"]
    shuffled = DataLoader(Items(0), batch_size=4, shuffle=True)  # not deterministic: its size only
    assert loader_fingerprint(shuffled, next(iter(shuffled)))["kind"] == "size only"
