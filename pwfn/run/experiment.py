"""The config-driven commands: ``pwfn run`` and ``pwfn compare``.

From a :class:`~pwfn.model.config.RunConfig` alone: build the data and the model, get the float
baseline (from ``model.checkpoint``, the run folder, or by training), then run one method or
compare WFN and PWFN from the same baseline, each in its own folder under ``out_dir/name``
through :class:`pwfn.run.pipeline.FixingRun`. Every check that can refuse a run happens before the
run folder is touched; a comparison writes ``compare.json`` and ``compare.md``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..common.files import parse_json, regular_file_problem
from ..common.hints import start_over
from ..common.io import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    load_state_dict_strict,
    remove_stale_temp_files,
    save_checkpoint,
    to_jsonable,
)
from ..data import STREAM_SHUFFLE, make_loaders, torch_generator
from ..errors import CheckpointError, ConfigError, ContractError, PwfnError
from ..methods import get_method
from ..model.config import RunConfig, config_to_dict, dump_config
from ..model.zoo import build_from_recipe, model_factory
from ..training.checks import check_first_batch
from ..training.distributed import ContiguousShard, DistContext, GlobalBatchShard, init_distributed
from ..training.train import (
    EpochCounter,
    evaluate,
    first_nonfinite_weight,
    make_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
    train_epochs,
)
from .fingerprints import (
    file_fingerprint,
    model_fingerprint,
    refuse_changed_inputs,
    splits_fingerprint,
)
from .lock import RunLock, acquire, check_free
from .manifest import load_json
from .ownership import RUN, claim, clear_run_folder, mark
from .pipeline import (
    BASELINE_SECTIONS,
    FixingResult,
    FixingRun,
    RoundCallback,
    check_model,
    divergence_advice,
    load_run_checkpoint,
    manifest_or_none,
    refuse_changed_config,
    run_sections,
    wrap_ddp,
)
from .report import format_table

log = logging.getLogger(__name__)

#: the methods `pwfn compare` runs from one float baseline, in this order
COMPARED = ("wfn", "pwfn")


def build_loaders(cfg: RunConfig, dist: Optional[DistContext] = None):
    """The config's loaders; under DDP each rank gets its shard of every global batch."""
    d = cfg.data
    kwargs: dict[str, Any] = dict(
        batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, seed=d.seed, num_workers=d.num_workers,
        pin_memory=d.pin_memory, augment=d.augment, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
        train_subset=d.train_subset, val_subset=d.eval_subset, test_subset=d.eval_subset,
    )
    if dist is not None and dist.enabled:
        world, rank, seed = dist.world_size, dist.rank, d.seed

        def order(n: int):
            # the single-process order of each epoch (same stream as the unsharded loader)
            return lambda epoch: torch.randperm(n, generator=torch_generator(seed, STREAM_SHUFFLE, epoch))

        kwargs["batch_size"] = d.batch_size // world if d.batch_size % world == 0 else d.batch_size
        kwargs["sampler"] = lambda ds: GlobalBatchShard(order(len(ds)), len(ds), d.batch_size, rank, world)
        kwargs["eval_sampler"] = lambda ds: ContiguousShard(len(ds), rank, world)
    options = dict(d.options)
    if d.image_size is not None:
        options.setdefault("image_size", d.image_size)
    return make_loaders(d.name, d.root, **kwargs, **options)


