"""``pwfn plot RUN_DIR``: the pictures of a run folder as PNG files (the ``plot`` extra, matplotlib).

For a method folder (``runs/<name>/pwfn``) or a comparison folder (``runs/<name>``):

- ``rounds.png``: per round and method, the validation top-1 after fixing and after the retraining
  that follows (the float model's validation top-1 drawn over them), the number of unique values,
  and their entropy in bits;
- ``weights_<method>.png``: the fixed weights' distribution over the shared codebook (one bar per
  codebook value) and, under it, the float model's distribution of the same weights;
- ``layers_<method>.png``: bits per weight (entropy, fixed width, packed after ``pwfn export``)
  and the share of parameters quantised, per layer;
- ``compare.png`` (comparison folders): each method's final test top-1 against entropy, and on
  separate axes its path over the rounds in validation top-1, each with the float model's score.

Every file is written at ``DPI`` dots per inch with the figure sizes below, so a picture's
pixel size is known in advance (the tests check it). Files go to ``RUN_DIR/plots`` unless
``out`` names another folder.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..common.hints import install_hint
from ..errors import PwfnError
from ..run.rundata import (
    float_histogram,
    folder_kind,
    layer_table,
    method_folders,
    read_json,
    read_method,
    weight_values,
)

DPI = 100
#: figure sizes in inches (width, height): a picture is (width * DPI) x (height * DPI) pixels
SIZES = {"rounds": (12.0, 3.8), "weights": (9.0, 6.5), "layers": (10.0, 4.5), "compare": (12.0, 5.0)}
COLOURS = {"pwfn": "#1f77b4", "wfn": "#d62728", "float": "#444444"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PwfnError(f"pictures need matplotlib, which is not installed: {install_hint('plot')}. ({exc})") from exc
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


#: every picture pwfn draws says so in its PNG metadata; an existing file without it is never replaced
_SOFTWARE = "pwfn (matplotlib)"
_MARK = b"Software\x00" + _SOFTWARE.encode()


def _foreign_picture(path: Path) -> Optional[str]:
    """None when ``path`` is free or a picture pwfn drew (it may be replaced), else what it is instead."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 12)  # the metadata chunk comes right after the header
    except OSError as exc:
        return f"cannot be read ({exc})"
    return None if _MARK in head else "is not a picture pwfn drew"


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=DPI, format="png", metadata={"Software": _SOFTWARE})
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)  # pyplot keeps every figure until it is closed
    # a new temp file (O_EXCL: never through a link planted in its place) renamed into place
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _colour(method: str) -> str:
    return COLOURS.get(method, "#2ca02c")


def _float_val(method: Mapping[str, Any], metric: str = "top1") -> Optional[float]:
    """The float model's validation score: the comparison's baseline, else the run's own score before round 1."""
    report = method.get("report") or {}
    for section in (((report.get("baseline") or {}).get("val")), ((report.get("pre") or {}).get("initial"))):
        if isinstance(section, Mapping) and isinstance(section.get(metric), (int, float)):
            return float(section[metric])
    return None


