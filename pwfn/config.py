"""Configs are data: typed dataclasses loaded from YAML, validated, saved next to every run.

``load_config(path, overrides=["pwfn.k=2", ...])`` reads a YAML file, applies ``--set``
overrides, checks every key and type (unknown keys get a "did you mean" suggestion) and
every range, and returns a :class:`RunConfig`. ``dump_config`` writes the resolved config so a
run can be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from . import schedules
from .errors import ConfigError

# the papers' schedules, as lists (config values are plain YAML data)
PWFN_FRACTIONS = list(schedules.PWFN_FRACTIONS)
WFN_FRACTIONS = list(schedules.WFN_FRACTIONS)


@dataclass
class DataConfig:
    """Which dataset, where, and how it is split and batched."""

    name: str = "digits"
    root: Optional[str] = None
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    augment: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    image_size: Optional[int] = None
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    options: dict = field(default_factory=dict)  # passed to the dataset loader (e.g. synthetic shapes)


@dataclass
class ModelConfig:
    """Construction recipe: a registered model name, its keyword arguments, optional checkpoint."""

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None


@dataclass
class BaselineConfig:
    """Float training of the starting network (skipped when a checkpoint is given)."""

    epochs: float = 30.0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = None
    cosine: bool = True


@dataclass
class EngineSettings:
    """Centre set and greedy-round settings shared by both methods."""

    b: int = 7
    max_order: int = 4
    inc: float = 2.0
    zero_fix: bool = True


@dataclass
class PWFNConfig:
    """Probabilistic weight fixing (ALGORITHM.md §1-3)."""

    fractions: list = field(default_factory=lambda: list(PWFN_FRACTIONS))
    k: float = 1.0
    sigma_init: str = "power_of_two"
    sigma_init_scale: float = 0.0025
    sigma_init_max: float = 0.05
    sigma_floor: float = 2.0**-30
    sigma_update: str = "std_mu"
    sigma_divisor: float = 2.0
    objective: str = "regulariser"  # or "elbo"
    tau: float = 0.05
    lam: float = 2.0**-11
    prior_sigma: float = 0.1
    forward_mode: str = "sample"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = 1.0
    first_round_epochs: float = 0.05
    round_epochs: float = 3.0
    mc_samples: int = 10
    engine: EngineSettings = field(default_factory=EngineSettings)


@dataclass
class WFNConfig:
    """Deterministic weight fixing (ALGORITHM.md §2-3)."""

    fractions: list = field(default_factory=lambda: list(WFN_FRACTIONS))
    delta: float = 0.01
    lr: float = 2e-5
    grad_clip: Optional[float] = 0.5
    reg_temperature: float = 0.05
    reg_ratio: float = 0.4
    quantise_batchnorm: bool = True
    round_epochs: float = 3.0
    engine: EngineSettings = field(default_factory=lambda: EngineSettings())


@dataclass
class RunConfig:
    """One run: data, model, float baseline, and the two methods' settings."""

    name: str = "run"
    method: str = "pwfn"  # for `pwfn run`: "pwfn" or "wfn"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # or "bf16": bfloat16 autocast for training forward passes
    threads: Optional[int] = None
    out_dir: str = "runs"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    pwfn: PWFNConfig = field(default_factory=PWFNConfig)
    wfn: WFNConfig = field(default_factory=WFNConfig)


