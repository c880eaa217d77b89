"""The architecture holds: the import layers (pyproject's import-linter contract), no import cycles,
function-level imports only where they keep a torch-free module cheap, and no parameter-name schema."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pwfn", "bayes")

#: modules that must import without torch (the CLI's start-up and `pwfn report` / `doctor` stay cheap);
#: they alone may import heavier pwfn modules inside a function
CHEAP = {
    "pwfn", "pwfn.__main__", "pwfn.common.catalog", "pwfn.cli", "pwfn.model.config", "pwfn.tools.configdoc",
    "pwfn.tools.doctor",
    "pwfn.errors", "pwfn.common.files", "pwfn.tools.inspection", "pwfn.run.lock", "pwfn.run.manifest", "pwfn.methods",
    "pwfn.tools.plot", "pwfn.model.presets", "pwfn.model.recipes", "pwfn.run.report", "pwfn.run.rundata", "pwfn.run.runlog",
    "pwfn.core.schedules", "pwfn.run.fingerprints", "pwfn.common.moved",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported pwfn/bayes module, inside a function?, line) for every import of ``module``;
    ``known`` is :func:`_modules`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, path.name == "__init__.py")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                out.append((t, id(node) in inside, node.lineno))
    return out


def test_import_layers_contract_is_kept():
    pytest.importorskip("importlinter", reason="the dev extra installs import-linter")
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                           "import sys; sys.exit(lint_imports(config_filename='pyproject.toml'))"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: {t for t, _, _ in _imports(m, p, mods) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ importing its own modules is how a package is built, not a cycle of ideas
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") or m.startswith(t + "."))}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_function_level_imports_only_keep_cheap_modules_cheap():
    """A pwfn module imported inside a function: only from a torch-free module, and only a module that
    is not torch-free itself (anything else belongs at the top, where the coupling shows). The CLI is
    the exception: each subcommand imports what it needs, so every command starts with only its own."""
    bad = []
    mods = _modules()
    for m, path in mods.items():
        for target, inside, line in _imports(m, path, mods):
            if not inside or m == "pwfn.cli":
                continue
            if m not in CHEAP or any(target == c for c in CHEAP):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert bad == []


def test_cheap_modules_import_without_torch():
    code = ("import importlib, sys\n"
            f"for m in {sorted(CHEAP)!r}:\n"
            "    importlib.import_module(m)\n"
            "heavy = sorted(n for n in ('torch', 'numpy', 'safetensors') if n in sys.modules)\n"
            "assert 'torch' not in sys.modules, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_no_parameter_name_suffix_schema():
    """Masks and sigmas are found through the parametrizations and the fixing state, never by a name
    suffix built or parsed in the code (a user's own `*_fixed` buffer is left alone)."""
    suffixes = ('"_fixed"', "'_fixed'", '"_mu"', "'_mu'", '"_sigma"', "'_sigma'")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _modules().values()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if any(s in line for s in suffixes)]
    assert hits == []


def _layer_of_folder() -> dict[str, int]:
    """Each ``pwfn/<folder>/`` (and ``bayes/``) to its layer's index in the contract, 0 the top."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    out = {}
    for i, layer in enumerate(contract["layers"]):
        for module in (m.strip() for m in layer.split(":")):
            path = ROOT / module.replace(".", "/")
            if path.is_dir():
                out[f"{module.replace('.', '/')}/"] = i
    return out


def _table_rows(text: str) -> list[tuple[list[str], str]]:
    """(the folders a row names in its first cell, the rest of the row) of a markdown table."""
    import re

    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            rows.append((re.findall(r"`([\w/]+/)`", cells[0]), " | ".join(cells[1:])))
    return rows


def test_every_package_folder_is_one_layer_of_the_contract():
    folders = {f"pwfn/{p.name}/" for p in (ROOT / "pwfn").iterdir() if (p / "__init__.py").is_file()}
    layers = _layer_of_folder()
    assert folders | {"bayes/"} == set(layers), "a folder of pwfn/ that the import contract does not place"
    # no modules left in the flat room but the public entry points
    flat = {p.name for p in (ROOT / "pwfn").glob("*.py")}
    assert flat == {"__init__.py", "__main__.py", "cli.py", "errors.py"}


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_layout_tables_are_drawn_from_the_folders_and_their_layers(doc):
    names = ["tools and CLI", "persistence and export", "training and orchestration", "model plumbing", "algorithm",
             "base utilities"]
    layers = _layer_of_folder()
    assert len(names) == len({*layers.values()})
    seen = set()
    for folders, rest in _table_rows((ROOT / doc).read_text()):
        for folder in (f for f in folders if f in layers):
            seen.add(folder)
            said = [n for n in names if n in rest.split(":")[0]]
            assert said == [names[layers[folder]]], f"{doc}: {folder} is in the layer {names[layers[folder]]!r}"
    assert seen == set(layers), f"{doc} has no row for {sorted(set(layers) - seen)}"
