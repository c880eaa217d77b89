"""A fixing run of a model with one method, resumable from its folder, and the Python API ``compress``.

:class:`FixingRun` drives a :class:`pwfn.Fixer` (the round loop; what differs between methods
lives in the method objects of :mod:`pwfn.methods`) through warm-up, rounds and training in
between, evaluates, and writes into its folder: ``config.yaml``, ``manifest.json``,
``metrics.jsonl`` (one row per round), ``report.json``, ``checkpoint.pt`` (after every completed
round, for resume) and the point-estimate model. Round callbacks receive a :class:`RoundState`.
The config-driven commands (``pwfn run`` / ``pwfn compare``) are in :mod:`pwfn.run.experiment`.

Why one module of this length: it is one idea, a resumable fixing run of one model with one
method. :class:`FixingRun` (its set-up, the round loop, the checkpoints and the final report
share the run's state) and :func:`compress`, its Python face, read best side by side; the
folder helpers around them (point model, manifest, checkpoints) are small and only this run
writes them. What a run folder holds is :mod:`pwfn.run.manifest`, its inputs
:mod:`pwfn.run.fingerprints`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..common.console import progress_bar
from ..common.hints import other_run_folder, setting, start_over
from ..common.io import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    to_jsonable,
    write_jsonl,
)
from ..core.engine import EngineConfig
from ..core.metrics import expected_calibration_error, fixing_metrics, nll, weight_histogram
from ..errors import (
    CheckpointError,
    ConfigError,
    ContractError,
    ModelError,
    PwfnError,
    TrainingDivergedError,
)
from ..export import shared_keys
from ..methods import get_method
from ..methods.base import Method, build_method
from ..model.config import RunConfig, config_diff, config_to_dict, dump_config
from ..model.plumbing import QuantView
from ..model.recipes import build_recipe, recipe_of
from ..model.recipes import describe as describe_recipe
from ..training.checks import check_first_batch, check_float_model, check_materialized
from ..training.contract import ContractSpec
from ..training.distributed import DistContext, init_distributed, resolve_device
from ..training.fixer import Fixer, resolve_config
from ..training.tasks import BatchAdapter, CustomTask, Task, WithMetrics, resolve_task
from ..training.train import (
    EpochCounter,
    evaluate,
    first_nonfinite_weight,
    predict_mc,
    rng_state,
    seed_everything,
    set_rng_state,
    train_epochs,
)
from .fingerprints import data_fingerprint, model_fingerprint, refuse_changed_inputs
from .lock import RunLock, acquire, check_free
from .manifest import (
    load_manifest,
    new_manifest,
    quantised_tensors,
    read_point_model,
    read_report,
    write_manifest,
    write_point_model,
)
from .ownership import METHOD, claim, mark
from .runlog import open_tensorboard, round_line, write_metrics_csv

log = logging.getLogger(__name__)


def divergence_advice(cfg: RunConfig, section: str, tips: Sequence[str] = ()) -> str:
    """Which settings to turn when training under ``section`` ("baseline" or a method's section) diverges;
    ``tips`` adds the method's own (:meth:`Method.divergence_tips`)."""
    s = getattr(cfg, section)
    out = [f"lower the learning rate ({setting(section + '.lr')}, now {s.lr:g})", *tips]
    clip = "off" if s.grad_clip is None else f"{s.grad_clip:g}"
    out.append(f"clip gradients harder ({setting(section + '.grad_clip')}, now {clip})")
    return "To fix it, " + ", ".join(out[:-1]) + " or " + out[-1] + "."


def check_model(method: str, cfg: RunConfig, float_model: nn.Module) -> nn.Module:
    """Everything about ``float_model`` that would stop ``method`` later, checked before anything is written.

    Models without a (non-empty) quantisable tensor are refused; shared and tied tensors are fixed once. Frozen
    parameters (``requires_grad=False``) are quantised like the others but never trained, by
    both methods; a model with no trainable parameter at all is refused unless the method's
    training epochs are 0 (fixing without retraining). Zero-sized tensors hold no weight and
    are skipped. Leaves the RNG state untouched. Returns the model ``method`` would fix.
    """
    check_float_model(float_model)
    impl = build_method(method, cfg)
    state = rng_state()
    try:
        model = impl.prepare(float_model)
        impl.view(model)
    finally:
        set_rng_state(state)
    impl.check_trainable(model)
    return model


def load_run_checkpoint(ckpt: Path, method: str, device: Any = "cpu") -> dict:
    """A method's ``checkpoint.pt``, checked; a damaged or foreign one raises ``CheckpointError`` saying what to do."""
    try:
        state = load_checkpoint(ckpt, kind=f"run-{method}", map_location=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Cannot resume {method} from it: restore the file, or start this method "
                              f"over with {start_over()} (or delete the file)") from exc
    missing = [k for k in ("next_round", "model", "epoch_counter", "history", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{str(ckpt)!r} lacks {missing}: it was not written by this version of pwfn; "
                              f"start this method over with {start_over()}")
    return state


# --------------------------------------------------------------------------------------------
# the fixing run


@dataclass
class FixingResult:
    """What :func:`compress` returns: the fixed model, its plain copy, the report and the rounds.

    ``model`` is the fixed model as trained (Bayesian layers for PWFN, with the fixed masks);
    ``point_model`` holds plain torch layers with every quantised weight on the codebook;
    ``report`` is what ``report.json`` holds; ``history`` the per-round rows of ``metrics.jsonl``.
    """

    method: str
    model: nn.Module  # the fixed model (Bayesian for PWFN, with masks)
    point_model: nn.Module  # plain layers, no masks
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RoundState:
    """What a round callback receives, once a round's training and checkpoint are done.

    ``compress(..., callbacks=[f])`` / ``run_method(..., callbacks=[f])`` call ``f(state)`` after
    every round. A callback may read anything here (and e.g. change the optimizer's learning
    rate, or raise to stop the run; the checkpoint of this round is already on disk).
    """

    method: str
    #: 0-based index of the round just done, and the number of rounds
    round: int
    rounds: int
    fraction: float
    #: the round's row of ``metrics.jsonl`` (fixed fraction, unique values, evaluations, ...)
    row: dict[str, Any]
    model: nn.Module
    fixer: Fixer
    optimizer: Optional[torch.optim.Optimizer]
    #: the method's checkpoint file (None without a run folder)
    checkpoint: Optional[Path]


RoundCallback = Callable[[RoundState], None]


class FixingRun:
    """Round-by-round fixing of one model with one method, resumable from its folder."""

    def __init__(
        self,
        method: Union[str, type],
        cfg: RunConfig,
        float_model: nn.Module,
        train_loader,
        val_loader,
        test_loader=None,
        *,
        device: Optional[torch.device] = None,
        run_dir: Optional[Union[str, Path]] = None,
        recipe: Optional[dict] = None,
        callbacks: Sequence[RoundCallback] = (),
        dist: Optional[DistContext] = None,
        inputs: Optional[dict] = None,
        task: Optional[Union[str, Task]] = None,
        adapter: Optional[BatchAdapter] = None,
        contract: ContractSpec = None,
    ) -> None:
        self.cfg = cfg
        self.contract_spec = contract
        self.method_impl: Method = build_method(method, cfg)
        self.method: str = self.method_impl.name
        self.float_model = float_model
        self.train_loader = train_loader
        self.val_loader = val_loader if val_loader is not None else test_loader
        self.test_loader = test_loader if test_loader is not None else val_loader
        if self.val_loader is None:
            raise ConfigError("an evaluation loader (val or test) is required")
        self.dist = dist or DistContext(device=device or resolve_device(cfg.device))
        self.device = device or self.dist.device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"run_dir {str(self.run_dir)!r} is a file, not a folder: choose another run_dir")
        self.recipe = recipe
        self.callbacks = list(callbacks)
        if not all(callable(f) for f in self.callbacks):
            raise ConfigError("callbacks must be callables taking a pwfn.run.pipeline.RoundState")
        self.task = resolve_task(task if task is not None else cfg.task)
        self.adapter = adapter or BatchAdapter()
        self.fixer: Optional[Fixer] = None
        # fingerprints of the inputs (data, model.checkpoint) a config run computed; a Python-API
        # run fingerprints its loaders itself. The float model's are added when the run starts.
        self._given_inputs = inputs
        self.inputs: dict[str, Any] = {}
        self._lock: Optional[RunLock] = None
        self._manifest: Optional[dict] = None
        self._previous_manifest: Optional[dict] = None
        self.method_impl.bind_data(_dataset_size(train_loader))  # e.g. the ELBO needs the training-set size
        self._rounds_done = 0

    # -- helpers ----------------------------------------------------------------------------
    def _eval(self, model: nn.Module, loader) -> dict[str, float]:
        with self.method_impl.eval_context(model):
            return evaluate(model, loader, self.device, self.dist, self.task, self.adapter)

    def _checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    def _save(self, model, optimizer, counter, history, next_round, pre_metrics) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        # every rank checks (weights are identical across ranks) so all raise together, none hangs
        bad = first_nonfinite_weight(model)
        if bad is not None:  # never replace a good checkpoint with a broken model
            raise TrainingDivergedError(f"{self.method}: refusing to checkpoint a non-finite model: {bad}. "
                                        f"{self._advice()} {self._kept_note()}")
        if not self.dist.is_main:  # rank 0 writes; the others wait so nobody runs ahead of a checkpoint
            self.dist.barrier()
            return
        save_checkpoint(
            path,
            {
                "method": self.method,
                "next_round": next_round,
                "model": model.state_dict(),
                "masks": self._view.mask_state(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "epoch_counter": counter.value,
                "history": history,
                "pre_metrics": pre_metrics,
                "rng": rng_state(),
                "fractions": self.fixer.fractions,
                "fixer": {k: v for k, v in self.fixer.state_dict().items()
                          if k not in ("model", "masks", "history", "config")},
                "config": config_to_dict(self.cfg),
                "inputs": self.inputs,
            },
            kind=f"run-{self.method}",
        )
        write_jsonl(self.run_dir / "metrics.jsonl", history)
        write_metrics_csv(self.run_dir / "metrics.csv", history)
        self._rounds_done = next_round
        self.dist.barrier()

    def _advice(self) -> str:
        return divergence_advice(self.cfg, self.method_impl.section_name, self.method_impl.divergence_tips())

    def _kept_note(self) -> str:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return "No checkpoint of this method was written yet."
        rounds = len(self.fixer.fractions) if self.fixer is not None else len(self.method_impl.fractions)
        return (f"The last good checkpoint {str(path)!r} ({self._rounds_done} of {rounds} "
                f"rounds done) is kept unchanged; a changed setting starts the method over ({start_over()}, or "
                f"{other_run_folder()}).")

    def _train(self, train_model, model, optimizer, epochs, counter, desc):
        s, fixer = self.method_impl, self.fixer
        assert fixer is not None
        fixer.set_training_steps(_phase_steps(self.train_loader, epochs))  # PWFN's budget-aware regulariser
        clip_params = fixer.clip_parameters()
        try:
            # fixed entries stay exact through the Fixer's gradient and optimizer-step hooks
            return train_epochs(train_model, self.train_loader, optimizer, epochs, self.device, counter=counter,
                                extra_loss=lambda _model, ce: fixer.loss_term(ce), grad_clip=s.grad_clip(),
                                clip_parameters=clip_params, desc=desc,
                                progress=self.cfg.progress and self.dist.is_main, dist=self.dist, inner=model,
                                bf16=self.cfg.precision == "bf16", advice=self._advice(),
                                task=self.task, adapter=self.adapter, batchnorm=self.cfg.batchnorm)
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(f"{exc} {self._kept_note()}") from exc

    def _posterior(self) -> Optional[dict]:
        """The method's posterior refresh before a round (PWFN's ``posterior: laplace``; None otherwise)."""
        return self.method_impl.refresh_posterior(self.fixer.model, self._view, self.train_loader, self.device,
                                               self.task, self.adapter)

    def _load_resume_state(self, ckpt: Path) -> dict:
        return load_run_checkpoint(ckpt, self.method, self.device)

    # -- main -------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> FixingResult:
        """Fix the model round by round (resuming from ``run_dir`` when it holds a checkpoint).

        With a ``run_dir`` the folder's lock is held from the first write to the end; a second
        writer fails at once. A resume whose inputs (data, float model, model.checkpoint) differ
        from the checkpoint's raises ``InputsChangedError`` naming them, before anything is written.
        """
        try:
            return self._run(resume)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _check_inputs(self) -> None:
        """Loaders yield batches the model accepts; fingerprint the data and the float model."""
        s = self.method_impl
        trains = s.pre_epochs() > 0 or s.round_epochs() > 0
        first = {"train": check_first_batch(self.float_model, self.train_loader, self.device, "training loader",
                                            required=trains, task=self.task, adapter=self.adapter),
                 "val": check_first_batch(self.float_model, self.val_loader, self.device, "evaluation loader",
                                          required=True, task=self.task, adapter=self.adapter)}
        if self._given_inputs is not None:
            inputs = dict(self._given_inputs)
        else:
            inputs = {"data": data_fingerprint(self.train_loader, self.val_loader,
                                               self.test_loader if self.test_loader is not self.val_loader else None,
                                               first_batches=first)}
        inputs["model"] = model_fingerprint(self.float_model)
        example = _example_record(first["val"], self.adapter)
        if example is not None:  # what an export feeds the model to check a device target
            inputs["example"] = example
        self.inputs = inputs

    def _run(self, resume: bool) -> FixingResult:
        s = self.method_impl
        started = time.perf_counter()
        check_float_model(self.float_model)
        if self.run_dir is not None and self.dist.is_main:
            claim(self.run_dir, METHOD, what="run_dir", advice="choose another run_dir")  # never into a foreign folder
            check_free(self.run_dir)  # another writer: fail now, before any work
        self._check_inputs()
        self._previous_manifest = manifest_or_none(self.run_dir) if self.run_dir is not None else None
        # the Fixer prepares the model (and budget mode's allowed values) and keeps fixed values exact
        fixer = Fixer(self.float_model, type(self.method_impl), self.cfg, device=self.device,
                      dataset_size=_dataset_size(self.train_loader), contract=self.contract_spec, task=self.task,
                      adapter=self.adapter)
        self.fixer, self.method_impl = fixer, fixer.method_impl
        fixer.dist = self.dist  # under torchrun the guard's evaluations reduce over every rank's shard
        s = self.method_impl
        model, view = fixer.model, fixer.view
        self._view = view
        if self.dist.is_main:
            s.coverage.log(self.method)
        train_model = wrap_ddp(model, self.dist)
        engine_cfg = fixer.engine_config
        self._budget = fixer.budget
        counter = EpochCounter()
        history: list[dict[str, Any]] = []
        optimizer: Optional[torch.optim.Optimizer] = None
        start_round = 0
        pre_metrics: dict[str, Any] = {}
        ckpt = self._checkpoint_path()

        if resume and ckpt is not None and ckpt.exists():
            state = self._load_resume_state(ckpt)
            refuse_changed_config(state.get("config"), self.cfg, ckpt, run_sections(s))
            saved_inputs = state.get("inputs") or (self._previous_manifest or {}).get("inputs")
            refuse_changed_inputs(saved_inputs, self.inputs, ckpt)
            if not isinstance(state.get("masks"), dict):
                raise CheckpointError(f"{str(ckpt)!r} holds no fixed masks: it was written by an older pwfn; "
                                      f"start this method over with {start_over()}")
            extras = state.get("fixer")
            if not isinstance(extras, dict):
                raise CheckpointError(f"{str(ckpt)!r} holds no fixing state of the accuracy contract: it was written by "
                                      f"an older pwfn; start this method over with {start_over()}")
            fixer.load_state_dict({**extras, "round": state["next_round"], "model": state["model"],
                                   "masks": state["masks"], "history": state["history"],
                                   "config": state.get("config") or config_to_dict(self.cfg)}, str(ckpt))
            if fixer.contract is not None:
                fixer.set_evaluation(self.val_loader, reference=fixer.reference, top_up=self.train_loader)
            optimizer = s.optimizer(model, view, None)
            if state.get("optimizer") is not None and s.keeps_optimizer:
                optimizer.load_state_dict(state["optimizer"])
            counter.value = int(state["epoch_counter"])
            history = fixer.history
            pre_metrics = dict(state.get("pre_metrics") or {})
            start_round = int(state["next_round"])
            set_rng_state(state["rng"])
            self._rounds_done = start_round
            self._write_config(view, engine_cfg)
            if self.dist.is_main:  # the round log may lag the checkpoint when a run was killed between the two
                write_jsonl(ckpt.parent / "metrics.jsonl", history)
                write_metrics_csv(ckpt.parent / "metrics.csv", history)
            log.info("%s: resuming at round %d of %d from %s", self.method, start_round, len(fixer.fractions), ckpt)
        else:
            if fixer.contract is not None:  # the float model on the guard data, before anything is written
                fixer.set_evaluation(self.val_loader, top_up=self.train_loader)
            self._write_config(view, engine_cfg)
            optimizer = s.optimizer(model, view, None)
            # the float weights' distribution, before anything moves them: the weights picture draws it
            pre_metrics = {"initial": self._eval(model, self.val_loader), "float_weights": weight_histogram(view.values())}
            if self.test_loader is not self.val_loader:  # the contract's figure on the test split, for the report
                pre_metrics["initial_test"] = self._eval(model, self.test_loader)
            posterior = self._posterior()
            if posterior is not None:
                pre_metrics["laplace"] = posterior
            if s.pre_epochs() > 0:
                stats = self._train(train_model, model, optimizer, s.pre_epochs(), counter, f"{self.method} warm-up")
                pre_metrics["after_warmup"] = {**self._eval(model, self.val_loader), "train": stats}
            history = fixer.history
            self._save(model, optimizer, counter, history, 0, pre_metrics)

        tb = open_tensorboard(self.cfg.tensorboard, self.run_dir, self.dist.is_main)
        bar = progress_bar(len(fixer.fractions), f"{self.method} rounds",
                           enabled=self.cfg.progress and self.dist.is_main, unit="round",
                           initial=start_round)  # only on a terminal; training bars nest below it
        while not fixer.done:  # the contract may add rounds (a round it splits) and redo rounds
            t0 = time.perf_counter()
            t = fixer.round
            posterior = self._posterior() if t > 0 or start_round > 0 else None  # round 0: done before warm-up
            # one engine round on every rank; rank 0's result is broadcast so all ranks agree bit for bit
            try:
                rnd = fixer.fix_next(broadcast=self.dist.broadcast_ if self.dist.enabled else None)
            except ContractError as exc:
                raise ContractError(f"{exc}. {self._kept_note()}") from exc
            row = rnd.row
            frac, n_rounds = row["fraction"], len(fixer.fractions)
            fix_seconds = time.perf_counter() - t0
            log.debug("%s round %d: values+masks checksum %s (rank %d)", self.method, t + 1, row["checksum"],
                      self.dist.rank)
            if posterior is not None:
                row["laplace"] = posterior
            row["after_fix"] = self._eval(model, self.val_loader)
            if frac < 1.0 and s.round_epochs() > 0:
                optimizer = s.optimizer(model, view, optimizer)
                stats = self._train(train_model, model, optimizer, s.round_epochs(), counter,
                                    f"{self.method} round {t + 1}/{n_rounds}" + (" (redone)" if rnd.retry else ""))
                row["after_train"] = {**self._eval(model, self.val_loader), "train": stats}
            try:
                if not fixer.settle():  # the training did not bring the model back within the contract:
                    continue  # the round was undone (weights, optimizer, RNG); the next pass redoes it
            except ContractError as exc:
                raise ContractError(f"{exc}. {self._kept_note()}") from exc
            sig = s.sigma_summary(model)
            if sig is not None:
                row["sigma"] = sig
            row["fix_seconds"] = fix_seconds
            row["wall_seconds"] = time.perf_counter() - t0
            if self.dist.is_main:
                log.info("%s", round_line(self.method, row, n_rounds, self.task.primary))
            bar.total = n_rounds
            bar.set_postfix_str(f"{100 * row['fixed_fraction']:.0f}% fixed, {row.get('unique')} values", refresh=False)
            bar.update(1)
            if tb is not None:
                tb.log_round(row)
            self._save(model, optimizer, counter, history, t + 1, pre_metrics)
            state = RoundState(method=self.method, round=t, rounds=n_rounds, fraction=frac, row=row,
                               model=model, fixer=fixer, optimizer=optimizer, checkpoint=ckpt)
            for callback in self.callbacks:
                callback(state)

        bar.close()
        if tb is not None:
            tb.close()
        return self._finish(model, view, engine_cfg, history, pre_metrics, time.perf_counter() - started)

    def _contract_report(self, final: dict, pre_metrics: dict) -> dict[str, Any]:
        """The report's ``contract`` section: the verdict on the guard data, and the same drop on the test split
        (which the guard never sees; reported, not judged) when the run has one."""
        fixer = self.fixer
        assert fixer is not None
        c = fixer.contract
        extra: dict[str, Any] = {}
        ref_test = (pre_metrics.get("initial_test") or {}).get(c.metric) if c is not None else None
        value_test = final["test"].get(c.metric) if c is not None else None
        if c is not None and isinstance(ref_test, (int, float)) and isinstance(value_test, (int, float)):
            extra["test"] = {"reference": ref_test, "value": value_test, "drop": c.drop(ref_test, value_test),
                             "within": c.holds(ref_test, value_test)}
        record = fixer.contract_report(**extra)
        if self.dist.is_main and c is not None:
            test = extra.get("test")
            log.info("%s: accuracy contract %s: %s, %s %.6g against the float model's %.6g on the guard data (drop "
                     "%.4g%s)%s", self.method, "held" if record.get("held") else "NOT held", c.text(), c.metric,
                     record["value"], record["reference"], record["drop"], "" if c.drop_type == "absolute" else
                     " relative", "" if test is None else f"; on the test split {test['value']:.6g} against "
                     f"{test['reference']:.6g} (drop {test['drop']:.4g}, not judged by the guard)")
        return record

    def _write_config(self, view: QuantView, engine_cfg: EngineConfig) -> None:
        """The run folder's lock, config.yaml and manifest, once every check passed (a refused run
        changes nothing)."""
        if self.run_dir is not None and self.dist.is_main:
            if self._lock is None:
                self._lock = acquire(self.run_dir)
            mark(self.run_dir, METHOD)
            remove_stale_temp_files(self.run_dir)
            recipe_note = None
            if self.recipe is None:  # a model passed in from Python: record how it is rebuilt, if it can be
                self.recipe, recipe_note = recorded_recipe(self.float_model)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            self._manifest = new_manifest(
                method=self.method, engine=_engine_record(engine_cfg), recipe=self.recipe, inputs=self.inputs,
                quantised=quantised_tensors(view, self.method_impl.coverage), config=config_to_dict(self.cfg))
            if recipe_note:  # why no recipe could be recorded, for the export that needs one
                self._manifest["recipe_note"] = recipe_note
            write_manifest(self.run_dir, self._manifest)

    def _finish(self, model, view, engine_cfg, history, pre_metrics, seconds) -> FixingResult:
        s = self.method_impl
        if not bool(view.fixed().all()):
            raise ModelError(f"{self.method}: the final round left {int((~view.fixed()).sum())} weights unfixed")
        final: dict[str, Any] = {"test": self._eval(model, self.test_loader), "val": self._eval(model, self.val_loader)}
        final.update(fixing_metrics(view.values(), view.fixed(), engine_cfg.b, engine_cfg.signed_terms))
        if s.bayesian and self.task.calibrated:  # MC calibration only where it means something
            samples = getattr(s.settings, "mc_samples", self.cfg.pwfn.mc_samples)
            probs, labels = predict_mc(model, self.test_loader, self.device, samples,
                                       seed=self.cfg.seed, dist=self.dist, adapter=self.adapter)
            final["mc"] = {
                "samples": samples,
                "nll": nll(probs, labels),
                "ece": expected_calibration_error(probs, labels),
                "top1": 100.0 * float((probs.argmax(1) == labels).float().mean()),
            }
        sigma = s.sigma_summary(model)
        if sigma is not None:
            final["sigma"] = sigma
        contract = self._contract_report(final, pre_metrics)
        point = self.fixer.finalize()
        point_eval = evaluate(point, self.test_loader, self.device, self.dist, self.task, self.adapter)
        final["point_model_test"] = point_eval
        report = {
            "method": self.method,
            "fractions": self.fixer.fractions,
            "pre": pre_metrics,
            "rounds": history,
            "final": final,
            "task": self.task.describe(),
            "contract": contract,
            "quantised_tensors": view.names(),
            "coverage": s.coverage_report(),
            "seconds_this_session": seconds,
        }
        if getattr(self, "_budget", None) is not None:
            report["budget"] = self._budget.report(view)
        if self.run_dir is not None and self.dist.is_main:
            # point model, then the manifest that vouches for it, then the report
            record = save_point_model(point, self.run_dir, self.recipe, method=self.method, b=engine_cfg.b,
                                      signed_terms=engine_cfg.signed_terms, quantised_tensors=view.names(),
                                      codebook=final.get("codebook", []))
            manifest = dict(self._manifest or {})
            manifest.update(status="finished", codebook=final.get("codebook", []), point_model=record)
            write_manifest(self.run_dir, manifest)
            _carry_export_sections(report, self.run_dir, self._previous_manifest, record)
            atomic_write_json(self.run_dir / "report.json", to_jsonable(report))
        self.dist.barrier()
        return FixingResult(self.method, model, point, report, history)


#: config sections whose values shape each stage's results (a resume under other values is refused);
#: ``precision`` (bf16 autocast) trains the baseline and both methods differently
BASELINE_SECTIONS = ("seed", "precision", "data", "model", "baseline", "quantise", "task")


def run_sections(method: Union[str, Method]) -> tuple[str, ...]:
    """The config sections a method's checkpoint must agree with to be resumed."""
    impl = method if isinstance(method, Method) else get_method(method)
    return BASELINE_SECTIONS + impl.config_sections()


def refuse_changed_config(saved: Optional[dict], cfg: RunConfig, path: Path, sections: tuple[str, ...]) -> None:
    if saved is None:
        return
    diff = config_diff(saved, config_to_dict(cfg), sections)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} in all)" if len(diff) > 6 else "")
        raise ConfigError(
            f"{path} was written under a different config ({shown}). Resuming would mix two runs: "
            f"use {start_over()} to start over, or {other_run_folder()} to keep both"
        )


