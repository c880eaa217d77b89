"""Reliability: interruption (SIGKILL, Ctrl-C), divergence and bad input never lose work or fail silently.

The interruption tests run the real CLI in a subprocess on a tiny digits config and kill it:
at wall-clock delays drawn from a seeded RNG, and at chosen points (an optimizer step of the
float baseline or of a round, inside the fixing engine, between writing a checkpoint's temp
file and renaming it). Rerunning the same command must finish with the bit-identical
``point_model.safetensors`` of an uninterrupted run. Those subprocess tests are marked ``slow``
(``make test-slow``, its own CI step); the rest of this file runs in ``make test``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pwfn.cli import main as cli_main
from pwfn.common.io import load_checkpoint, save_checkpoint
from pwfn.data import make_loaders
from pwfn.errors import ModelError, TrainingDivergedError
from pwfn.model.config import load_config
from pwfn.model.zoo import create_model
from pwfn.run.experiment import run_method
from pwfn.run.pipeline import FixingRun, compress
from pwfn.training.train import first_nonfinite_output, first_nonfinite_weight

ROOT = Path(__file__).resolve().parents[1]

TINY = ["progress=false", "threads=1", "baseline.epochs=3", "pwfn.round_epochs=0.5", "pwfn.first_round_epochs=0.2",
        "pwfn.mc_samples=2", "wfn.round_epochs=0.5", "data.batch_size=64", "model.kwargs={hidden: [16]}",
        "data.train_subset=300", "contract.enforce=false"]  # mechanics; the contract has its own tests


def _sets(extra=()):
    out = []
    for item in list(TINY) + list(extra):
        out += ["--set", item]
    return out


def _args(out: Path, name: str, method: str = "pwfn", extra=()):
    if method == "compare":
        return ["compare", "--out", str(out), "--set", f"name={name}"] + _sets(extra)
    return ["run", "--method", method, "--out", str(out), "--set", f"name={name}"] + _sets(extra)


# A child process that runs the CLI, optionally with a fault injected: SIGKILL (or SIGINT) to
# itself at the n-th optimizer step, engine call, or checkpoint rename.
DRIVER = r"""
import os, signal, sys
target, nth, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
count = [0]
# Ctrl-C reaches Python as in a terminal, whatever the test process left inherited (a process started
# with SIGINT ignored keeps it ignored, and the test would then see no interruption at all)
signal.signal(signal.SIGINT, signal.default_int_handler)

def bang():
    count[0] += 1
    if count[0] == nth:
        os.kill(os.getpid(), sig)

if target == "step":  # after the n-th optimizer step (baseline and rounds alike)
    import torch.optim.optimizer as O
    O.register_optimizer_step_post_hook(lambda opt, args, kwargs: bang())
elif target == "fix":  # inside the n-th fixing round, before the engine runs
    import pwfn.training.fixer as F
    real_fix = F.fix_round
    def fix_round(*a, **k):
        bang()
        return real_fix(*a, **k)
    F.fix_round = fix_round
elif target.startswith("replace:"):  # the temp file of FILE is written and fsync'd, not yet renamed
    import pwfn.common.io as I
    name = target.split(":", 1)[1]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == name:
            bang()
        return real_replace(src, dst, *a, **k)
    I.os.replace = replace