# --------------------------------------------------------------------------------------------
# building dataclasses from plain data, with type checks and suggestions


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        out: Optional[float] = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                out = float(value)
            except (ValueError, OverflowError):
                out = None
        if out is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `name: 2024` as a number; the user meant the text
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint} Valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: Optional[dict]) -> RunConfig:
    """Build and validate a RunConfig from plain data (a parsed YAML document)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``1e-3``, ``[0.5, 1.0]``, ``null``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        _set_path(data, key, value)
    return data


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            is_file = p.is_file()
        except (OSError, ValueError):  # e.g. a NUL byte in the path
            is_file = False
        if not is_file:
            what = "is a folder, not a YAML file" if _is_dir(p) else "does not exist"
            raise ConfigError(f"config file {str(p)!r} {what}")
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False


#: keys that do not change a run's results, so a run may resume under a different value
RESUME_NEUTRAL_KEYS = {"progress", "device", "threads", "out_dir", "data.num_workers", "data.pin_memory",
                       "data.eval_batch_size"}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_diff(a: dict, b: dict, sections: Optional[tuple[str, ...]] = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring resume-neutral keys).

    With ``sections``, only keys under those top-level sections (or equal to them) count.
    """
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    out = []
    for k in keys:
        if k in RESUME_NEUTRAL_KEYS:
            continue
        if sections is not None and k.split(".")[0] not in sections:
            continue
        if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
            out.append(f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}")
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
# range checks


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_fractions(fractions: list, where: str) -> list[float]:
    _check(len(fractions) > 0, f"{where}: the schedule is empty")
    out = []
    for i, f in enumerate(fractions):
        ok = isinstance(f, (int, float)) and not isinstance(f, bool)
        try:
            ok = ok and math.isfinite(f)
        except OverflowError:  # an int too large for a float
            ok = False
        _check(ok, f"{where}[{i}]: {f!r} is not a number in (0, 1]")
        out.append(float(f))
    for i, f in enumerate(out):
        _check(0.0 < f <= 1.0, f"{where}[{i}] = {f} is outside (0, 1]: fractions of weights fixed must lie in (0, 1]")
        if i:
            _check(f > out[i - 1], f"{where}: the schedule must be strictly increasing, but {out[i - 1]} is followed by {f}")
    _check(out[-1] == 1.0, f"{where}: the last fraction must be 1.0 so that every weight ends fixed (got {out[-1]})")
    return out


