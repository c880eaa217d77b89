"""The first hour: light CLI commands answer without torch, configs by name, packaging facts.

The torch checks run each command's code path in a fresh interpreter and look at
``sys.modules`` afterwards: `--help`, `--version`, `models`, `configs`, `report` and a config
typo must not import torch (they answer in well under a second that way).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pwfn
from pwfn.cli import main as cli_main
from pwfn.common.catalog import MODELS
from pwfn.errors import ConfigError
from pwfn.model import presets

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from pwfn.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
sys.stdout.flush()
sys.stderr.write("\\nRC=%s TORCH=%s\\n" % (rc, "torch" in sys.modules))
"""


def probe(*argv: str) -> tuple[int, bool, str]:
    """Run the CLI in a fresh interpreter: (exit code, torch imported?, stdout + stderr)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    tail = proc.stderr.strip().splitlines()[-1]
    assert tail.startswith("RC="), proc.stderr
    rc_text, torch_text = tail.split()
    rc = rc_text.split("=")[1]
    return (int(rc) if rc not in ("None", "") else 0), torch_text == "TORCH=True", proc.stdout + proc.stderr


def make_report_folder(tmp_path: Path) -> Path:
    """A finished method folder as `pwfn report` reads it, written by hand (no torch needed)."""
    folder = tmp_path / "demo" / "wfn"
    folder.mkdir(parents=True)
    rounds = [{"round": i, "fraction": f, "fixed_fraction": f, "after_fix": {"top1": 90.0 + i},
               "after_train": {"top1": 91.0 + i}, "unique": 3 + i, "entropy": 1.0 + i / 10,
               "entropy_nonzero": 0.9 + i / 10, "wall_seconds": 0.5} for i, f in enumerate([0.5, 1.0])]
    report = {"method": "wfn", "fractions": [0.5, 1.0], "rounds": rounds, "quantised_tensors": ["fc.weight"],
              "final": {"test": {"top1": 92.0}, "unique": 4, "unique_nonzero": 3, "entropy": 1.1,
                        "entropy_nonzero": 1.0, "n_weights": 6, "codebook": [-0.5, 0.0, 0.25, 0.375],
                        "codebook_counts": [1, 2, 2, 1]},
              "baseline": {"test": {"top1": 92.5}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.mark.parametrize("argv", [("--help",), ("--version",), ("models",), ("configs",),
                                  ("run", "--set", "pwfn.lamda=1"), ("compare", "digits_mlpp"),
                                  ("plot", "--help"), ("inspect", "--help")])
def test_light_commands_do_not_import_torch(argv):
    rc, torch_imported, out = probe(*argv)
    assert not torch_imported, f"pwfn {' '.join(argv)} imported torch:\n{out}"
    if argv[0] in ("run", "compare"):
        assert rc == 2 and "pwfn: error:" in out
        assert "Did you mean 'lam'" in out or "Did you mean 'digits_mlp'" in out
    else:
        assert rc == 0


def test_report_does_not_import_torch(tmp_path):
    folder = make_report_folder(tmp_path)
    rc, torch_imported, out = probe("report", str(folder))
    assert rc == 0 and not torch_imported, out
    assert "method: wfn" in out and "codebook (4 values)" in out
    assert "| 0.375 | 2^-2 + 2^-3 | 1 | 16.67 |" in out


def test_version_matches_the_package(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pwfn {pwfn.__version__}"


def test_python_dash_m_pwfn_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "pwfn", "--version"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"pwfn {pwfn.__version__}"


def test_model_table_matches_the_registry(capsys):
    from pwfn.model.zoo import list_models

    assert sorted(MODELS) == list_models()
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out


def test_shipped_configs_are_found_by_name(capsys):
    names = presets.list_configs()
    assert {"digits_mlp", "mnist5k_lenet5", "cifar10_resnet20"} <= set(names)
    assert presets.config_path("digits_mlp") == presets.config_dir() / "digits_mlp.yaml"
    assert presets.config_path("digits_mlp.yaml") == presets.config_path("digits_mlp")
    with pytest.raises(ConfigError, match="Did you mean 'digits_mlp'"):
        presets.config_path("digits_mpl")
    # an existing path wins over a name; a missing path stays a path for load_config's message
    assert presets.resolve_config(str(ROOT / "configs" / "digits_mlp.yaml")) == str(ROOT / "configs" / "digits_mlp.yaml")
    assert presets.resolve_config("nowhere/x.yaml") == "nowhere/x.yaml"
    assert presets.resolve_config("missing.yaml") == "missing.yaml"
    assert presets.resolve_config(None) is None
    from pwfn.model.config import load_config

    cfg = load_config(presets.resolve_config("mnist5k_lenet5"))
    assert cfg.name == "mnist5k_lenet5" and cfg.model.name == "lenet5"
    assert cli_main(["configs"]) == 0
    assert "digits_mlp" in capsys.readouterr().out


def test_packaged_copy_is_used_without_the_repository(tmp_path, monkeypatch):
    packaged = tmp_path / "pkg" / "_configs"
    packaged.mkdir(parents=True)
    (packaged / "only_here.yaml").write_text("name: only_here\n")
    monkeypatch.setattr(presets, "_candidates", lambda: [tmp_path / "no_repo" / "configs", packaged])
    assert presets.list_configs() == ["only_here"]
    assert presets.config_path("only_here") == packaged / "only_here.yaml"


def test_distribution_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "pwfn-compress"  # `pwfn` on the public index is someone else's project
    assert "version" in meta["dynamic"]
    for extra in ("plot", "tensorboard", "docs", "dev"):
        assert extra in meta["optional-dependencies"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {pwfn.__version__}" in changelog
    assert (ROOT / "pwfn" / "py.typed").exists() and (ROOT / "bayes" / "py.typed").exists()


@pytest.mark.slow
def test_wheel_carries_configs_license_and_typing_marker(tmp_path):
    """A non-editable wheel: the configs as pwfn/_configs, py.typed, the CLI entry point, the metadata."""
    import shutil

    src = tmp_path / "src"  # a copy, so the build's scratch folders never land in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("pwfn", "bayes", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(tmp_path.glob("pwfn_compress-*.whl"))
    assert len(wheels) == 1, list(tmp_path.iterdir())
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
        shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
        assert {f"pwfn/_configs/{n}" for n in shipped} <= names
        for n in shipped:
            assert zf.read(f"pwfn/_configs/{n}") == (ROOT / "configs" / n).read_bytes()
        assert {"pwfn/py.typed", "bayes/py.typed", "pwfn/__main__.py", "pwfn/model/presets.py"} <= names
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
        assert "Name: pwfn-compress" in text and f"Version: {pwfn.__version__}" in text
        entry = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        assert "pwfn = pwfn.cli:main" in entry
        assert not any(n.startswith(("tests/", "benchmarks/", "configs/")) for n in names)
        zf.extractall(tmp_path / "site")
    # the installed (unpacked) package finds its packaged configs, not a repository's
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pwfn.model.presets as p; "
            "print(p.__file__); print(p.config_dir()); print(','.join(p.list_configs()))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    module, folder, names_line = proc.stdout.strip().splitlines()
    assert module.startswith(str(tmp_path / "site"))
    assert folder == str(tmp_path / "site" / "pwfn" / "_configs")
    assert set(names_line.split(",")) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
