"""Documentation facts that a test can hold: every config field documented at its definition,
the generated reference complete, the README's links inside the repository, the docs' pictures real."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import pytest

from pwfn.model.config import RunConfig
from pwfn.tools import configdoc

ROOT = Path(__file__).resolve().parent.parent


def test_every_config_field_has_a_docstring():
    assert configdoc.undocumented_fields() == []


def test_sections_cover_every_nested_config():
    prefixes = {p for p, _ in configdoc.SECTIONS}
    assert {"", "data", "model", "baseline", "pwfn", "pwfn.engine", "wfn", "wfn.engine"} <= prefixes
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            assert f.name in prefixes, f.name


def test_reference_lists_every_key_with_its_default():
    text = configdoc.config_reference()
    for key in configdoc.all_keys():
        assert f"| `{key}` |" in text, key
    assert "| `pwfn.lam` | number | `2^-11 (0.000488281)` |" in text
    assert "| `wfn.delta` | number | `0.01` |" in text
    assert "| `data.root` | text or null | `null` |" in text
    assert "(undocumented)" not in text


def test_field_docs_reads_attribute_docstrings():
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """First."""
        b: str = "x"  # a comment, no docstring
        c: float = 2.0
        """Third,
        on two lines."""

    docs = configdoc.field_docs(Example)
    assert docs == {"a": "First.", "c": "Third,\non two lines."}


def test_readme_links_stay_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links, "the README links its documents"
    for link in links:
        assert "://" not in link and not link.startswith(".."), link
        target = ROOT / link.split("#")[0]
        assert target.exists(), link
    assert "docs/algorithm.md" in links


def test_docs_pictures_are_real_pngs_of_the_expected_size():
    pytest.importorskip("PIL")
    from PIL import Image

    from pwfn.tools.plot import expected_size

    kinds = {"rounds.png": "rounds", "compare.png": "compare", "weights_pwfn.png": "weights",
             "weights_wfn.png": "weights", "layers_pwfn.png": "layers", "layers_wfn.png": "layers"}
    for name, kind in kinds.items():
        with Image.open(ROOT / "docs" / "img" / name) as im:
            im.load()
            assert im.size == expected_size(kind), name
            assert len(set(im.convert("RGB").getdata())) > 20, name


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    for page in pages:
        assert page in nav, page


def _api_objects() -> list[str]:
    """Every object the API pages render: `::: module.obj` lines and their `members:` lists."""
    names = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        current = None
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                current = line[4:].strip()
                names.append(current)
            elif line.strip().startswith("members: [") and current:
                names += [f"{current}.{m.strip()}" for m in line.split("[", 1)[1].rstrip("]").split(",")]
    return names


#: API-reference modules that need an optional extra, and the package each imports
NEEDS_EXTRA = {"pwfn.integrations.lightning": "lightning.pytorch", "pwfn.integrations.huggingface": "transformers"}


def _resolve(name: str):
    """The object ``name`` names: the longest importable module prefix, then attributes."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if not _is_module(module):
            continue
        obj = importlib.import_module(module)
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{name} names nothing importable")


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:  # a parent that is not a package
        return False


def test_the_api_reference_names_the_main_objects():
    names = _api_objects()
    assert "pwfn.run.pipeline.compress" in names and "pwfn.tools.plot.plot_run_dir" in names and "bayes" in names
    assert set(NEEDS_EXTRA) <= {n.rsplit(".", 1)[0] for n in names} | set(names)


@pytest.mark.parametrize("name", _api_objects())
def test_every_object_of_the_api_reference_has_a_docstring(name):
    import inspect

    for module, package in NEEDS_EXTRA.items():  # without the extra the page cannot render here: skip, saying so
        if name == module or name.startswith(module + "."):
            pytest.importorskip(package, reason=f"{name} needs the optional package {package}")
    assert (inspect.getdoc(_resolve(name)) or "").strip(), f"{name} has no docstring"
