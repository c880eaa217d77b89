"""Messages speak the caller's language (``--set`` on the command line, ``overrides=[...]`` from
Python) and name missing extras with install commands that work (pwfn.common.hints)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import pwfn
from pwfn import cli
from pwfn.common import hints
from pwfn.errors import ModelError
from pwfn.model.config import load_config
from pwfn.run.pipeline import divergence_advice

ROOT = Path(__file__).resolve().parent.parent


def test_settings_in_each_language():
    assert not hints.in_command_line()
    assert hints.setting("pwfn.k_min", 0.25 / 8) == 'overrides=["pwfn.k_min=0.03125"]'
    assert hints.settings({"pwfn.first_round_epochs": 0, "pwfn.round_epochs": 0}) == \
        'overrides=["pwfn.first_round_epochs=0", "pwfn.round_epochs=0"]'
    assert hints.start_over() == "resume=False" and "run_dir" in hints.other_run_folder()
    assert hints.shipped_config("paper_pwfn") == 'config="paper_pwfn"'
    with hints.command_line():
        assert hints.in_command_line()
        assert hints.setting("contract.metric", None) == "--set contract.metric=null"
        assert hints.setting("pwfn.quantise_norms", True) == "--set pwfn.quantise_norms=true"
        assert hints.settings({"a.b": 1, "c": ...}) == "--set a.b=1 --set c=..."
        assert hints.start_over() == "--fresh" and "--set name=" in hints.other_run_folder()
        assert "pwfn run paper_pwfn" in hints.shipped_config("paper_pwfn")
    assert not hints.in_command_line()  # the block restores the Python voice


def test_a_python_value_round_trips_through_the_config_as_written():
    """What a hint tells a Python caller to pass is what the config then holds."""
    hint = hints.settings({"pwfn.k_min": 0.25 / 8, "contract.metric": None, "wfn.quantise_norms": False})
    overrides = [s.strip('"') for s in hint[len("overrides=["):-1].split(", ")]
    cfg = load_config(None, overrides)
    assert cfg.pwfn.k_min == 0.03125 and cfg.contract.metric is None and cfg.wfn.quantise_norms is False


def test_divergence_advice_speaks_the_callers_language():
    cfg = load_config(None, [])
    python = divergence_advice(cfg, "pwfn")
    assert 'overrides=["pwfn.lr=..."]' in python and "--set" not in python
    with hints.command_line():
        command = divergence_advice(cfg, "pwfn")
    assert "--set pwfn.lr=..." in command and "overrides" not in command


def test_the_command_line_runs_its_commands_in_its_own_voice(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "cmd_models", lambda args: seen.append(hints.in_command_line()) or 0)
    assert cli.main(["models"]) == 0
    assert seen == [True] and not hints.in_command_line()


def test_a_refusal_from_python_names_the_python_setting():
    model = nn.Sequential(nn.Linear(4, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ModelError) as info:
        pwfn.compress(model, data, data, method="pwfn", config={"progress": False})
    assert 'overrides=["pwfn.first_round_epochs=0", "pwfn.round_epochs=0"]' in str(info.value)
    assert "--set" not in str(info.value)


def _pyproject_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


def _installed_from_another_tree() -> str | None:
    """The source tree the installed distribution is an editable install of, when that is not this
    tree (a git worktree beside the installed checkout): its metadata describes that tree's extras."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    text = metadata.distribution(hints.DISTRIBUTION).read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    url = urlparse(info.get("url", ""))
    if not (info.get("dir_info") or {}).get("editable") or url.scheme != "file":
        return None
    tree = Path(unquote(url.path)).resolve()
    return None if tree == ROOT else str(tree)


def test_install_hints_name_each_extras_own_requirements():
    from importlib import metadata

    try:
        metadata.requires(hints.DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pytest.skip("pwfn runs from a source tree that was never installed: no metadata to read")
    other = _installed_from_another_tree()
    if other is not None:
        pytest.skip(f"the installed {hints.DISTRIBUTION} is an editable install of {other}, not of this tree: its "
                    "metadata declares that tree's extras")
    for extra, reqs in _pyproject_extras().items():
        hint = hints.install_hint(extra)
        command = hint.split(" (")[0]
        assert shlex.split(command) == ["pip", "install", *reqs], extra  # the extra's requirements, as declared
        assert f"pip install '.[{extra}]'" in hint, extra  # and the form that works in a clone
    assert hints.install_hint("plot", reinstall=True).startswith("pip install --force-reinstall ")


def test_no_message_names_an_unpublished_distribution():
    """`pip install pwfn-compress[...]` fails until the name is on an index: no message may say it."""
    offenders = []
    for path in sorted((ROOT / "pwfn").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install[^\n]*pwfn-compress", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []
