"""The ``pwfn`` command line.

    pwfn run CONFIG [--method pwfn|wfn] [--set key=value ...]
    pwfn compare CONFIG [--set key=value ...]
    pwfn report RUN_DIR
    pwfn export RUN_DIR [--out DIR] [--allow-unfixed] [--onnx]
    pwfn doctor [RUN_DIR]
    pwfn models

Exit codes: 0 success, 1 ``doctor`` found problems, 2 an error (``pwfn: error: ...``),
130 interrupted with Ctrl-C (the last completed round stays checkpointed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .errors import PwfnError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in digits MLP)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pwfn.k=2 (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--out", default=None, help="output folder (overrides out_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the run folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwfn", description="Probabilistic weight fixing networks.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train/load a float model and fix it with one method")
    _common(p_run)
    p_run.add_argument("--method", choices=["pwfn", "wfn"], default=None)
    p_cmp = sub.add_parser("compare", help="float baseline, WFN and PWFN from the same baseline, one table")
    _common(p_cmp)
    p_rep = sub.add_parser("report", help="summarise a run folder")
    p_rep.add_argument("run_dir")
    p_rep.add_argument("--json", action="store_true", help="print the raw report.json")
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
    sub.add_parser("models", help="list the registered models")
    p_doc = sub.add_parser(
        "doctor",
        help="check the environment and, given a run folder, its state; exit 1 when something is wrong",
    )
    p_doc.add_argument("run_dir", nargs="?", default=None,
                       help="a method folder (runs/<name>/pwfn) or a comparison folder (runs/<name>)")
    return parser


def _load(args) -> object:
    from .config import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.no_progress:
        overrides.append("progress=false")
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from .pipeline import run_method

    cfg = _load(args)
    if args.method:
        cfg.method = args.method
    report = run_method(cfg, fresh=args.fresh)
    f = report["final"]
    _out(f"{cfg.method}: top-1 {f['test']['top1']:.2f}% (float {report['baseline']['test']['top1']:.2f}%), "
         f"unique {f.get('unique')}, entropy {f.get('entropy', float('nan')):.3f} bits")
    _out(f"run folder: {Path(cfg.out_dir) / cfg.name / cfg.method}")
    return 0


def cmd_compare(args) -> int:
    from .pipeline import compare, format_table

    cfg = _load(args)
    out = compare(cfg, fresh=args.fresh)
    _out(format_table(out["table"]))
    _out(f"run folder: {Path(cfg.out_dir) / cfg.name}")
    return 0


def cmd_report(args) -> int:
    from .report import summarise_run_dir

    text = summarise_run_dir(args.run_dir, as_json=args.json)
    _out(text)
    return 0


def cmd_export(args) -> int:
    from .export import export_run, format_export_summary

    result = export_run(args.run_dir, args.out, allow_unfixed=args.allow_unfixed, onnx=args.onnx)
    runs = result["runs"] if "runs" in result else {"": result}
    _out("\n\n".join(format_export_summary(r) for r in runs.values()))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import diagnose, format_findings

    findings = diagnose(args.run_dir)
    _out(format_findings(findings))
    return 1 if any(f.level == "problem" for f in findings) else 0


def cmd_models(args) -> int:
    from .models import list_models

    _out("\n".join(list_models()))
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
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": cmd_run, "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
                "models": cmd_models, "doctor": cmd_doctor}
    from .distributed import shutdown_distributed

    try:
        return handlers[args.command](args)
    except PwfnError as exc:
        sys.stderr.write(f"pwfn: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"pwfn: interrupted; {_resume_hint(argv, args.command)}\n")
        return 130
    finally:
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser", "json"]