def wrap_ddp(model: nn.Module, dist: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun, else ``model`` itself."""
    if not dist.enabled:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _phase_steps(loader, epochs: float) -> Optional[int]:
    """SGD steps ``train_epochs`` takes for ``epochs`` over ``loader`` (None for an unsized loader)."""
    try:
        per_epoch = len(loader)
    except TypeError:
        return None
    return max(1, math.ceil(epochs * per_epoch)) if per_epoch and epochs > 0 else None


def _dataset_size(loader) -> Optional[int]:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def _example_record(batch: Any, adapter: BatchAdapter) -> Optional[dict]:
    """Shape (without the batch) and dtype of a batch's inputs when they are one tensor, else None;
    token ids also record their largest value (an export's example stays within the vocabulary)."""
    if batch is None:
        return None
    try:
        inputs, _ = adapter.split(batch)
    except Exception:  # noqa: BLE001 - a layout the adapter reads only in the loop: nothing recorded
        return None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        return None
    out: dict[str, Any] = {"shape": [int(s) for s in inputs.shape[1:]], "dtype": str(inputs.dtype).replace("torch.", "")}
    if not inputs.is_floating_point() and not inputs.is_complex() and inputs.numel():
        out["max"] = int(inputs.max())
    return out


def save_point_model(model: nn.Module, folder: Path, recipe: Optional[dict], **description: Any) -> dict:
    """The point-estimate model as safetensors plus its checksummed description (recipe, tensor
    order, SHA-256; ``description`` adds method, b, codebook ...); returns the manifest's record."""
    full = model.state_dict()
    shared = shared_keys(full)  # a tied tensor is stored once; the description records its other names
    state = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in shared}
    buffers = sorted(k for k, _ in model.named_buffers() if k in state)  # may hold inf (masks); weights may not
    return write_point_model(folder, state, recipe, shared=shared, buffers=buffers, **description)


def _engine_record(engine_cfg: EngineConfig) -> dict[str, Any]:
    return {"b": int(engine_cfg.b), "max_order": int(engine_cfg.max_order), "signed_terms": bool(engine_cfg.signed_terms)}


def manifest_or_none(folder: Path) -> Optional[dict]:
    """The folder's manifest, or None when it has none or it is unreadable (it is rewritten by this run)."""
    try:
        return load_manifest(folder)
    except PwfnError as exc:
        log.warning("%s; this run rewrites it", exc)
        return None


def _carry_export_sections(report: dict, folder: Path, previous: Optional[dict], record: dict) -> None:
    """A finished run rerun to the same point model keeps the size/export sections its export added."""
    old_pm = (previous or {}).get("point_model") or {}
    if old_pm.get("sha256") != record["sha256"] or not (folder / "report.json").exists():
        return
    try:
        old = read_report(folder / "report.json")
    except PwfnError:
        return
    for key in ("size", "export"):
        if key in old:
            report[key] = old[key]


def load_point_model(folder: Union[str, Path]) -> nn.Module:
    """Rebuild a plain torch model from ``point_model.safetensors`` and its recipe.

    The file is checked against its description's SHA-256 and, when the folder has a manifest,
    against the manifest (checksum, recipe, finite values, codebook): a damaged point model
    raises ``DamagedPointModelError``.
    """
    folder = Path(folder)
    desc, state = read_point_model(folder, load_manifest(folder))
    recipe = desc.get("recipe")
    if not recipe:
        raise ModelError(f"{folder} holds no model recipe (the model was passed in from Python); "
                         "load the safetensors into your own model instead")
    return build_recipe(recipe, state, str(folder / "point_model.safetensors"))


def recorded_recipe(model: nn.Module) -> tuple[Optional[dict], Optional[str]]:
    """The recipe a run of ``model`` records (:func:`pwfn.model.recipes.recipe_of`), saying in the log where
    it came from; or None and why there is none and what would work (exports then need ``model=``)."""
    recipe, source = recipe_of(model)
    if recipe is not None:
        log.info("model recipe: %s (from %s); its exports rebuild the model from it", describe_recipe(recipe), source)
        return recipe, None
    log.info("no model recipe recorded: %s", source)
    return None, source


# --------------------------------------------------------------------------------------------
# Python API


def compress(
    model: nn.Module,
    train_loader,
    val_loader,
    method: Union[str, type] = "pwfn",
    config: Optional[Union[RunConfig, dict, str, Path]] = None,
    *,
    test_loader=None,
    run_dir: Optional[Union[str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
    resume: bool = True,
    overrides: Optional[list[str]] = None,
    task: Optional[Union[str, Task]] = None,
    loss: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
    metrics: Optional[Callable[[torch.Tensor, Any], dict]] = None,
    adapter: Optional[BatchAdapter] = None,
    callbacks: Sequence[RoundCallback] = (),
    contract: ContractSpec = None,
) -> FixingResult:
    """Fix every weight of a trained ``model`` onto one power-of-two codebook, within the accuracy you allow.

    ``method`` is a registered method (:mod:`pwfn.methods`): "pwfn" (Bayesian), "wfn" (deterministic),
    "wfn_published", one you registered, or a :class:`~pwfn.methods.base.Method` subclass. ``config`` is a RunConfig, a dict,
    a YAML path or a shipped config's name (defaults otherwise); its ``seed`` and ``threads`` are applied as by the CLI.
    ``task`` (a name such as ``"regression"``, ``"bce"``, ``"language_model"``, or a
    :class:`pwfn.Task`; default the config's ``task``, i.e. classification) gives the training
    loss and the metrics; or pass your own ``loss(outputs, targets)`` (and optionally
    ``metrics(outputs, targets) -> dict``). ``metrics`` also works beside a task: its metrics are
    reported with the task's own, and the contract may name one of them.

    ``contract``: how far the fixed model may fall behind the float model (:mod:`pwfn.training.contract`): an
    :class:`~pwfn.training.contract.AccuracyContract`, a dict such as ``{"max_drop": 1.0}`` or ``{"metric": "f1",
    "higher_is_better": True, "max_drop": 0.01, "drop_type": "absolute"}``, ``None`` for the config's
    ``contract`` section (default: the task's primary metric, 0.5 points of an accuracy, 1-2 % of a loss),
    ``False`` for none. Every round is judged on the validation data (topped up with training examples
    when it holds fewer than the contract needs); a round that would break the contract is redone more
    cautiously, and a run that cannot keep it raises :class:`~pwfn.errors.ContractError`, keeping the last
    checkpoint within the contract. The report's ``contract`` section says what was promised, the drop on
    the guard data and on the test split, and whether it held.

    ``adapter`` (:class:`pwfn.BatchAdapter`) reads dict / tuple / nested batches (Hugging Face dicts with
    ``labels`` work without one). The first batch goes through the model and the loss before anything is
    written. Returns the fixed model, its plain point-estimate copy and the report. With ``run_dir`` the
    run is checkpointed after every round and resumable. The rounds run on a :class:`pwfn.Fixer`.
    ``callbacks``: callables receiving a :class:`RoundState` after every round (its checkpoint written),
    e.g. to log, change the learning rate or stop.
    """
    cfg = resolve_config(config, overrides)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialized(model, lazy_ok=True)  # a meta model cannot move to the device; lazy ones meet the first batch
    if loss is not None:
        if task is not None:
            raise ConfigError("pass either task= or loss= (a loss makes a custom task), not both")
        task_obj: Task = CustomTask(loss, metrics)
    else:
        task_obj = resolve_task(task if task is not None else cfg.task)
        if metrics is not None:
            task_obj = WithMetrics(task_obj, metrics)
    seed_everything(cfg.seed)  # as the CLI does: the same run from the same seed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(str(device) if device is not None else cfg.device)
    dev = dist.device
    # the run writes its config.yaml into run_dir itself, once the model and any checkpoint passed their checks
    return FixingRun(method, cfg, model.to(dev), train_loader, val_loader, test_loader, device=dev,
                     run_dir=run_dir, dist=dist, task=task_obj, adapter=adapter, callbacks=callbacks,
                     contract=contract).run(resume=resume)