def plot_rounds(methods: Mapping[str, Mapping[str, Any]], path: Path) -> Optional[Path]:
    """Validation top-1, unique values and entropy per round, one line per method, the float model's
    validation top-1 drawn over them (None without rounds)."""
    if not any(m["rounds"] for m in methods.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=SIZES["rounds"], layout="constrained")
    float_val = None
    for name, m in methods.items():
        rows = m["rounds"]
        x = [int(r.get("round", i)) + 1 for i, r in enumerate(rows)]
        fix = [(r.get("after_fix") or {}).get("top1") for r in rows]
        train = [(r.get("after_train") or {}).get("top1") for r in rows]
        c = _colour(name)
        axes[0].plot(x, [math.nan if v is None else v for v in fix], "o--", color=c, alpha=0.6, label=f"{name} after fix")
        if any(v is not None for v in train):
            axes[0].plot(x, [math.nan if v is None else v for v in train], "o-", color=c, label=f"{name} after retraining")
        axes[1].plot(x, [r.get("unique", math.nan) for r in rows], "o-", color=c, label=name)
        axes[2].plot(x, [r.get("entropy", math.nan) for r in rows], "o-", color=c, label=f"{name} (with 0)")
        axes[2].plot(x, [r.get("entropy_nonzero", math.nan) for r in rows], "s:", color=c, alpha=0.6,
                     label=f"{name} (without 0)")
        if float_val is None:
            float_val = _float_val(m)
    if float_val is not None:  # over the methods' lines, in its own style, so a method at float level cannot hide it
        axes[0].axhline(float_val, color=_colour("float"), lw=1.6, ls=(0, (6, 3)), zorder=5,
                        label=f"float model {float_val:.2f}")
    axes[0].set(title="validation top-1 per round", xlabel="round", ylabel="top-1 % (validation split)")
    axes[1].set(title="unique values", xlabel="round", ylabel="values in the codebook")
    axes[2].set(title="entropy of the fixed weights", xlabel="round", ylabel="bits per weight")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_weights(method: Mapping[str, Any], path: Path) -> Optional[Path]:
    """The fixed weights' distribution over the codebook, and under it the float model's distribution of
    the same weights (None before the run finished)."""
    final = (method.get("report") or {}).get("final") or {}
    codebook, counts = final.get("codebook"), final.get("codebook_counts")
    if not codebook or not counts:
        values = weight_values(method)
        if not values:
            return None
        import numpy as np

        cb, cnt = np.unique(np.asarray(values, dtype="float32"), return_counts=True)
        codebook, counts = cb.tolist(), cnt.tolist()
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=SIZES["weights"], layout="constrained", sharex=True)
    total = float(sum(counts))
    span = (max(codebook) - min(codebook)) if len(codebook) > 1 else 1.0
    width = max(span / 400.0, 1e-6)
    top.bar(codebook, [c / total for c in counts], width=width * 2, color=_colour(method["method"]),
            label=f"{len(codebook)} codebook values")
    top.set_yscale("log")
    top.set(title=f"{method['method']}: the fixed weights, one bar per codebook value", ylabel="share of weights")
    top.legend(fontsize=8)
    hist = float_histogram(method)
    if hist is not None:
        n = float(sum(hist["counts"]))
        bottom.stairs([c / n for c in hist["counts"]], hist["edges"], fill=True, color="#999999",
                      label=f"float model ({len(hist['counts'])} equal-width bins)")
        for value in codebook:  # where the float weights were pulled to
            bottom.axvline(value, color=_colour(method["method"]), lw=0.6, alpha=0.5)
        bottom.set_yscale("log")
        bottom.legend(fontsize=8)
    else:
        bottom.text(0.5, 0.5, "the float model's weights are not recorded in this run folder",
                    transform=bottom.transAxes, ha="center", va="center", color="#666666")
    bottom.set(title="the same weights in the float model, before fixing (codebook values as lines)",
               xlabel="weight value", ylabel="share of weights per bin")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layers(method: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Bits per weight and share quantised per layer (None before the run finished)."""
    rows = layer_table(method)
    if not rows:
        return None
    plt = _pyplot()
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=SIZES["layers"], layout="constrained",
                                  gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    series = [("entropy_bits", "entropy"), ("fixed_bits", "fixed width log2(K)"), ("packed_bits", "packed")]
    shown = [(k, label) for k, label in series if any(r.get(k) is not None for r in rows)]
    w = 0.8 / max(len(shown), 1)
    for i, (key, label) in enumerate(shown):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar(x + (i - (len(shown) - 1) / 2) * w, vals, width=w, label=label)
    labels = [r["layer"] for r in rows]
    ax.set_xticks(x, labels, rotation=60 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center",
                  fontsize=7 if len(rows) > 12 else 9)
    ax.set(title=f"{method['method']}: bits per weight per layer", ylabel="bits per weight")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax2.barh(x, [100 * r["coverage"] for r in rows], color=_colour(method["method"]))
    ax2.set_yticks(x, labels, fontsize=7 if len(rows) > 12 else 9)
    ax2.invert_yaxis()
    ax2.set(title="parameters quantised", xlabel="% of the layer's parameters", xlim=(0, 105))
    ax2.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_compare(folder: Path, methods: Mapping[str, Mapping[str, Any]], path: Path) -> Optional[Path]:
    """For a comparison folder: each method's final test top-1 against entropy (left) and, on their own axes,
    its path over the rounds in validation top-1 (right), each with the float model's score on that
    split (None for a method folder)."""
    if not (folder / "compare.json").exists():
        return None
    data = read_json(folder / "compare.json")
    plt = _pyplot()
    fig, (test_ax, val_ax) = plt.subplots(1, 2, figsize=SIZES["compare"], layout="constrained")
    float_val = None
    for row in data.get("table", []):
        name = row.get("method")
        if name == "float":
            if row.get("top1") is not None:
                test_ax.axhline(row["top1"], color=_colour("float"), ls=(0, (6, 3)), lw=1.4,
                                label=f"float model {row['top1']:.2f}%")
            continue
        if row.get("entropy") is not None and row.get("top1") is not None:
            test_ax.scatter([row["entropy"]], [row["top1"]], s=90, color=_colour(name), edgecolor="black", zorder=3,
                            label=f"{name}: {row['top1']:.2f}%, {row['entropy']:.2f} bits, {row.get('unique')} values")
        m = methods.get(name)
        if m and m["rounds"]:
            float_val = float_val if float_val is not None else _float_val(m)
            ent = [r.get("entropy") for r in m["rounds"]]
            acc = [(r.get("after_train") or r.get("after_fix") or {}).get("top1") for r in m["rounds"]]
            pts = [(e, a) for e, a in zip(ent, acc) if e is not None and a is not None]
            if pts:
                val_ax.plot(*zip(*pts), ".-", color=_colour(name), label=f"{name}, round by round")
                val_ax.scatter([pts[-1][0]], [pts[-1][1]], s=40, color=_colour(name), zorder=3)
    if float_val is not None:
        val_ax.axhline(float_val, color=_colour("float"), ls=(0, (6, 3)), lw=1.4, zorder=5,
                       label=f"float model {float_val:.2f}%")
    test_ax.set(title="final: test split", xlabel="entropy of the weights (bits per weight)",
                ylabel="top-1 % (test split)")
    val_ax.set(title="rounds: validation split", xlabel="entropy of the weights (bits per weight)",
               ylabel="top-1 % (validation split)")
    for ax in (test_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_run_dir(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> list[Path]:
    """Write every picture the folder has data for; returns the files written (at least one)."""
    folder = Path(run_dir)
    folder_kind(folder)  # a clear error for a folder that is not a run folder
    _pyplot()  # a clear error before any work when matplotlib is missing
    target = Path(out) if out is not None else folder / "plots"
    methods = {name: read_method(path) for name, path in method_folders(folder).items()}
    if out is not None:  # a folder of the user's: replace only pictures pwfn drew (its own plots/ folder is pwfn's)
        names = ["rounds.png", "compare.png"] + [f"{k}_{m}.png" for m in methods for k in ("weights", "layers")]
        for name in names:
            problem = _foreign_picture(target / name)
            if problem is not None:
                raise PwfnError(f"{str(target / name)!r} exists and {problem}: pwfn never replaces a file it did not "
                                "write. Choose another --out, or move the file away")
    written: list[Path] = []

    def keep(p: Optional[Path]) -> None:
        if p is not None:
            written.append(p)

    try:
        keep(plot_rounds(methods, target / "rounds.png"))
        for name, m in methods.items():
            keep(plot_weights(m, target / f"weights_{name}.png"))
            keep(plot_layers(m, target / f"layers_{name}.png"))
        keep(plot_compare(folder, methods, target / "compare.png"))
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
    if not written:
        raise PwfnError(f"{str(folder)!r} has no completed round yet: nothing to draw")
    return written


def png_size(path: Union[str, Path]) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read from its header."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise PwfnError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def expected_size(kind: str) -> tuple[int, int]:
    """The pixel size of a picture of ``kind`` (``rounds``, ``weights``, ``layers``, ``compare``)."""
    w, h = SIZES[kind]
    return round(w * DPI), round(h * DPI)


__all__: Sequence[str] = ["plot_run_dir", "plot_rounds", "plot_weights", "plot_layers", "plot_compare",
                          "png_size", "expected_size", "SIZES", "DPI"]
