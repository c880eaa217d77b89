"""The ``pwfn`` command line.

    pwfn run CONFIG [--method pwfn|wfn] [--set key=value ...]
    pwfn compare CONFIG [--set key=value ...]
    pwfn report RUN_DIR [--plot]
    pwfn plot RUN_DIR [--out DIR]
    pwfn inspect FILE.pwfn
    pwfn export RUN_DIR [--out DIR] [--allow-unfixed] [--onnx] [--to TARGETS] [--model MODULE:FACTORY]
    pwfn doctor [RUN_DIR]
    pwfn models

Exit codes: 0 success, 1 ``doctor`` found problems, 2 an error (``pwfn: error: ...``),
130 interrupted with Ctrl-C, 143 terminated with SIGTERM (either way the last completed round
stays checkpointed and the resume command is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from . import __version__
from .common.console import FORMAT as LOG_FORMAT
from .common.console import enable_logging
from .common.hints import command_line
from .errors import PwfnError, os_error_message
from .methods import check_method_name, method_names
from .model.config import load_config
from .model.presets import resolve_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config file, or the name of a shipped config such as digits_mlp "
                        "(default: the built-in digits MLP settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pwfn.k=2 (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--out", default=None, help="output folder (overrides out_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the run folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true",
                   help="refuse to start when any parameter would stay float (quantise.strict=true)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pwfn`` command (no torch import)."""
    parser = argparse.ArgumentParser(prog="pwfn", description="Probabilistic weight fixing networks.")
    parser.add_argument("--version", action="version", version=f"pwfn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v debug: per-rank checksums, data details)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings and errors only (no per-round summary lines)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train/load a float model and fix it with one method")
    _common(p_run)
    p_run.add_argument("--method", choices=list(method_names()), default=None)
    p_cmp = sub.add_parser("compare", help="float baseline, WFN and PWFN from the same baseline, one table")
    _common(p_cmp)
    p_rep = sub.add_parser("report", help="summarise a run folder")
    p_rep.add_argument("run_dir")
    p_rep.add_argument("--json", action="store_true", help="print the raw report.json")
    p_rep.add_argument("--plot", action="store_true", help="also write the PNG pictures (as `pwfn plot`)")
    p_plot = sub.add_parser("plot", help="draw a run folder's pictures as PNG files (needs the 'plot' extra)")
    p_plot.add_argument("run_dir", help="a method folder (runs/<name>/pwfn) or a comparison folder (runs/<name>)")
    p_plot.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    p_ins = sub.add_parser("inspect", help="show what a packed .pwfn file holds")
    p_ins.add_argument("file", help="a packed artefact, e.g. runs/<name>/pwfn/export/model.pwfn")
    p_ins.add_argument("--json", action="store_true", help="print the details as JSON")
    p_exp = sub.add_parser(
        "export",
        help="write the point-estimate model, the packed artefact and the size report of a fixed run",
    )
    p_exp.add_argument("run_dir", help="a method folder (runs/<name>/pwfn) or a comparison folder (runs/<name>)")
    p_exp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export; per method for a comparison)")
    p_exp.add_argument("--allow-unfixed", action="store_true",
                       help="export a run that is not 100%% fixed, keeping unfixed weights as raw floats")
    p_exp.add_argument("--onnx", action="store_true",
                       help="also write model.onnx, checked with onnxruntime (needs the 'onnx' extra)")
    p_exp.add_argument("--to", action="append", default=[], metavar="TARGET[,TARGET]",
                       help="also export to device targets: onnx (codebook + packed indices), tflm (TFLite-Micro, "
                            "LUT-compressed), hls4ml (shift-product HLS project, C-simulated); each is checked "
                            "end to end before anything is written, and its sizes and multiplications left are "
                            "reported (repeatable)")
    p_exp.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                       help="how to build the model when the run records no recipe (a model passed in from Python) "
                            "or records a function: an importable class or function, e.g. mypkg.models:make_net "
                            "(the current folder is importable), or a registered model name")
    p_exp.add_argument("--model-kwargs", default=None, metavar="JSON",
                       help="keyword arguments for --model as a JSON object, e.g. '{\"hidden\": 32}' (default: the "
                            "run's recorded arguments when it recorded the same factory, else none)")
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("configs", help="list the shipped configs (usable by name: pwfn compare digits_mlp)")
    p_doc = sub.add_parser(
        "doctor",
        help="check the environment and, given a run folder, its state; exit 1 when something is wrong",
    )
    p_doc.add_argument("run_dir", nargs="?", default=None,
                       help="a method folder (runs/<name>/pwfn) or a comparison folder (runs/<name>)")
    return parser


def _load(args) -> object:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.no_progress:
        overrides.append("progress=false")
    if getattr(args, "strict", False):
        overrides.append("quantise.strict=true")
    return load_config(resolve_config(args.config), overrides)


def cmd_run(args) -> int:
    cfg = _load(args)  # before importing the pipeline (and torch): a config typo answers at once
    if args.method:
        cfg.method = args.method
    check_method_name(cfg.method)  # a misspelt method answers at once too
    from .run.experiment import run_method

    report = run_method(cfg, fresh=args.fresh)
    f = report["final"]
    _out(f"{cfg.method}: top-1 {f['test']['top1']:.2f}% (float {report['baseline']['test']['top1']:.2f}%), "
         f"unique {f.get('unique')}, entropy {f.get('entropy', float('nan')):.3f} bits")
    _out(f"run folder: {Path(cfg.out_dir) / cfg.name / cfg.method}")
    return 0