from pwfn.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _popen(args, target="none", nth=0, sig="SIGKILL"):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", DRIVER, target, str(nth), sig] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_cli(args, target="none", nth=0, sig="SIGKILL", timeout=300):
    proc = _popen(args, target, nth, sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _point_bytes(folder: Path) -> bytes:
    return (folder / "point_model.safetensors").read_bytes()


def _assert_nothing_half_written(root: Path) -> None:
    """Every checkpoint, JSON and YAML file under ``root`` reads back whole (temp files aside)."""
    for path in root.rglob("*"):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        if path.name == "baseline.pt":
            load_checkpoint(path, kind="baseline")
        elif path.name == "checkpoint.pt":
            load_checkpoint(path, kind=f"run-{path.parent.name}")
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".yaml":
            load_config(path)


def _temps(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def _straight(out: Path, kind: str):
    t0 = time.perf_counter()
    rc, _, err = _run_cli(_args(out, kind, kind))
    assert rc == 0, err[-3000:]
    if kind == "compare":
        return {m: _point_bytes(out / kind / m) for m in ("wfn", "pwfn")}, time.perf_counter() - t0
    return _point_bytes(out / kind / "pwfn"), time.perf_counter() - t0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted CLI run: its final weights and its wall time."""
    return _straight(tmp_path_factory.mktemp("straight"), "pwfn")


@pytest.fixture(scope="module")
def straight_compare(tmp_path_factory):
    return _straight(tmp_path_factory.mktemp("straight"), "compare")


# --------------------------------------------------------------------------------------------
# SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_and_chosen_points_resumes_bit_identical(straight, tmp_path):
    want, seconds = straight
    rng = random.Random(20240607)
    args = _args(tmp_path, "killed", "pwfn")
    folder = tmp_path / "killed"
    plan = [
        ("delay", rng.uniform(0.0, 0.5)),  # very early: while importing, or before the baseline
        ("step", rng.randint(2, 14)),  # during the float baseline (15 steps)
        ("replace:baseline.pt", 1),  # while writing the baseline checkpoint
        ("step", rng.randint(4, 12)),  # during a fixing round's training
        ("replace:checkpoint.pt", rng.randint(1, 3)),  # while writing a round's checkpoint
        ("fix", rng.randint(1, 3)),  # during fixing
        ("delay", rng.uniform(0.5, seconds)),  # anywhere
        ("last", rng.uniform(0.0, 0.3)),  # during the last round (fix 100 %, report, point model)
        ("replace:point_model.safetensors", 1),  # while writing the final weights
    ]
    kills = 0
    for target, value in plan:
        if target == "delay":
            proc = _popen(args)
            time.sleep(value)
            proc.kill()
            proc.communicate(timeout=120)
        elif target == "last":
            proc = _popen(args)
            metrics = folder / "pwfn" / "metrics.jsonl"
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                try:
                    if len(metrics.read_text().splitlines()) >= 9:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            time.sleep(value)
            proc.kill()
            proc.communicate(timeout=120)
        else:
            proc = _popen(args, target, int(value))
            proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:  # the run got past the kill point (possible for the timed kills only)
            assert target in ("delay", "last") and proc.returncode == 0, (target, proc.returncode)
        _assert_nothing_half_written(tmp_path)
        if target.startswith("replace:"):
            assert _temps(tmp_path), "the injected kill hit between writing the temp file and renaming it"
        if (folder / "pwfn" / "report.json").exists() and target != "replace:point_model.safetensors":
            shutil.rmtree(folder / "pwfn")  # finished early: start the method again to keep killing it
    assert kills >= 7
    rc, _, err = _run_cli(args)
    assert rc == 0, err[-3000:]
    assert _point_bytes(folder / "pwfn") == want
    assert _temps(tmp_path) == [], "the resumed run removes temp files left by killed writes"
    rows = (folder / "pwfn" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == list(range(10))


@pytest.mark.slow
def test_sigkill_during_compare_resumes_bit_identical(straight_compare, tmp_path):
    want, seconds = straight_compare
    rng = random.Random(7)
    args = _args(tmp_path, "cmp", "compare")
    for target, value in [("step", rng.randint(20, 40)), ("delay", rng.uniform(seconds / 3, seconds)),
                          ("fix", rng.randint(1, 8))]:
        if target == "delay":
            proc = _popen(args)
            time.sleep(value)
            proc.kill()
            proc.communicate(timeout=120)
        else:
            proc = _popen(args, target, value)
            proc.communicate(timeout=300)
        assert proc.returncode in (-signal.SIGKILL, 0)
        _assert_nothing_half_written(tmp_path)
    rc, _, err = _run_cli(args)
    assert rc == 0, err[-3000:]
    for m in ("wfn", "pwfn"):
        assert _point_bytes(tmp_path / "cmp" / m) == want[m], m
    assert (tmp_path / "cmp" / "compare.json").exists()


# --------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.slow
@pytest.mark.parametrize("where", ["training", "checkpoint-write"])
def test_ctrl_c_stops_cleanly_and_resumes(straight, tmp_path, where):
    want, _ = straight
    args = _args(tmp_path, "int", "pwfn")
    folder = tmp_path / "int" / "pwfn"
    if where == "training":  # Ctrl-C right after an optimizer step of round 4's training (15 baseline steps,
        # 1 before round 1, 3 after each round): at the same point on a loaded machine as on an idle one
        rc, _, err = _run_cli(args, "step", 15 + 1 + 3 + 3 + 3 + 2, "SIGINT")
    else:  # Ctrl-C arrives while the 3rd round's checkpoint is being written: the write completes first
        rc, _, err = _run_cli(args + ["--fresh"], "replace:checkpoint.pt", 4, "SIGINT")
    assert rc == 130, err[-3000:]
    assert "interrupted" in err and "resume with the same command" in err
    hint = err.split("resume with the same command", 1)[1]
    assert "pwfn run --method pwfn --out" in hint and " --fresh" not in hint.split(": ", 1)[1]
    state = load_checkpoint(folder / "checkpoint.pt", kind="run-pwfn")
    assert state["next_round"] >= 3
    if where == "checkpoint-write":
        assert state["next_round"] == 3  # the checkpoint being written when Ctrl-C came was completed
    assert _temps(tmp_path) == []
    assert not (folder / "report.json").exists()
    _assert_nothing_half_written(tmp_path)
    rc, _, err = _run_cli(args)
    assert rc == 0, err[-3000:]
    assert _point_bytes(folder) == want


def _error(err: str) -> str:
    """The ``pwfn: error: ...`` a command ended with: only log lines (the run's progress) come before it."""
    head, sep, error = err.partition("pwfn: error: ")
    assert sep and (not head or head.endswith("\n")), err
    assert all(line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING") for line in head.splitlines()), err
    return sep + error


# --------------------------------------------------------------------------------------------
# divergence


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_divergence_is_a_clear_error_naming_layer_and_knobs(method, tmp_path, capsys):
    extra = [f"{method}.lr=1e30", "pwfn.first_round_epochs=1"]
    rc = cli_main(_args(tmp_path, "nan", method, extra))
    assert rc == 2
    err = _error(capsys.readouterr().err)
    assert "training diverged" in err
    assert "layer producing non-finite output is 'net." in err or "layer 'net." in err
    assert f"{method}.lr" in err and f"{method}.grad_clip" in err
    assert ("pwfn.sigma_floor" in err) == (method == "pwfn")
    base = load_checkpoint(tmp_path / "nan" / "baseline.pt", kind="baseline")
    assert all(torch.isfinite(v).all() for v in base["model"].values())
    ckpt = tmp_path / "nan" / method / "checkpoint.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt, kind=f"run-{method}")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_divergence_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """Round 4's training blows up: round 3's checkpoint stays byte for byte, and the error says so."""
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=div"])
    ckpt = tmp_path / "div" / "pwfn" / "checkpoint.pt"
    kept = {}

    def blow_up_after_round_3(state):  # a round callback: the round state holds the optimizer
        if state.round == 2:
            assert state.checkpoint == ckpt
            kept["bytes"] = ckpt.read_bytes()
            for group in state.optimizer.param_groups:
                group["lr"] = 1e30

    with pytest.raises(TrainingDivergedError) as info:
        run_method(cfg, "pwfn", callbacks=[blow_up_after_round_3])
    msg = str(info.value)
    assert "pwfn round 4/10: training diverged" in msg
    assert "'net." in msg and "pwfn.lr" in msg and "pwfn.sigma_floor" in msg
    assert "last good checkpoint" in msg and "(3 of 10 rounds done)" in msg
    assert ckpt.read_bytes() == kept["bytes"]
    state = load_checkpoint(ckpt, kind="run-pwfn")
    assert state["next_round"] == 3
    assert len((ckpt.parent / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (ckpt.parent / "report.json").exists()


def test_first_nonfinite_layer_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(1e20)
        model[3].weight.fill_(1e20)
    x = torch.ones(3, 4)
    assert "'3' (Linear)" in first_nonfinite_output(model, x)  # 4e20 is finite, 1.6e41 is not
    assert "input batch" in first_nonfinite_output(model, x * float("nan"))
    assert first_nonfinite_weight(model) is None
    with torch.no_grad():
        model[3].bias[0] = float("inf")
    assert "layer '3' (Linear) holds non-finite weights: bias has 1 of 2" in first_nonfinite_weight(model)


# --------------------------------------------------------------------------------------------
# bad input: a clear error and nothing written


def _idx_garbage(folder: Path) -> Path:
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"\x00\x00\x08\x03" + os.urandom(64))
    return folder


def _state_file(tmp_path: Path, what: str) -> Path:
    path = tmp_path / f"{what}.pt"
    if what == "other_model":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).state_dict(), path)
    elif what == "garbage":
        path.write_bytes(os.urandom(300))
    elif what == "nan":
        sd = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).state_dict()
        sd = {"net." + k: v for k, v in sd.items()}
        sd["net.3.weight"][0, 0] = float("nan")
        torch.save(sd, path)
    elif what == "run_checkpoint":
        save_checkpoint(path, {"model": {}}, kind="run-pwfn")
    elif what == "not_tensors":
        torch.save({"net.1.weight": 5}, path)
    elif what == "baseline_v99":
        save_checkpoint(path, {"model": {}}, kind="baseline")
        _version_99(path)
    return path


BAD_CLI = [
    ("unknown key", ["--set", "pwfn.lamda=1"], "Did you mean 'lam'"),
    ("wrong type", ["--set", "pwfn.k=abc"], "pwfn.k: expected a number"),
    ("wrong type int", ["--set", "data.batch_size=1.5"], "data.batch_size: expected an integer"),
    ("wrong type section", ["--set", "pwfn=3"], "pwfn: expected a mapping"),
    ("negative sigma floor", ["--set", "pwfn.sigma_floor=-1"], "pwfn.sigma_floor"),
    ("b out of range", ["--set", "pwfn.engine.b=40"], "b must be in [0, 24]"),
    ("fraction above 1", ["--set", "pwfn.fractions=[0.5, 1.5]"], "outside (0, 1]"),
    ("fraction below 0", ["--set", "wfn.fractions=[-0.1, 1.0]"], "outside (0, 1]"),
    ("split fraction", ["--set", "data.val_fraction=1.5"], "data.val_fraction"),
    ("infinite", ["--set", "pwfn.k=.inf"], "finite"),
    ("unsafe name", ["--set", "name=../escape"], "run name"),
    ("bad device string", ["--set", "device=cuda:abc"], "device"),
    ("negative baseline momentum", ["--set", "baseline.momentum=-0.5"], "baseline.momentum"),
    ("no evaluation split", ["--set", "data.val_fraction=0", "--set", "data.test_fraction=0"], "evaluation"),
    ("bad model kwargs", ["--set", "model.kwargs={hidden: [-1]}"], "cannot build model 'mlp'"),
    ("missing dataset", ["--set", "data.name=mnist", "--set", "data.root={tmp}/absent"], "mnist"),
    ("corrupt dataset", ["--set", "data.name=mnist", "--set", "data.root={idx}"], "idx"),
    ("missing checkpoint", ["--set", "model.checkpoint={tmp}/nope.pt"], "does not exist"),
    ("checkpoint of another model", ["--set", "model.checkpoint={other_model}"], "does not fit this model"),
    ("garbage checkpoint", ["--set", "model.checkpoint={garbage}"], "could not be read as a torch state_dict"),
    ("non-finite checkpoint", ["--set", "model.checkpoint={nan}"], "is not finite"),
    ("run checkpoint as model", ["--set", "model.checkpoint={run_checkpoint}"], "'run-pwfn' checkpoint"),
    ("not a state_dict", ["--set", "model.checkpoint={not_tensors}"], "not a state_dict of tensors"),
    ("checkpoint of another format version", ["--set", "model.checkpoint={baseline_v99}"], "format 99"),
]


@pytest.mark.parametrize("label,extra,expect", BAD_CLI, ids=[b[0] for b in BAD_CLI])
def test_bad_cli_input_is_a_clear_error_and_writes_nothing(label, extra, expect, tmp_path, capsys):
    subs = {"tmp": tmp_path}
    if "{idx}" in " ".join(extra):
        subs["idx"] = _idx_garbage(tmp_path / "idx")
    for what in ("other_model", "garbage", "nan", "run_checkpoint", "not_tensors", "baseline_v99"):
        if "{" + what + "}" in " ".join(extra):
            subs[what] = _state_file(tmp_path, what)
    for key, value in subs.items():
        extra = [e.replace("{" + key + "}", str(value)) for e in extra]
    out = tmp_path / "runs"
    rc = cli_main(["run", "--out", str(out)] + _sets() + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    err = _error(err)
    assert expect.lower() in err.lower(), err
    assert not out.exists(), "nothing may be written for bad input"


def test_malformed_yaml_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pwfn: {k: [1, 2\nname: x\n")
    assert cli_main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_baseline_checkpoint_is_a_valid_model_checkpoint(finished_run):
    from pwfn.run.experiment import _load_user_checkpoint

    state = _load_user_checkpoint(str(finished_run / "done" / "baseline.pt"))
    model = create_model("mlp", in_features=64, hidden=[16], num_classes=10)
    model.load_state_dict(state)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny pwfn run folder (in-process), copied by each test that abuses it."""
    out = tmp_path_factory.mktemp("finished")
    run_method(load_config(None, TINY + [f"out_dir={out}", "name=done"]), "pwfn")
    return out


def _rewrite_checkpoint(path: Path, kind: str, change) -> None:
    state = load_checkpoint(path, kind=kind)
    change(state)
    save_checkpoint(path, state, kind=kind)


def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _version_99(path: Path) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:4], "little")
    header = raw[4:4 + n].replace(b'"format": 1', b'"format": 99')
    path.write_bytes(len(header).to_bytes(4, "little") + header + raw[4 + n:])


def _other_model_state(state):
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("net.3.")}


EXISTING = [
    ("changed method setting", lambda d: None, ["--set", "pwfn.k=3"], "pwfn.k: 2.0 -> 3.0"),
    ("changed baseline setting", lambda d: None, ["--set", "baseline.lr=0.01"], "baseline.lr"),
    ("corrupt run checkpoint", lambda d: _flip_bit(d / "pwfn" / "checkpoint.pt"), [], "checksum mismatch"),
    ("truncated run checkpoint", lambda d: (d / "pwfn" / "checkpoint.pt").write_bytes(
        (d / "pwfn" / "checkpoint.pt").read_bytes()[:1000]), [], "truncated or corrupted"),
    ("run checkpoint of another version", lambda d: _version_99(d / "pwfn" / "checkpoint.pt"), [], "format 99"),
    ("run checkpoint of another model", lambda d: _rewrite_checkpoint(d / "pwfn" / "checkpoint.pt", "run-pwfn",
                                                                      _other_model_state), [], "does not fit"),
    ("corrupt baseline", lambda d: _flip_bit(d / "baseline.pt", 0.9), [], "baseline.pt"),
    ("baseline of another version", lambda d: _version_99(d / "baseline.pt"), [], "format 99"),
    ("fresh with a bad checkpoint", lambda d: None, ["--fresh", "--set", "model.checkpoint=/nonexistent.pt"],
     "does not exist"),
]


@pytest.mark.parametrize("label,damage,extra,expect", EXISTING, ids=[e[0] for e in EXISTING])
def test_bad_input_against_an_existing_run_changes_nothing(label, damage, extra, expect, finished_run, tmp_path,
                                                           capsys):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    folder = out / "done"
    damage(folder)
    before = _snapshot(out)
    rc = cli_main(["run", "--method", "pwfn", "--out", str(out), "--set", "name=done"] + _sets() + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    assert "--fresh" in err or label.startswith("fresh")
    assert _snapshot(out) == before, "a refused run must not change any file"


# --------------------------------------------------------------------------------------------
# models: tied weights, frozen parameters, zero-sized tensors, nothing to quantise


@pytest.fixture(scope="module")
def loaders():
    return make_loaders("digits", batch_size=64, seed=0, train_subset=200)


FAST = {"progress": False, "pwfn": {"round_epochs": 0.2, "first_round_epochs": 0.1, "mc_samples": 1},
        "wfn": {"round_epochs": 0.2}, "contract": {"enforce": False}}  # mechanics; the contract has its own tests


def _all_frozen():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _only_empty():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 0, bias=False), nn.Linear(0, 10, bias=False))


