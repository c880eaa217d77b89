"""Shared helpers of the benchmark scripts: machine description, Markdown tables, JSON, timing.

Not part of the ``pwfn`` package; the scripts in this folder import it with the folder on
``sys.path`` (``python benchmarks/<script>.py`` puts it there).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, load, library versions)."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(m: dict[str, Any]) -> str:
    parts = [m.get("cpu", platform.processor() or "unknown CPU"),
             f"{m.get('cpu_count')} cores (torch threads {m.get('torch_threads')})"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    parts.append("CUDA available" if m.get("cuda") else "no GPU")
    if m.get("loadavg_at_start"):
        parts.append(f"load average at start {tuple(m['loadavg_at_start'])}")
    parts.append(f"Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}")
    return ", ".join(str(p) for p in parts)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}"] + [shlex.quote(a) for a in args])


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def header(title: str, script: str, argv: Sequence[str] | None, m: dict[str, Any],
           command: str | None = None, date: str | None = None) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Command: `{command or command_line(script, argv)}`  ",
        f"Machine: {machine_line(m)}  ",
        f"Date: {date or utc_now()}",
        "",
    ]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 10:
            return f"{v:.2f}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(heads: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, doc: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    mp.write_text(markdown.rstrip() + "\n")
    return jp, mp


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:
        return False
    return True


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------
# resident-memory peaks (Linux): what one block of work allocates on top of what was live


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """``with PeakRSS() as p: work()`` -> ``p.extra_bytes``: peak RSS during the block above RSS before.

    Uses ``/proc/self/clear_refs`` (5 resets the high-water mark) after returning freed heap
    to the OS; ``extra_bytes`` is None where that is not possible (non-Linux, no permission).
    """

    def __enter__(self) -> PeakRSS:
        trim_heap()
        self.ok = True
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.ok = False
        self.before_kb = _status_kb("VmRSS")
        self.extra_bytes: int | None = None
        return self

    def __exit__(self, *exc) -> bool:
        peak = _status_kb("VmHWM")
        if self.ok and peak >= 0 and self.before_kb >= 0:
            self.extra_bytes = max(0, peak - self.before_kb) * 1024
        return False