def cmd_compare(args) -> int:
    cfg = _load(args)  # before importing the pipeline (and torch): a config typo answers at once
    from .run.experiment import compare
    from .run.report import format_table

    out = compare(cfg, fresh=args.fresh)
    _out(format_table(out["table"]))
    _out(f"run folder: {Path(cfg.out_dir) / cfg.name}")
    return 0


def cmd_report(args) -> int:
    from .run.report import summarise_run_dir

    text = summarise_run_dir(args.run_dir, as_json=args.json)
    _out(text)
    if args.plot:
        from .tools.plot import plot_run_dir

        paths = plot_run_dir(args.run_dir)
        _out("\n".join(f"wrote {p}" for p in paths))
    return 0


def cmd_plot(args) -> int:
    from .tools.plot import plot_run_dir

    paths = plot_run_dir(args.run_dir, args.out)
    _out("\n".join(f"wrote {p}" for p in paths))
    return 0


def cmd_inspect(args) -> int:
    from .tools.inspection import format_inspection, inspect_file

    info = inspect_file(args.file)
    _out(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    from .export.targets import check_targets
    from .model.recipes import ensure_cwd_importable, parse_model_spec
    from .run.report import format_export_summary, format_targets

    targets: list[str] = []
    if args.to:
        targets = check_targets(args.to)  # unknown names or missing extras: refused before any work
    model = None
    if args.model_kwargs is not None and args.model is None:
        from .errors import ConfigError

        raise ConfigError("--model-kwargs goes with --model")
    ensure_cwd_importable()  # a recipe's module:factory may live in the current folder, as with python -m
    if args.model is not None:
        # the recorded kwargs of the same factory are filled in by the export (parse_model_spec sees the run's)
        model = args.model if args.model_kwargs is None else parse_model_spec(args.model, args.model_kwargs)
    # the base export and every target are built and checked in memory first: a failure writes nothing
    result = export_run(args.run_dir, args.out, allow_unfixed=args.allow_unfixed, onnx=args.onnx, targets=targets,
                        model=model)
    runs = result["runs"] if "runs" in result else {"": result}
    texts = []
    for r in runs.values():
        text = format_export_summary(r)
        if r.get("targets"):
            text += "\n" + format_targets(r["targets"])
        texts.append(text)
    _out("\n\n".join(texts))
    return 0


def cmd_doctor(args) -> int:
    from .tools.doctor import diagnose, format_findings

    findings = diagnose(args.run_dir)
    _out(format_findings(findings))
    return 1 if any(f.level == "problem" for f in findings) else 0


def cmd_models(args) -> int:
    from .common.catalog import format_models  # a static table: listing models needs no torch

    _out(format_models())
    return 0


def cmd_configs(args) -> int:
    from .model.presets import config_dir, list_configs

    _out("\n".join(list_configs()) + f"\n(in {config_dir()})")
    return 0


def _out(text: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks
        return
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _resume_hint(argv: Sequence[str], command: str) -> str:
    """The command that resumes an interrupted run: the same one, without --fresh."""
    if command not in ("run", "compare"):
        return "rerun the command to start it again"
    again = [a for a in argv if a != "--fresh"]
    same = "the same command without --fresh" if len(again) < len(argv) else "the same command"
    return f"the last completed round is checkpointed; resume with {same}: pwfn {shlex.join(again)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``pwfn`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    level = _log_level(args)
    # other libraries stay at WARNING (or DEBUG with -v); pwfn's and bayes' own loggers say INFO, written
    # around the progress bars
    logging.basicConfig(level=min(level, logging.WARNING), format=LOG_FORMAT)
    enable_logging(level)
    handlers = {"run": cmd_run, "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
                "models": cmd_models, "doctor": cmd_doctor, "plot": cmd_plot, "inspect": cmd_inspect,
                "configs": cmd_configs}

    succeeded = False
    try:
        with _sigterm_as_interrupt(), command_line():  # messages speak the command line's language
            code = handlers[args.command](args)
            succeeded = code == 0
            return code
    except PwfnError as exc:
        sys.stderr.write(f"pwfn: error: {exc}\n")
        return 2
    except _Terminated:
        sys.stderr.write(f"pwfn: terminated (SIGTERM); {_resume_hint(argv, args.command)}\n")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write(f"pwfn: interrupted; {_resume_hint(argv, args.command)}\n")
        return 130
    except OSError as exc:  # a full disk, a read-only filesystem ... outside pwfn's own file writes
        sys.stderr.write(f"pwfn: error: {os_error_message(exc)}\n")
        return 2
    finally:
        # only a command that used torch can have started a process group (and `models`,
        # `report`, `--help` must not pay for importing torch just to shut nothing down)
        if "pwfn.training.distributed" in sys.modules:
            sys.modules["pwfn.training.distributed"].shutdown_distributed(synchronise=succeeded)
        enable_logging(None)  # main() called from Python removes its console handler again


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the file being written is completed, the round checkpointed
    last is kept, the resume command is printed and the exit status is 143."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into :class:`_Terminated` while a command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _log_level(args) -> int:
    """INFO by default (a one-line summary per round, terminal or not), DEBUG with -v, WARNING with -q.

    Under torchrun only rank 0 logs at INFO; the other ranks say warnings (and, with -v, debug).
    """
    if args.quiet:
        return logging.WARNING
    if args.verbose:
        return logging.DEBUG
    return logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser", "json"]
