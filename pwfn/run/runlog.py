"""Round logs beside ``metrics.jsonl``: a flat ``metrics.csv``, the one-line round summary, TensorBoard.

- :func:`write_metrics_csv` rewrites ``metrics.csv`` from the same rows as ``metrics.jsonl``
  (nested values flattened to dotted column names, e.g. ``after_fix.top1``), so a spreadsheet
  or ``pandas.read_csv`` reads the run without parsing JSON;
- :func:`round_line` is the one-line summary logged at INFO after every round;
- :class:`TensorBoardLogger` writes each round's scalars for TensorBoard when the run config
  says ``tensorboard: true`` (the ``tensorboard`` extra).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..common.hints import install_hint
from ..errors import ConfigError

log = logging.getLogger(__name__)

#: columns first in metrics.csv, in this order (when present); every other column follows sorted
LEADING_COLUMNS = ("round", "fraction", "fixed_fraction", "after_fix.top1", "after_train.top1", "unique",
                   "unique_nonzero", "entropy", "entropy_nonzero", "fix_seconds", "wall_seconds")
#: row keys left out of metrics.csv: lists (the codebook is in metrics.jsonl and report.json)
SKIPPED_KEYS = ("codebook", "codebook_counts")


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"after_fix": {"top1": 90.0}}`` -> ``{"after_fix.top1": 90.0}``; lists and None are left out."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key in SKIPPED_KEYS and not prefix:
            continue
        if isinstance(value, Mapping):
            out.update(flatten_row(value, name + "."))
        elif isinstance(value, (str, bool, numbers.Number)):
            out[name] = value
    return out


def metrics_csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The CSV text of ``rows`` (one line per round; the union of all rows' columns)."""
    flat = [flatten_row(r) for r in rows]
    names: set[str] = set().union(*flat) if flat else set()
    columns = [c for c in LEADING_COLUMNS if c in names] + sorted(names - set(LEADING_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow(r)
    return buf.getvalue()


def write_metrics_csv(path: Union[str, Path], rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``path`` (``metrics.csv``) in full, atomically, from the round rows."""
    from ..common.io import atomic_write_text

    atomic_write_text(Path(path), metrics_csv_text(rows))


def _num(value: Any, fmt: str) -> str:
    if isinstance(value, numbers.Number) and not isinstance(value, bool) and math.isfinite(float(value)):
        return format(value, fmt)
    return "-"


def round_line(method: str, row: Mapping[str, Any], n_rounds: int, metric: str = "top1") -> str:
    """``pwfn round 3/10: 60.0% fixed, val top-1 97.20 (after fix 96.90), unique 21, entropy 3.120 bits, 12.3 s``.

    ``metric`` is the task's primary metric (``top1`` for classification, ``mse`` for regression...); the
    figures are the validation split's (the final table at the end of a run is the test split's).
    """
    after_fix = (row.get("after_fix") or {}).get(metric)
    after_train = (row.get("after_train") or {}).get(metric)
    acc = after_train if after_train is not None else after_fix
    label = "val " + ("top-1" if metric == "top1" else metric)
    fmt = ".2f" if metric == "top1" else ".4g"
    text = (f"{method} round {int(row.get('round', 0)) + 1}/{n_rounds}: "
            f"{_num(100 * float(row.get('fixed_fraction', 0.0)), '.1f')}% fixed, {label} {_num(acc, fmt)}")
    if after_train is not None:
        text += f" (after fix {_num(after_fix, fmt)})"
    text += f", unique {row.get('unique', '-')}, entropy {_num(row.get('entropy'), '.3f')} bits"
    c = row.get("contract")
    if isinstance(c, Mapping):  # the accuracy contract's drop on the guard data (after the training when judged then)
        drop = c.get("drop_after_training", c.get("drop"))
        text += f", contract drop {_num(drop, '.3g')} ({c.get('setting', '-')})"
        if c.get("undone_after_training"):
            text += f", {len(c['undone_after_training'])} tr{'y' if len(c['undone_after_training']) == 1 else 'ies'} undone"
    if row.get("wall_seconds") is not None:
        text += f", {_num(row.get('wall_seconds'), '.1f')} s"
    return text


class TensorBoardLogger:
    """Per-round scalars for TensorBoard under ``<run_dir>/tensorboard`` (``tensorboard`` extra).

    Tags are ``<group>/<name>``: ``accuracy/after_fix``, ``accuracy/after_train``,
    ``codebook/unique``, ``codebook/entropy_bits``, ``progress/fixed_fraction``, ``time/round_seconds``
    and, for PWFN, the sigma summary (``sigma/<stat>``); the step is the round number (1-based).
    """

    def __init__(self, log_dir: Union[str, Path], writer: Any = None) -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch present, the tensorboard package missing
                raise ConfigError(
                    f"tensorboard: true needs the 'tensorboard' package: {install_hint('tensorboard')} "
                    f"(or set tensorboard: false). ({exc})"
                ) from exc
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer

    @staticmethod
    def scalars(row: Mapping[str, Any]) -> dict[str, float]:
        """The (tag, value) pairs logged for one round row."""
        out: dict[str, float] = {}

        def put(tag: str, value: Any) -> None:
            if isinstance(value, numbers.Number) and not isinstance(value, bool) and math.isfinite(float(value)):
                out[tag] = float(value)

        put("accuracy/after_fix", (row.get("after_fix") or {}).get("top1"))
        put("accuracy/after_train", (row.get("after_train") or {}).get("top1"))
        put("loss/after_fix", (row.get("after_fix") or {}).get("loss"))
        put("loss/after_train", (row.get("after_train") or {}).get("loss"))
        put("codebook/unique", row.get("unique"))
        put("codebook/unique_nonzero", row.get("unique_nonzero"))
        put("codebook/entropy_bits", row.get("entropy"))
        put("codebook/entropy_bits_nonzero", row.get("entropy_nonzero"))
        put("progress/fixed_fraction", row.get("fixed_fraction"))
        put("time/round_seconds", row.get("wall_seconds"))
        sigma = row.get("sigma")
        if isinstance(sigma, Mapping):
            for key, value in flatten_row(sigma).items():
                put(f"sigma/{key}", value)
        return out

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Write one round's scalars (see :meth:`scalars`) at step ``round + 1`` and flush."""
        step = int(row.get("round", 0)) + 1
        for tag, value in self.scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_tensorboard(enabled: bool, run_dir: Optional[Path], is_main: bool = True) -> Optional[TensorBoardLogger]:
    """A logger when the config asks for one and this process writes the run folder, else None."""
    if not enabled or run_dir is None or not is_main:
        return None
    return TensorBoardLogger(Path(run_dir) / "tensorboard")