def _validate_engine(e: EngineSettings, where: str) -> None:
    _check(0 <= e.b <= 24, f"{where}.b = {e.b}: the smallest power of two is 2^-b, b must be in [0, 24]")
    _check(1 <= e.max_order <= 8, f"{where}.max_order = {e.max_order} must be in [1, 8]")
    _check(e.inc > 1.0, f"{where}.inc = {e.inc} must be > 1 (the tolerance grows on escalation)")


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express; raise ConfigError naming the key."""
    _check(cfg.method in ("pwfn", "wfn"), f"method = {cfg.method!r}: choose 'pwfn' or 'wfn'")
    # the name is a folder under out_dir (and `--fresh` deletes it): one plain path component
    _check(bool(cfg.name) and cfg.name not in (".", "..") and not any(c in cfg.name for c in "/\\\0"),
           f"name = {cfg.name!r}: the run name becomes a folder under out_dir; use a plain name "
           "without '/', '\\' or '..'")
    _check(0 <= cfg.seed < 2**63, f"seed = {cfg.seed} must be an integer in [0, 2^63)")
    _check(cfg.threads is None or cfg.threads <= 4096, f"threads = {cfg.threads} must be <= 4096")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps")),
           f"device = {cfg.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    _check(cfg.precision in ("fp32", "bf16"), f"precision = {cfg.precision!r}: choose fp32 or bf16")
    _check(cfg.threads is None or cfg.threads >= 1, f"threads = {cfg.threads} must be >= 1")
    d = cfg.data
    _check(d.batch_size >= 1 and d.eval_batch_size >= 1, "data.batch_size and data.eval_batch_size must be >= 1")
    _check(0.0 <= d.val_fraction < 1.0 and 0.0 <= d.test_fraction < 1.0 and d.val_fraction + d.test_fraction < 1.0,
           f"data.val_fraction ({d.val_fraction}) and data.test_fraction ({d.test_fraction}) must be in [0, 1) and sum below 1")
    _check(d.num_workers >= 0, "data.num_workers must be >= 0")
    _check(0 <= d.seed < 2**63, f"data.seed = {d.seed} must be an integer in [0, 2^63)")
    for key in ("image_size", "train_subset", "eval_subset"):
        value = getattr(d, key)
        _check(value is None or value >= 1, f"data.{key} = {value} must be >= 1 (or null)")
    b = cfg.baseline
    _check(b.epochs >= 0, f"baseline.epochs = {b.epochs} must be >= 0")
    _check(b.optimizer in ("sgd", "adam", "adamw"), f"baseline.optimizer = {b.optimizer!r}: choose sgd, adam or adamw")
    _check(b.lr > 0, f"baseline.lr = {b.lr} must be > 0")
    _check(0 <= b.momentum < 1, f"baseline.momentum = {b.momentum} must be in [0, 1)")
    _check(b.weight_decay >= 0, f"baseline.weight_decay = {b.weight_decay} must be >= 0")
    # clip_grad_norm_ with a negative norm flips every gradient (ascent), so only > 0 or null
    _check(b.grad_clip is None or b.grad_clip > 0, f"baseline.grad_clip = {b.grad_clip} must be > 0 or null")
    p = cfg.pwfn
    p.fractions = validate_fractions(p.fractions, "pwfn.fractions")
    _check(p.k > 0, f"pwfn.k = {p.k} must be > 0 (tolerance = k * sigma)")
    _check(p.sigma_init in ("power_of_two", "constant", "moped"),
           f"pwfn.sigma_init = {p.sigma_init!r}: choose power_of_two, constant or moped")
    _check(p.sigma_floor > 0, f"pwfn.sigma_floor = {p.sigma_floor} must be > 0 (it keeps sigma positive)")
    _check(p.sigma_init_scale > 0 and p.sigma_init_max > 0, "pwfn.sigma_init_scale and pwfn.sigma_init_max must be > 0")
    _check(p.sigma_update in ("std_mu", "keep", "divide"), f"pwfn.sigma_update = {p.sigma_update!r}: choose std_mu, keep or divide")
    _check(p.sigma_divisor > 0, "pwfn.sigma_divisor must be > 0")
    _check(p.objective in ("regulariser", "elbo"), f"pwfn.objective = {p.objective!r}: choose regulariser or elbo")
    _check(p.tau >= 0 and p.lam >= 0, "pwfn.tau and pwfn.lam must be >= 0")
    _check(p.prior_sigma > 0, "pwfn.prior_sigma must be > 0")
    _check(p.forward_mode in ("sample", "local"), f"pwfn.forward_mode = {p.forward_mode!r}: choose sample or local")
    _check(p.lr > 0 and p.weight_decay >= 0 and 0 <= p.momentum < 1, "pwfn.lr > 0, weight_decay >= 0, 0 <= momentum < 1")
    _check(p.grad_clip is None or p.grad_clip > 0, "pwfn.grad_clip must be > 0 or null")
    _check(p.first_round_epochs >= 0 and p.round_epochs >= 0, "pwfn epochs must be >= 0")
    _check(p.mc_samples >= 1, "pwfn.mc_samples must be >= 1")
    _validate_engine(p.engine, "pwfn.engine")
    w = cfg.wfn
    w.fractions = validate_fractions(w.fractions, "wfn.fractions")
    _check(0 < w.delta < 1, f"wfn.delta = {w.delta} must be in (0, 1) (relative tolerance)")
    _check(w.lr > 0, "wfn.lr must be > 0")
    _check(w.grad_clip is None or w.grad_clip > 0, "wfn.grad_clip must be > 0 or null")
    _check(w.reg_temperature > 0 and w.reg_ratio >= 0, "wfn.reg_temperature > 0 and wfn.reg_ratio >= 0")
    _check(w.round_epochs >= 0, "wfn.round_epochs must be >= 0")
    _validate_engine(w.engine, "wfn.engine")