MODEL_ERRORS = [("all frozen", _all_frozen, "frozen"),
                ("only zero-sized tensors", _only_empty, "no quantisable"),
                ("no quantisable layer", lambda: nn.Sequential(nn.Flatten(), nn.Identity()), "nothing to")]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("method", ["pwfn", "wfn"])
@pytest.mark.parametrize("label,make,expect", MODEL_ERRORS, ids=[m[0] for m in MODEL_ERRORS])
def test_unsuitable_models_are_refused_before_writing(label, make, expect, method, loaders, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ModelError, match=expect):
        compress(make(), loaders.train, loaders.val, method=method, config=FAST, run_dir=run_dir)
    assert not run_dir.exists()


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_frozen_parameters_are_quantised_but_never_trained(method, loaders, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model[1].weight.requires_grad_(False)
    frozen0, trained0 = model[1].weight.detach().clone(), model[3].weight.detach().clone()
    cfg = load_config(None, ["progress=false", "pwfn.round_epochs=0.5", "pwfn.first_round_epochs=0.5",
                             "pwfn.mc_samples=1", "wfn.round_epochs=0.5",
                             "contract.enforce=false"])  # an untrained model: mechanics, no contract
    snapshots = []

    def record(state):  # a round callback, reading the round state
        view = state.fixer.view
        snapshots.append((view.values().clone(), view.fixed().clone()))

    run = FixingRun(method, cfg, model, loaders.train, loaders.val, device=torch.device("cpu"), callbacks=[record])
    result = run.run()
    n_frozen = frozen0.numel()
    for values, fixed in snapshots[:3]:
        # a frozen weight moves only when it is fixed; a trainable one is trained as well
        assert torch.equal(values[:n_frozen][~fixed[:n_frozen]], frozen0.reshape(-1)[~fixed[:n_frozen]])
    off = n_frozen + 16
    values, fixed = snapshots[0]
    assert not torch.equal(values[off:off + trained0.numel()][~fixed[off:off + trained0.numel()]],
                           trained0.reshape(-1)[~fixed[off:off + trained0.numel()]])
    point = result.point_model
    assert not point[1].weight.requires_grad and point[3].weight.requires_grad  # still frozen
    codebook = torch.tensor(result.report["final"]["codebook"])
    assert torch.isin(point[1].weight.detach(), codebook).all()  # ... and on the shared codebook


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_zero_sized_tensors_are_skipped(method, loaders, tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 0), nn.Linear(0, 10))
    result = compress(model, loaders.train, loaders.val, method=method, config=FAST, run_dir=tmp_path / "z")
    assert "3.weight" not in result.report["quantised_tensors"]
    assert result.point_model[3].weight.shape == (0, 16)
    assert result.report["final"]["fixed_fraction"] == 1.0


def test_all_frozen_model_can_be_fixed_without_retraining(loaders, tmp_path):
    cfg = {"progress": False, "pwfn": {"round_epochs": 0, "first_round_epochs": 0, "mc_samples": 1},
           "contract": {"enforce": False}}  # an untrained model: nothing to keep
    result = compress(_all_frozen(), loaders.train, loaders.val, method="pwfn", config=cfg, run_dir=tmp_path / "f")
    assert result.report["final"]["fixed_fraction"] == 1.0


# --------------------------------------------------------------------------------------------
# pwfn doctor


def _doctor(capsys, folder) -> tuple[int, str]:
    rc = cli_main(["doctor", str(folder)])
    return rc, capsys.readouterr().out


def test_doctor_healthy_and_damaged_run_folders(finished_run, tmp_path, capsys):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    folder = out / "done"
    rc, text = _doctor(capsys, folder)
    assert rc == 0, text
    assert "finished: 10 rounds" in text and "baseline.pt is intact" in text and "healthy" in text
    assert "python" in text and "torch" in text and "GiB free" in text and "writable" in text

    assert cli_main(["export", str(folder / "pwfn")]) == 0
    capsys.readouterr()
    rc, text = _doctor(capsys, folder / "pwfn")
    assert rc == 0 and "decodes to model.safetensors bit for bit" in text, text

    # stray temp file: a warning (exit 0) saying it is harmless
    (folder / "pwfn" / ".checkpoint.pt.abc12345.tmp").write_bytes(b"x")  # as mkstemp names it
    rc, text = _doctor(capsys, folder / "pwfn")
    assert rc == 0 and "left by an interrupted write" in text

    # damaged export, corrupt checkpoint, edited config.yaml: problems (exit 1) with what to do
    _flip_bit(folder / "pwfn" / "export" / "model.pwfn")
    rc, text = _doctor(capsys, folder / "pwfn")
    assert rc == 1 and "model.pwfn fails its checksum" in text and "pwfn export" in text
    _flip_bit(folder / "pwfn" / "checkpoint.pt")
    rc, text = _doctor(capsys, folder)
    assert rc == 1 and "checksum mismatch" in text and "--fresh" in text
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["baseline"]["lr"] = 0.5
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, text = _doctor(capsys, folder)
    assert rc == 1 and "differs from the config baseline.pt was trained under: baseline.lr" in text
    (folder / "pwfn" / "config.yaml").write_text("pwfn: [")
    rc, text = _doctor(capsys, folder / "pwfn")
    assert rc == 1 and "is not a valid config" in text


