"""CI layout: `make test` and `make test-slow` together run every test, and `make ci` runs both.

`make test` selects ``-m "not slow"`` and `make test-slow` ``-m slow`` through the same pytest
command, so a test is in exactly one of them and nothing is dropped; `--strict-markers` turns a
misspelt marker into an error instead of a slow test moved into the fast part. CI (`.ci/run`)
first runs the README's own commands (`make demo`, `make test`) in a fresh clone with the lean
default extras, then `make ci`: the fast tests, the slow tests as their own step, then the docs.
"""

from __future__ import annotations

import re
import subprocess
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
    run = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
           if line.strip() and not line.lstrip().startswith(("#", "echo"))]
    assert "make ci" in run


def _readme_commands_as_ci_reads_them() -> list[str]:
    """What .ci/run extracts from the README (its own function, run by bash)."""
    script = (ROOT / ".ci" / "run").read_text()
    func = re.search(r"^readme_commands\(\) \{.*?^\}", script, re.S | re.M)
    assert func, ".ci/run defines readme_commands"
    out = subprocess.run(["bash", "-c", f'root="$1"\n{func.group(0)}\nreadme_commands', "ci", str(ROOT)],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_ci_runs_the_readmes_first_commands_in_a_fresh_clone_before_make_ci():
    assert _readme_commands_as_ci_reads_them() == ["make demo", "make test"]
    script = (ROOT / ".ci" / "run").read_text()
    clone, loop, ci = script.index("git clone"), script.index('bash -euo pipefail -c "$cmd"'), script.index("\nmake ci")
    assert clone < loop < ci  # the README's commands in the clone, then the full CI here
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert any('cd "$fresh"' in line for line in code)
    assert not any("EXTRAS" in line for line in code)  # the clone gets the Makefile's default extras
    variables, _ = _makefile()
    lean = set(variables["EXTRAS"].split(","))
    assert lean == {"dev", "data", "plot"} and lean < set(variables["CI_EXTRAS"].split(","))


def test_markers_are_strict_and_slow_is_registered(pytestconfig):
    assert "--strict-markers" in pytestconfig.getini("addopts")
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))
