"""CI layout: `make test` and `make test-slow` together run every test, and `make ci` runs both.

`make test` selects ``-m "not slow"`` and `make test-slow` ``-m slow`` through the same pytest
command, so a test is in exactly one of them and nothing is dropped; `--strict-markers` turns a
misspelt marker into an error instead of a slow test moved into the fast part. CI (`.ci/run`)
calls `make ci`: the fast tests, the slow tests as their own step, then the docs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The Makefile's variables and each rule's recipe lines."""
    variables: dict[str, str] = {}
    rules: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current is not None:
            rules[current].append(line.strip())
            continue
        current = None
        var = re.match(r"^([A-Za-z_]\w*)\s*(?::=|\?=|=)\s*(.*)$", line)
        rule = re.match(r"^([\w-]+)\s*:(?!=)", line)
        if var:
            variables[var.group(1)] = var.group(2)
        elif rule:
            current = rule.group(1)
            rules[current] = []
    return variables, rules


def test_fast_and_slow_selections_split_the_whole_suite():
    variables, rules = _makefile()
    assert rules["test"] == ['$(PYTEST) -m "not slow"']
    assert rules["test-slow"] == ["$(PYTEST) -m slow"]
    pytest_cmd = variables["PYTEST"]
    assert "-m pytest" in pytest_cmd
    for narrowing in (" -m ", " -k ", "--deselect", "--ignore", "tests/"):  # the selection is the marker alone
        assert narrowing not in pytest_cmd.replace("-m pytest", ""), narrowing


def test_ci_runs_fast_tests_then_slow_tests_then_docs():
    _, rules = _makefile()
    steps = [re.match(r"^\$\(MAKE\) ([\w-]+)", line) for line in rules["ci"]]
    assert [s.group(1) for s in steps if s] == ["test", "test-slow", "docs"]
    run = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert run[-1] == "make ci"


def test_markers_are_strict_and_slow_is_registered(pytestconfig):
    assert "--strict-markers" in pytestconfig.getini("addopts")
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))