def test_doctor_unfinished_run_and_missing_folder(finished_run, tmp_path, capsys):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    folder = out / "done" / "pwfn"
    _rewrite_checkpoint(folder / "checkpoint.pt", "run-pwfn",
                        lambda s: s.update(next_round=4, history=s["history"][:4]))
    (folder / "report.json").unlink()
    rc, text = _doctor(capsys, folder)
    assert rc == 0 and "unfinished: 4 of 10 rounds done" in text and "resume it: pwfn run" in text
    assert "metrics.jsonl (10 rows) lags the checkpoint" in text
    rc, text = _doctor(capsys, tmp_path / "absent")
    assert rc == 1 and "does not exist" in text
    rc, text = _doctor(capsys, tmp_path)
    assert rc == 1 and "not a pwfn run folder" in text


def test_doctor_checks_every_extra_and_the_tools_a_target_needs(monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pwfn.export.targets import TARGETS
    from pwfn.tools import doctor

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as fh:
        extras = set(tomllib.load(fh)["project"]["optional-dependencies"])
    checked = {(name, extra) for name, extra, _ in doctor.OPTIONAL}
    assert {extra for _, extra in checked} == extras  # every extra, and none that does not exist
    for target in TARGETS.values():  # every module an export target imports
        assert {(m, target.extra) for m in target.modules} <= checked, target.name
    assert ("lightning", "lightning") in checked and ("transformers", "hf") in checked
    assert ("huggingface_hub", "hf") in checked and ("g++", "hls4ml") in {(t, e) for t, e, _ in doctor.TOOLS}

    real_import = doctor._import
    hls4ml = type(sys)("hls4ml")
    monkeypatch.setattr(doctor, "_import", lambda name: (hls4ml, None, True) if name == "hls4ml" else real_import(name))
    monkeypatch.setattr(doctor.shutil, "which", lambda program: None)
    (gxx,) = [f for f in doctor.check_environment() if f.topic == "g++"]
    assert gxx.level == "warning" and "the 'hls4ml' extra is installed" in gxx.message and "apt-get install g++" in gxx.fix
    monkeypatch.setattr(doctor, "_import", lambda name: (None, None, False) if name == "hls4ml" else real_import(name))
    (gxx,) = [f for f in doctor.check_environment() if f.topic == "g++"]
    assert gxx.level == "info"  # no hls4ml: a missing g++ is only worth knowing
    monkeypatch.setattr(doctor.shutil, "which", lambda program: "/usr/bin/" + program)
    (gxx,) = [f for f in doctor.check_environment() if f.topic == "g++"]
    assert gxx.level == "ok" and gxx.message.startswith("/usr/bin/g++")


def test_doctor_reports_a_broken_optional_import(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    rc = cli_main(["doctor"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "torchvision is installed but fails to import (RuntimeError: operator torchvision::nms" in text
    assert "pip install --force-reinstall '.[vision]'" in text