def model_recipe(cfg: RunConfig, loaders) -> dict:
    """The model's name and keyword arguments, with shape arguments filled from the data."""
    kwargs = dict(cfg.model.kwargs)
    factory = model_factory(cfg.model.name)
    if factory is not None:
        params = inspect.signature(factory).parameters
        swallow = [p for p in params.values() if p.kind == inspect.Parameter.VAR_KEYWORD and p.name.startswith("_")]
        if swallow:  # the constructor would silently ignore a misspelt key: refuse it instead
            named = [n for n, p in params.items()
                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
            for key in kwargs:
                if key not in named:
                    close = difflib.get_close_matches(str(key).split(":")[0], named, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    yaml_hint = " (YAML needs a space after ':' in {key: value})" if ":" in str(key) else ""
                    raise ConfigError(f"model.kwargs has the key {key!r}, which model {cfg.model.name!r} does not "
                                      f"take{yaml_hint}.{hint} It takes: {', '.join(named)}")
        c, h, w = loaders.input_shape
        derived = {"num_classes": loaders.num_classes, "in_channels": c, "in_features": c * h * w, "input_size": h}
        for key, value in derived.items():
            if key in params and params[key].kind != inspect.Parameter.VAR_KEYWORD:
                kwargs.setdefault(key, value)
    return {"name": cfg.model.name, "kwargs": kwargs}


def train_baseline(cfg: RunConfig, model: nn.Module, loaders, dist: DistContext) -> dict[str, Any]:
    b = cfg.baseline
    opt = make_optimizer(model.parameters(), b.optimizer, b.lr, b.momentum, b.weight_decay)
    steps = max(1, math.ceil(b.epochs * len(loaders.train)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if b.cosine else None
    stats = train_epochs(wrap_ddp(model, dist), loaders.train, opt, b.epochs, dist.device, counter=EpochCounter(),
                         grad_clip=b.grad_clip, scheduler=sched, desc="float baseline",
                         progress=cfg.progress and dist.is_main, dist=dist, inner=model,
                         bf16=cfg.precision == "bf16", advice=divergence_advice(cfg, "baseline"))
    return stats


def _folder(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


@dataclass
class Prepared:
    """What every command needs before fixing: process group, data, recipe and float baseline."""

    dist: DistContext
    loaders: Any
    recipe: dict
    model: nn.Module
    baseline: dict
    inputs: dict = field(default_factory=dict)  # fingerprints of the data and model.checkpoint
    lock: Optional[RunLock] = None  # the run folder's lock, held until release()

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def release(self) -> None:
        """Release the run folder's lock (the command is done with the folder)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __iter__(self):
        # unpacks like the earlier tuple: device, loaders, recipe, model, baseline
        return iter((self.device, self.loaders, self.recipe, self.model, self.baseline))


def prepare_run(cfg: RunConfig, methods: tuple[str, ...] = (), *, resume: bool = True,
                fresh: bool = False) -> Prepared:
    """Seed, threads, device (and process group under torchrun), data, and the float baseline
    (from ``model.checkpoint``, reused from the run folder, or trained).

    Everything that can be checked before writing is checked first: the data, the model
    recipe, ``model.checkpoint``, the saved baseline and, for ``methods`` (with ``resume``),
    their checkpoints and whether the model suits them. Only then is the run folder touched:
    a refused run creates no folder and changes no file in an existing one. ``fresh`` deletes
    the run folder at that point (after the checks, so a refused ``--fresh`` deletes nothing).
    """
    folder = _folder(cfg)
    # a folder pwfn did not make (or a symlink, with --fresh) is refused before anything is read
    claim(folder, RUN, fresh=fresh)
    dist = init_distributed(cfg.device)
    if dist.is_main:
        check_free(folder)  # another process writes this run folder: fail now, before loading anything
    seed_everything(cfg.seed)  # identical on every rank: weight noise must agree across ranks
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaders = build_loaders(cfg, dist)
    if loaders.val is None and loaders.test is None:
        raise ConfigError(f"data {cfg.data.name!r} leaves no evaluation split (val_fraction = "
                          f"{cfg.data.val_fraction}, test_fraction = {cfg.data.test_fraction}): set "
                          "data.val_fraction or data.test_fraction above 0")
    recipe = model_recipe(cfg, loaders)
    model = build_from_recipe(recipe).to(dist.device)
    # the model's settings must fit the data (e.g. num_classes): checked on the first batch
    check_first_batch(model, loaders.train, dist.device, "training data", required=True,
                      num_classes=loaders.num_classes)
    inputs: dict[str, Any] = {"data": splits_fingerprint(loaders)}
    if cfg.model.checkpoint:
        problem = regular_file_problem(cfg.model.checkpoint)
        if problem is not None:  # a FIFO or /dev/zero would block or never end
            raise ConfigError(f"model.checkpoint {cfg.model.checkpoint!r} {problem}")
        try:
            inputs["checkpoint"] = file_fingerprint(cfg.model.checkpoint)
        except OSError as exc:
            raise ConfigError(f"model.checkpoint {cfg.model.checkpoint!r} cannot be read: {exc}") from exc
    base_path = folder / "baseline.pt"
    resume = resume and not fresh
    info: dict[str, Any] = {}
    base_state: Optional[dict] = None
    if cfg.model.checkpoint:
        state = _load_user_checkpoint(cfg.model.checkpoint)
        load_state_dict_strict(model, state, cfg.model.checkpoint)
        bad = first_nonfinite_weight(model)
        if bad is not None:
            raise CheckpointError(f"model.checkpoint {cfg.model.checkpoint!r} is not finite: {bad}")
        info["source"] = f"checkpoint {cfg.model.checkpoint}"
    elif resume and base_path.exists():
        try:
            base_state = load_checkpoint(base_path, kind="baseline", map_location=dist.device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. Delete it to retrain the float baseline, or start over with "
                                  f"{start_over()}") from exc
        refuse_changed_config(base_state.get("config"), cfg, base_path, BASELINE_SECTIONS)
        refuse_changed_inputs(base_state.get("inputs"), inputs, base_path, keys=("data",))
        load_state_dict_strict(model, base_state["model"], str(base_path))
    known = dict(inputs)
    if cfg.model.checkpoint or base_state is not None:  # the float model is known before training
        known["model"] = model_fingerprint(model)
    for method in methods:
        fixed_model = check_model(method, cfg, model)
        ckpt = folder / method / "checkpoint.pt"
        if resume and ckpt.exists():
            saved = load_run_checkpoint(ckpt, method)
            refuse_changed_config(saved.get("config"), cfg, ckpt, run_sections(method))
            saved_inputs = saved.get("inputs") or (manifest_or_none(folder / method) or {}).get("inputs")
            refuse_changed_inputs(saved_inputs, known, ckpt)
            try:
                load_state_dict_strict(fixed_model, saved["model"], str(ckpt))
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}. Start this method over with {start_over()} (or delete the file)") from exc
    # every check passed: from here on the run folder is written, under its lock
    lock = acquire(folder) if dist.is_main else None
    try:
        return _prepare_in_folder(cfg, dist, loaders, recipe, model, folder, base_state, info, inputs, lock, fresh)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _prepare_in_folder(cfg: RunConfig, dist: DistContext, loaders, recipe: dict, model: nn.Module, folder: Path,
                       base_state: Optional[dict], info: dict[str, Any], inputs: dict[str, Any],
                       lock: Optional[RunLock], fresh: bool) -> Prepared:
    base_path = folder / "baseline.pt"
    if dist.is_main:
        if fresh:  # only what pwfn wrote; the lock stays held
            clear_run_folder(folder)
        mark(folder, RUN)
        remove_stale_temp_files(folder)
        atomic_write_text(folder / "config.yaml", dump_config(cfg))
    if base_state is not None:
        set_rng_state(base_state["rng"])
        info = dict(base_state["info"])
        info["reused"] = True
    elif not cfg.model.checkpoint:
        t0 = time.perf_counter()
        info["train"] = train_baseline(cfg, model, loaders, dist)
        info["source"] = "trained"
        info["seconds"] = time.perf_counter() - t0
        if dist.is_main:
            save_checkpoint(base_path, {"model": model.state_dict(), "rng": rng_state(), "info": info,
                                        "config": config_to_dict(cfg), "inputs": {"data": inputs["data"]}},
                            kind="baseline")
        dist.barrier()
    eval_loader = loaders.test or loaders.val
    info["test"] = evaluate(model, eval_loader, dist.device, dist)
    if loaders.val is not None:
        info["val"] = evaluate(model, loaders.val, dist.device, dist)
    if dist.is_main:
        how = "reused from " + str(base_path) if info.get("reused") else info.get("source", "trained")
        log.info("float baseline (%s): test top-1 %.2f%%", how, info["test"]["top1"])
    return Prepared(dist, loaders, recipe, model, info, inputs=inputs, lock=lock)


def _load_user_checkpoint(path: str) -> dict:
    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:  # a FIFO or /dev/zero would block or never end
        raise ConfigError(f"model.checkpoint {path!r} {problem}")
    try:
        with p.open("rb") as fh:
            head = fh.read(4100)
    except OSError as exc:
        raise ConfigError(f"model.checkpoint {path!r} cannot be read: {exc}") from exc
    if b'"pwfn-checkpoint"' in head:  # one of our own checkpoints: a float baseline is fine, a run is not
        kind = head.split(b'"kind": "', 1)[-1].split(b'"', 1)[0].decode("utf-8", "replace")
        if kind != "baseline":
            raise ConfigError(f"model.checkpoint {path!r} is a pwfn {kind!r} checkpoint, not a float model: "
                              "give a plain torch state_dict or a run folder's baseline.pt")
        state = load_checkpoint(p, kind="baseline")
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(f"model.checkpoint {path!r} holds no model state")
        return state["model"]
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.checkpoint {path!r} could not be read as a torch state_dict: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"model.checkpoint {path!r} does not hold a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"model.checkpoint {path!r} is not a state_dict of tensors: {bad[:3]} are not tensors")
    return obj


def _run_one(cfg: RunConfig, prep: Prepared, method: str, resume: bool,
             callbacks: Sequence[RoundCallback] = ()) -> FixingResult:
    run_dir = _folder(cfg) / method
    res = FixingRun(method, cfg, prep.model, prep.loaders.train, prep.loaders.val, prep.loaders.test,
                    device=prep.device, run_dir=run_dir, recipe=prep.recipe, callbacks=callbacks,
                    dist=prep.dist, inputs=prep.inputs).run(resume=resume)
    res.report["baseline"] = prep.baseline
    if prep.dist.is_main:
        atomic_write_json(run_dir / "report.json", to_jsonable(res.report))
    return res


def run_method(cfg: RunConfig, method: Optional[str] = None, *, resume: bool = True,
               callbacks: Sequence[RoundCallback] = (), fresh: bool = False) -> dict[str, Any]:
    """`pwfn run`: float baseline, then one method; returns the report.

    ``fresh`` deletes the run folder (once every check passed) and starts over.
    """
    method = method or cfg.method
    get_method(method)  # an unknown name is refused before anything is done
    resume = resume and not fresh
    prep = prepare_run(cfg, (method,), resume=resume, fresh=fresh)
    try:
        return _run_one(cfg, prep, method, resume, callbacks).report
    finally:
        prep.release()


def compare(cfg: RunConfig, *, resume: bool = True, fresh: bool = False) -> dict[str, Any]:
    """`pwfn compare`: one float baseline, then WFN and PWFN from it; returns the comparison."""
    resume = resume and not fresh
    prep = prepare_run(cfg, COMPARED, resume=resume, fresh=fresh)
    try:
        out: dict[str, Any] = {"baseline": prep.baseline, "methods": {}}
        earlier = _earlier_comparison(_folder(cfg)) if resume else {}
        failed: list[str] = []
        for method in COMPARED:
            done_before = _rounds_on_disk(_folder(cfg) / method) if resume else []
            t0 = time.perf_counter()
            try:
                res = _run_one(cfg, prep, method, resume)
            except ContractError as exc:  # the other method still runs; the comparison says so, then fails
                log.error("%s", exc)
                failed.append(f"{method}: {exc}")
                out["methods"][method] = {"failed": str(exc)}
                continue
            out["methods"][method] = {"final": res.report["final"], "contract": res.report.get("contract"),
                                      "seconds": _method_seconds(time.perf_counter() - t0, done_before, len(res.history),
                                                                 (earlier.get("methods") or {}).get(method))}
        out["table"] = comparison_rows(out)
        if prep.dist.is_main:
            atomic_write_json(_folder(cfg) / "compare.json", to_jsonable(out))
            atomic_write_text(_folder(cfg) / "compare.md", format_table(out["table"]) + "\n")
        if failed:
            raise ContractError("the accuracy contract could not be kept by " + " and by ".join(
                f.split(":")[0] for f in failed) + " (compare.md shows the other's results): " + " | ".join(failed))
        return out
    finally:
        prep.release()


def _earlier_comparison(folder: Path) -> dict[str, Any]:
    """The compare.json of an earlier, finished comparison in this folder ({} when none or unreadable)."""
    if not (folder / "compare.json").exists():
        return {}
    try:  # bounded and depth-checked: a hand-edited file is ignored, never a traceback
        data = load_json(folder / "compare.json", "comparison")
    except PwfnError:
        return {}
    return data if isinstance(data, dict) else {}


def _rounds_on_disk(method_dir: Path) -> list[dict[str, Any]]:
    """The round rows an earlier session left in ``metrics.jsonl`` ([] when none)."""
    rows = []
    try:
        text = (method_dir / "metrics.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            row = parse_json(line, "round log")
        except PwfnError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def _method_seconds(session: float, done_before: list[dict[str, Any]], rounds_now: int,
                    earlier: Optional[dict[str, Any]]) -> float:
    """A method's own compute time across sessions, for compare.json.

    A rerun that found the method finished (no round left to do) keeps the time the earlier
    comparison recorded instead of the seconds spent reloading and re-evaluating it; a resumed
    method adds the wall time of the rounds finished in earlier sessions to this session's.
    """
    if done_before and len(done_before) >= rounds_now and earlier and earlier.get("seconds") is not None:
        return float(earlier["seconds"])
    before = sum(float(r.get("wall_seconds") or 0.0) for r in done_before[:rounds_now])
    return before + session


def comparison_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    base = out["baseline"]
    rows = [{"method": "float", "top1": base["test"]["top1"], "top5": base["test"].get("top5"),
             "unique": None, "unique_nonzero": None, "entropy": None, "entropy_nonzero": None, "seconds": base.get("seconds")}]
    for name, m in out["methods"].items():
        if "failed" in m:
            rows.append({"method": name, "contract": "NOT KEPT (failed)"})
            continue
        f = m["final"]
        c = m.get("contract") or {}
        verdict = ("off" if not c.get("enforced") else
                   f"held (drop {c['drop']:.3g})" if c.get("held") else "NOT HELD") if c else None
        rows.append({"method": name, "top1": f["test"]["top1"], "top5": f["test"].get("top5"),
                     "unique": f.get("unique"), "unique_nonzero": f.get("unique_nonzero"),
                     "entropy": f.get("entropy"), "entropy_nonzero": f.get("entropy_nonzero"),
                     "contract": verdict, "seconds": m.get("seconds")})
    return rows
