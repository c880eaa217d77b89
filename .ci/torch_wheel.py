"""Print the path of a local CPU torch wheel that pip's find-links offer for this interpreter.

Used by ``make setup``: where a machine keeps a CPU build of torch in a find-links folder
(``pip config list`` / ``PIP_FIND_LINKS``), installing that file by path keeps CUDA torch and
its nvidia-* and triton wheels (several GB) out of the venv; torch's own dependencies still come
from the package index. Prints nothing (exit 0) when no such wheel exists, and a line on stderr
saying where it looked. Needs only the standard library and pip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse


def find_links() -> list[str]:
    """Every find-links location pip would use: its config files and PIP_FIND_LINKS."""
    links: list[str] = []
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            links += value.strip().strip("'\"").split()
    links += os.environ.get("PIP_FIND_LINKS", "").split()
    return list(dict.fromkeys(links))


def local_dirs(links: list[str]) -> list[Path]:
    dirs = []
    for link in links:
        if link.startswith("file:"):
            link = unquote(urlparse(link).path)
        elif "://" in link:
            continue  # a remote page: pip itself will read it
        p = Path(link)
        if p.is_dir():
            dirs.append(p)
    return dirs


def supported_tags() -> set[str]:
    try:
        from pip._vendor.packaging.tags import sys_tags
    except ImportError:  # a pip without its vendored packaging: match the plain CPython tag only
        v = f"cp{sys.version_info.major}{sys.version_info.minor}"
        return {f"{v}-{v}-manylinux_2_28_x86_64", f"{v}-{v}-linux_x86_64"}
    return {str(t) for t in sys_tags()}


WHEEL = re.compile(r"^torch-(?P<version>[^-]+)-(?P<tags>.+)\.whl$")


def version_key(version: str) -> tuple:
    release = version.split("+")[0]
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.]", release))


def best_cpu_wheel(dirs: list[Path], tags: set[str]) -> Path | None:
    found = []
    for d in dirs:
        for path in d.glob("torch-*.whl"):
            m = WHEEL.match(path.name)
            if not m or "+cpu" not in m.group("version"):
                continue
            py, abi, plats = m.group("tags").split("-", 2)
            combos = {f"{a}-{b}-{c}" for a in py.split(".") for b in abi.split(".") for c in plats.split(".")}
            if combos & tags:
                found.append((version_key(m.group("version")), path))
    return max(found)[1] if found else None


def main() -> int:
    links = find_links()
    dirs = local_dirs(links)
    wheel = best_cpu_wheel(dirs, supported_tags())
    if wheel is None:
        where = ", ".join(str(d) for d in dirs) or "no local find-links folder"
        sys.stderr.write(f"no local CPU torch wheel for this Python ({where})\n")
        return 0
    print(wheel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
