"""The config reference, generated from the config definitions themselves (``pwfn/model/config.py``).

Each field of the config dataclasses carries its documentation as an attribute docstring (the
string literal right below the field). :func:`field_docs` reads them from the source with
``ast``; :func:`config_reference` renders one Markdown table per section with every field's
key, type, default and text. The docs site inserts that table (``docs/hooks.py``), and a test
checks that no field is left without a docstring, so a new field cannot go undocumented.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from ..model import config as C


def sections(cls: type = C.RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for every section reachable from ``RunConfig``, in field order.

    Walked from the type hints, so a section added to the config appears here by itself.
    """
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += sections(tp, f"{prefix}.{f.name}" if prefix else f.name)
    return out


SECTIONS: list[tuple[str, type]] = sections()


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of a dataclass, read from the string literal under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                out[node.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def undocumented_fields() -> list[str]:
    """Dotted keys of every config field without a docstring ([] when all are documented)."""
    missing = []
    for prefix, cls in SECTIONS:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not docs.get(f.name, "").strip():
                missing.append(f"{prefix}.{f.name}" if prefix else f.name)
    return missing


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_text(a) for a in args) + " or null"
    if dataclasses.is_dataclass(tp):
        return "section"
    names = {bool: "true/false", int: "integer", float: "number", str: "text", list: "list", dict: "mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        import math

        exp = math.log2(abs(value))
        if exp.is_integer():
            return f"2^{int(exp)} ({value:g})"
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference(heading_level: int = 2) -> str:
    """Markdown: one table per config section (key, type, default, meaning)."""
    hashes = "#" * heading_level
    parts = []
    for prefix, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        title = f"`{prefix}`" if prefix else "top level"
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        parts.append(f"{hashes} {title}\n\n{summary}\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            parts.append(f"| `{key}` | {_type_text(hints[f.name])} | `{_cell(_default_text(f))}` | "
                         f"{_cell(docs.get(f.name, '(undocumented)'))} |")
        parts.append("")
    return "\n".join(parts)


def all_keys() -> list[str]:
    """Every dotted config key that the reference documents."""
    return [f"{p}.{f.name}" if p else f.name for p, cls in SECTIONS for f in dataclasses.fields(cls)]
