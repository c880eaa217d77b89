"""MkDocs hooks of the pwfn docs site (listed in ``mkdocs.yml``).

- ``<!-- pwfn:config-reference -->`` in a page becomes the config reference, generated from the
  config dataclasses' field docstrings by ``pwfn.tools.configdoc`` (one source: ``pwfn/model/config.py``);
  the build fails when a field has no docstring.
- ``<!-- pwfn:changelog -->`` becomes the repository's ``CHANGELOG.md`` (one file, two places).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    if "<!-- pwfn:config-reference -->" in markdown:
        from pwfn.tools.configdoc import config_reference, undocumented_fields

        missing = undocumented_fields()
        if missing:
            raise SystemExit(f"docs: config fields without a docstring in pwfn/model/config.py: {', '.join(missing)}")
        markdown = markdown.replace("<!-- pwfn:config-reference -->", config_reference(heading_level=2))
    if "<!-- pwfn:changelog -->" in markdown:
        text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the page keeps its own title
        markdown = markdown.replace("<!-- pwfn:changelog -->", body)
    return markdown
