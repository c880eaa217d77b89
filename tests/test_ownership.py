"""pwfn deletes, truncates or overwrites only what it can prove it made (issue 23).

Attacks on run folders, ``--fresh``, the lock file, temp files and pictures: a folder that is not
pwfn's, a symlinked run name, a link planted where pwfn writes, a lock that is a folder, a FIFO
or a hard link. Each must be refused with a clear error (changing nothing) or leave the user's
files as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pwfn.cli import main as cli_main
from pwfn.common.io import remove_stale_temp_files, save_checkpoint
from pwfn.errors import RunFileError
from pwfn.run.lock import LOCK_FILE, acquire, check_free, holder_info, is_locked
from pwfn.run.ownership import (
    MARKER_FILE,
    METHOD,
    RUN,
    ForeignFolderError,
    claim,
    clear_run_folder,
    folder_kind,
    mark,
)

TINY = ["progress=false", "threads=1", "baseline.epochs=0.3", "pwfn.round_epochs=0.1", "pwfn.first_round_epochs=0.05",
        "pwfn.mc_samples=1", "data.batch_size=64", "model.kwargs={hidden: [8]}", "data.train_subset=200",
        "pwfn.fractions=[1.0]", "wfn.fractions=[1.0]", "wfn.round_epochs=0"]


def _args(out: Path, name: str, *extra: str, method: str = "pwfn") -> list[str]:
    sets = []
    for item in TINY + list(extra):
        sets += ["--set", item]
    return ["-q", "run", "--method", method, "--out", str(out), "--set", f"name={name}", *sets]


def _cli(capsys, args) -> tuple[int, str]:
    rc = cli_main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): its kind and, for files, a hash of the bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    (v / "a.txt").write_text("precious")
    (v / "sub" / "b.txt").write_text("precious too")
    (v / "config.yaml").write_text("my: own config\n")
    (v / "baseline.pt").write_text("my own baseline, not pwfn's")
    return v


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert cli_main(_args(out, "base")) == 0
    return out / "base"


def _copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "base"
    shutil.copytree(finished, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------
# --fresh and runs into folders pwfn did not make


def test_fresh_on_a_folder_that_is_not_a_run_folder_deletes_nothing(tmp_path, capsys):
    victim = _victim(tmp_path / "home")
    before = _tree(victim)
    rc, err = _cli(capsys, _args(tmp_path / "home", "victim") + ["--fresh"])
    assert rc == 2 and "is not a pwfn folder" in err and "a.txt" in err and "Traceback" not in err, err
    assert _tree(victim) == before


@pytest.mark.parametrize("fresh", [True, False])
def test_a_symlinked_run_name_is_never_followed_to_delete(fresh, tmp_path, capsys):
    victim = _victim(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(victim)
    before = _tree(victim)
    rc, err = _cli(capsys, _args(tmp_path / "runs", "link") + (["--fresh"] if fresh else []))
    assert rc == 2 and "Traceback" not in err, err
    assert ("symbolic link" in err) if fresh else ("is not a pwfn folder" in err), err
    assert _tree(victim) == before


def test_a_run_name_linked_to_its_own_parent_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "self").symlink_to(".")
    for extra in (["--fresh"], []):
        rc, err = _cli(capsys, _args(out, "self") + extra)
        assert rc == 2 and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "self"]


def test_a_plain_run_into_a_foreign_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    victim = _victim(tmp_path / "out")
    before = _tree(victim)
    rc, err = _cli(capsys, _args(tmp_path / "out", "victim"))
    assert rc == 2 and "is not a pwfn folder" in err and "--set name=" in err, err
    assert _tree(victim) == before


def test_fresh_on_a_run_folder_deletes_what_pwfn_wrote_and_keeps_the_rest(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    victim = _victim(tmp_path)
    before_victim = _tree(victim)
    (run / "notes.txt").write_text("my notes")
    (run / "pwfn" / "mine.txt").write_text("mine")
    (run / "pwfn" / "link.txt").symlink_to(victim / "a.txt")
    (run / "pwfn" / "linked_dir").symlink_to(victim)
    (run / "wfn").symlink_to(victim)  # a method's name, but a link: never followed
    (run / "data").mkdir()
    (run / "data" / "x.npy").write_text("user data")
    rc, err = _cli(capsys, _args(tmp_path / "runs", "base", "pwfn.k=0.5") + ["--fresh"])
    assert rc == 0, err
    assert _tree(victim) == before_victim
    assert (run / "notes.txt").read_text() == "my notes" and (run / "data" / "x.npy").exists()
    assert (run / "pwfn" / "mine.txt").exists() and (run / "pwfn" / "link.txt").is_symlink()
    assert (run / "wfn").is_symlink()
    assert folder_kind(run) == RUN and folder_kind(run / "pwfn") == METHOD
    cfg = (run / "pwfn" / "config.yaml").read_text()
    assert "k: 0.5" in cfg  # the fresh run rewrote its files


def test_fresh_on_a_folder_of_another_pwfn_kind_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = _tree(run)
    # the method folder as a run name: `--out runs/base --set name=pwfn --fresh`
    rc, err = _cli(capsys, _args(run, "pwfn") + ["--fresh"])
    assert rc == 2 and "pwfn method folder" in err and "not a pwfn run folder" in err, err
    assert _tree(run) == before


def test_compress_into_a_run_folder_or_a_foreign_folder_is_refused(finished, tmp_path):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import pwfn

    run = _copy(finished, tmp_path)
    victim = _victim(tmp_path)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=16)
    for folder, needle in ((run, "pwfn run folder"), (victim, "is not a pwfn folder")):
        before = _tree(folder)
        with pytest.raises(ForeignFolderError, match=needle):
            pwfn.compress(nn.Linear(4, 2), loader, loader, method="wfn", run_dir=folder)
        assert _tree(folder) == before


def test_a_run_folder_written_before_the_marker_is_still_recognised(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / MARKER_FILE).unlink()
    (run / "pwfn" / MARKER_FILE).unlink()
    assert folder_kind(run) == RUN and folder_kind(run / "pwfn") == METHOD
    (run / "baseline.pt").unlink()  # a model.checkpoint run has no baseline: its config.yaml names it
    assert folder_kind(run) == RUN
    (run / "config.yaml").write_text("name: other\n")
    assert folder_kind(run) is None


@pytest.mark.parametrize("by_path", [False, True], ids=["dir-fds", "by-path"])
def test_clear_run_folder_tree(by_path, tmp_path, monkeypatch):
    """Unit check of what --fresh deletes: pwfn's names and types only, links never followed (through
    directory fds, and by path as on platforms without them)."""
    import pwfn.run.ownership

    monkeypatch.setattr(pwfn.run.ownership, "_FD_OPS", not by_path)
    victim = _victim(tmp_path)
    before_victim = _tree(victim)
    run = tmp_path / "run"
    method = run / "pwfn"
    (method / "export").mkdir(parents=True)
    (method / "plots").mkdir()
    (method / "tensorboard").mkdir()
    mark(run, RUN)
    mark(method, METHOD)
    for name in ("config.yaml", "compare.json", "compare.md", ".config.yaml.abcd_123.tmp", LOCK_FILE):
        (run / name).write_text("pwfn")
    save_checkpoint(run / "baseline.pt", {"x": 1}, kind="baseline")
    for name in ("checkpoint.pt", "manifest.json", "metrics.jsonl", "report.json", "point_model.safetensors"):
        (method / name).write_text("pwfn")
    (method / "export" / "model.json").write_text(json.dumps({"format": "pwfn-export", "files": {"extra.bin": {}}}))
    for name in ("model.safetensors", "model.pwfn", "extra.bin"):
        (method / "export" / name).write_text("pwfn")
    (method / "export" / "readme.txt").write_text("user")
    (method / "plots" / "rounds.png").write_text("png")
    (method / "plots" / "holiday.png").write_text("user")
    (method / "tensorboard" / "events.out.tfevents.1.host.2.0").write_text("tb")
    (run / "export").mkdir()  # a folder named export that is not a pwfn export: kept whole
    (run / "export" / "model.json").write_text('{"format": "someone else"}')
    (run / "export" / "model.safetensors").write_text("user")
    (run / "notes.tmp").write_text("user")  # not mkstemp's name shape
    (run / ".x.abcdefgh.tmp").symlink_to(victim / "a.txt")  # a temp name, but a link: kept
    (run / "plots").symlink_to(victim)
    kept = clear_run_folder(run)
    assert _tree(victim) == before_victim
    left = _tree(run)
    assert set(left) == {MARKER_FILE, LOCK_FILE, "pwfn", "pwfn/export", "pwfn/export/readme.txt", "pwfn/plots",
                         "pwfn/plots/holiday.png", "pwfn/.pwfn-folder", "export", "export/model.json",
                         "export/model.safetensors", "notes.tmp", ".x.abcdefgh.tmp", "plots"}, left
    assert len(kept) == 6, kept


def test_clear_run_folder_removes_an_emptied_method_folder_and_refuses_foreign_folders(tmp_path):
    run = tmp_path / "run"
    (run / "wfn").mkdir(parents=True)
    mark(run, RUN)
    mark(run / "wfn", METHOD)
    (run / "wfn" / "report.json").write_text("{}")
    assert clear_run_folder(run) == []
    assert sorted(p.name for p in run.iterdir()) == [MARKER_FILE]
    victim = _victim(tmp_path)
    with pytest.raises(ForeignFolderError, match="not a pwfn folder"):
        clear_run_folder(victim)
    mark(victim, METHOD)
    with pytest.raises(ForeignFolderError, match="pwfn method folder"):
        clear_run_folder(victim)


def test_claim_accepts_new_empty_and_own_folders(tmp_path):
    claim(tmp_path / "new", RUN)
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", RUN)
    (tmp_path / "empty" / LOCK_FILE).write_text("")  # a lock and a temp file left by pwfn are not foreign
    (tmp_path / "empty" / ".config.yaml.a1b2c3d4.tmp").write_text("")
    claim(tmp_path / "empty", METHOD)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignFolderError, match="is a file"):
        claim(tmp_path / "file", RUN)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ForeignFolderError, match="does not exist"):
        claim(tmp_path / "dangling", RUN)


# --------------------------------------------------------------------------------------------
# the lock file and temp files


def _victim_file(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious")
    return v


@pytest.mark.parametrize("kind", ["symlink", "dangling", "folder", "fifo", "hardlink"])
def test_a_lock_file_pwfn_did_not_make_is_never_written(kind, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / LOCK_FILE
    victim = _victim_file(tmp_path)
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling":
        lock.symlink_to(tmp_path / "would_be_created.txt")
    elif kind == "folder":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        os.link(victim, lock)
    assert is_locked(folder) is None and holder_info(folder) is None  # reading never blocks (FIFO)
    check_free(folder)
    with pytest.raises(RunFileError, match="lock file .* is a") as err:
        acquire(folder)
    assert "Remove it" in str(err.value)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "would_be_created.txt").exists()


def test_the_lock_still_works_on_its_own_file(tmp_path):
    with acquire(tmp_path / "run") as lock:
        assert lock.owned and (holder_info(tmp_path / "run") or {}).get("pid") == os.getpid()


def test_only_temp_files_pwfn_names_are_removed(tmp_path):
    victim = _victim_file(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.yaml.k2j4_9ab.tmp").write_text("stale")  # as mkstemp names it
    (folder / ".notes.tmp").write_text("user")  # not that shape
    (folder / ".report.json.abcdefgh.tmp").symlink_to(victim)
    (folder / ".dir.abcdefgh.tmp").mkdir()
    removed = remove_stale_temp_files(folder)
    assert [p.name for p in removed] == [".config.yaml.k2j4_9ab.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == [".dir.abcdefgh.tmp", ".notes.tmp", ".report.json.abcdefgh.tmp"]
    assert victim.read_text() == "precious"


def test_a_link_planted_at_a_picture_temp_name_is_never_written_through(finished, tmp_path):
    pytest.importorskip("matplotlib")
    from pwfn.tools.plot import plot_run_dir

    victim = _victim_file(tmp_path)
    out = tmp_path / "plots"
    out.mkdir()
    for name in ("rounds.png", "weights_pwfn.png", "layers_pwfn.png"):
        (out / f".{name}.tmp").symlink_to(victim)
    written = plot_run_dir(finished / "pwfn", out)
    assert written and victim.read_text() == "precious"
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_pictures_never_replace_a_file_pwfn_did_not_draw(finished, tmp_path):
    pytest.importorskip("matplotlib")
    from pwfn.errors import PwfnError
    from pwfn.tools.plot import plot_run_dir

    out = tmp_path / "pictures"
    out.mkdir()
    (out / "rounds.png").write_bytes(b"\x89PNG my holiday picture")
    with pytest.raises(PwfnError, match="rounds.png' exists and is not a picture pwfn drew"):
        plot_run_dir(finished / "pwfn", out)
    assert sorted(p.name for p in out.iterdir()) == ["rounds.png"]  # nothing drawn, nothing replaced
    (out / "rounds.png").unlink()
    (out / "rounds.png").symlink_to(_victim_file(tmp_path))
    with pytest.raises(PwfnError, match="not a regular file"):
        plot_run_dir(finished / "pwfn", out)
    (out / "rounds.png").unlink()
    first = plot_run_dir(finished / "pwfn", out)
    again = plot_run_dir(finished / "pwfn", out)  # its own pictures are redrawn
    assert first == again and all(p.stat().st_size > 1000 for p in again)


def test_pwfn_export_never_writes_through_a_link_planted_at_the_lock(finished, tmp_path, capsys):
    """The issue's attack: a symlink at the run folder's lock made `pwfn export` overwrite its target."""
    run = _copy(finished, tmp_path)
    victim = _victim_file(tmp_path)
    (run / LOCK_FILE).unlink(missing_ok=True)
    (run / LOCK_FILE).symlink_to(victim)
    rc, err = _cli(capsys, ["export", str(run / "pwfn")])
    assert rc == 2 and "lock file" in err and "symbolic link" in err, err
    assert victim.read_text() == "precious" and not (run / "pwfn" / "export").exists()
