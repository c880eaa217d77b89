"""Mean-field Gaussian weights on any parameter of any ``nn.Module``.

Design: a weight becomes Gaussian through ``torch.nn.utils.parametrize``. The module keeps its
own class (``isinstance(m, nn.Linear)`` still holds, ``nn.LSTM`` stays an LSTM, a Hugging Face
layer stays itself); its parameter ``weight`` becomes a computed attribute whose leaf tensors
are ``parametrizations.weight.original`` (mu, the trained value) and
``parametrizations.weight.0.sigma``. Every reader of ``module.weight`` therefore sees the
posterior draw: the module's own forward, a parent that reads it directly (the fused
``TransformerEncoderLayer`` fast path, ``MultiheadAttention``'s packed ``in_proj_weight``),
RNN flat-weight buffers and tied weights alike. Why this rather than subclassing each layer
type (the Pyro ``PyroModule[cls]`` route): a subclass must re-implement every layer's forward
and would still miss code that reads ``.weight`` from outside the layer; a parametrization is
one mechanism for every parameter, and ``to_point_estimate`` removes it, leaving the user's
module with its own state_dict keys.

Three forward modes, per Gaussian parameter:

* ``sample`` — ``w = mu + sigma * eps``. ``eps`` is drawn once per *draw window*: a new window
  opens at each forward of the converted root module, so one forward of the network reads one
  draw per parameter however often, and by however many modules, it is read (an LSTM reads its
  weights twice; tied embedding/output weights are one draw). A module that owns a Gaussian
  parameter and is called on its own, outside a root forward, opens its own window. The drawn
  ``eps`` is remembered for the sigma regulariser.
* ``local`` — local reparameterisation: for owners with a registered variance rule (Linear,
  Conv/ConvTranspose 1-3d, Hugging Face ``Conv1D``, or yours via :func:`register_local_rule`)
  the output is ``f(x, mu) + sqrt(f(x**2, sigma**2)) * noise``. Parameters of other owners
  (RNNs, attention, embeddings, free parameters) have no such closed form and are sampled
  as in ``sample`` mode; :func:`local_mode_coverage` tells which.
* ``mean`` — ``w = mu`` itself (the same tensor): a converted model computes exactly what the
  original did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BayesError
from .init import DEFAULT_SIGMA_FLOOR

log = logging.getLogger(__name__)

MODES = ("sample", "local", "mean")

# A global draw counter: a Gaussian parameter draws a new eps the first time it is read after
# the counter moved. The converted root's forward pre-hook moves it; an owner's pre-hook moves it
# only when no root forward is under way (``_depth`` counts root forwards in progress).
_window = [0]
_depth = [0]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BayesError(f"unknown forward mode {mode!r}; choose one of {list(MODES)}")
    return mode


def _floored(sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """max(sigma, floor) whose gradient passes straight through.

    A plain clamp would zero the gradient below the floor, so a sigma pushed under it could
    never be pulled back up by the regulariser. Built from native ops (no Python
    ``autograd.Function``): the value is exactly the clamp of the detached sigma, and
    ``sigma - sigma.detach()`` (exactly zero) carries the identity gradient.
    """
    d = sigma.detach()
    return d.clamp_min(floor) + (sigma - d)


def root_forward_starts(*_: Any, **__: Any) -> None:
    """Forward pre-hook of a converted root: a new draw window for the whole network."""
    _window[0] += 1
    _depth[0] += 1


def root_forward_ends(*_: Any, **__: Any) -> None:
    """Forward hook of a converted root (also called when the forward raised)."""
    _depth[0] = max(0, _depth[0] - 1)


def owner_forward_starts(*_: Any, **__: Any) -> None:
    """Forward pre-hook of a module owning a Gaussian parameter: a new window only when it is
    called on its own (inside a root forward the root's window holds)."""
    if _depth[0] == 0:
        _window[0] += 1


class GaussianParameter(nn.Module):
    """The parametrization ``mu -> mu + sigma * eps`` of one tensor (see the module docstring)."""

    def __init__(self, sigma: torch.Tensor, *, mode: str = "sample", sigma_floor: float = DEFAULT_SIGMA_FLOOR,
                 local_owner: bool = False) -> None:
        super().__init__()
        if not sigma_floor > 0:
            raise BayesError(f"sigma_floor must be positive, got {sigma_floor}")
        self.sigma = nn.Parameter(sigma)
        self.mode = check_mode(mode)
        self.sigma_floor = float(sigma_floor)
        #: every owner of this tensor has a local-reparameterisation rule
        self.local_owner = bool(local_owner)
        self._eps: Optional[torch.Tensor] = None
        self._window = -1
        self._sample: Optional[torch.Tensor] = None  # this window's draw, reused by repeated reads
        self._sample_key: tuple = ()

    def floored_sigma(self) -> torch.Tensor:
        """sigma, floored at ``sigma_floor`` with a straight-through gradient."""
        return _floored(self.sigma, self.sigma_floor)

    @property
    def last_eps(self) -> Optional[torch.Tensor]:
        """The eps of the current draw (``None`` before any sample-mode read, or after a mean/local forward)."""
        return self._eps

    def compute(self, mu: torch.Tensor) -> torch.Tensor:
        """The tensor the owner sees: mu (mean mode, local-mode owners) or this window's draw."""
        d = self.__dict__  # plain attribute writes: Module.__setattr__ is slow on this hot path
        if self.mode == "mean" or (self.mode == "local" and self.local_owner):
            d["_eps"] = None
            return mu
        window = _window[0]
        key = (window, torch.is_grad_enabled(), mu.data_ptr(), mu._version, self.sigma._version)
        if d["_sample_key"] == key:
            return d["_sample"]  # read again in the same window (an LSTM reads its weights twice)
        eps = d["_eps"]
        if eps is None or d["_window"] != window or eps.shape != mu.shape or eps.device != mu.device \
                or eps.dtype != mu.dtype:
            eps = torch.randn_like(mu)
            d["_eps"] = eps
            d["_window"] = window
        w = torch.addcmul(mu, self.floored_sigma(), eps)  # mu + sigma * eps, one kernel and one autograd node
        d["_sample"] = w
        d["_sample_key"] = key
        return w

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        """Called by ``torch.nn.utils.parametrize``: see :meth:`compute`."""
        return self.compute(mu)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, sigma_floor={self.sigma_floor:g}"

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.update(_eps=None, _sample=None, _sample_key=())  # scratch: never pickled or deep-copied
        return state


# --------------------------------------------------------------------------------------------
# local reparameterisation rules: owner type -> (module, args, kwargs, {param: sigma^2}) -> variance

LocalRule = Callable[[nn.Module, tuple, dict, dict], torch.Tensor]
_LOCAL_RULES: dict[Union[type, str], LocalRule] = {}


def register_local_rule(owner: Union[type, str], rule: LocalRule) -> None:
    """Teach ``local`` mode an owner type (a class, or its qualified name ``"pkg.mod.Class"``).

    ``rule(module, args, kwargs, var)`` returns the output variance for the forward's inputs,
    where ``var`` maps each Gaussian parameter name of the module (``"weight"``, ``"bias"``) to
    its sigma squared; the output must be linear in those parameters.
    """
    _LOCAL_RULES[owner] = rule


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def local_rule_for(module: nn.Module) -> Optional[LocalRule]:
    """The local-reparameterisation rule registered for the module's class (or a base class), if any."""
    for cls in type(module).__mro__:
        if cls in _LOCAL_RULES:
            return _LOCAL_RULES[cls]
        name = _qualname(cls)
        if name in _LOCAL_RULES:
            return _LOCAL_RULES[name]
    return None


def _linear_rule(m, args, kwargs, var):
    x = args[0] if args else kwargs["input"]
    return F.linear(x * x, var["weight"], var.get("bias"))


def _conv_rule(m, args, kwargs, var):
    x = args[0] if args else kwargs["input"]
    return m._conv_forward(x * x, var["weight"], var.get("bias"))


def _conv_transpose_rule(m, args, kwargs, var):
    x = args[0] if args else kwargs["input"]
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    n = len(m.kernel_size)
    pad = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, n, m.dilation)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return fn(x * x, var["weight"], var.get("bias"), m.stride, m.padding, pad, m.groups, m.dilation)


def _hf_conv1d_rule(m, args, kwargs, var):
    # transformers' Conv1D: y = x @ W + b with W of shape (in, out)
    x = args[0] if args else kwargs["x"]
    out = torch.matmul(x * x, var["weight"])
    return out + var["bias"] if "bias" in var else out


register_local_rule(nn.Linear, _linear_rule)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_local_rule(_cls, _conv_rule)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_local_rule(_cls, _conv_transpose_rule)
register_local_rule("transformers.pytorch_utils.Conv1D", _hf_conv1d_rule)


def _local_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
    gps = {n: p for n, p in gaussians_of(module).items()}
    if not gps or not all(p.mode == "local" for p in gps.values()):
        return output
    rule = local_rule_for(module)
    var = {n: p.floored_sigma() ** 2 for n, p in gps.items()}
    v = rule(module, args, kwargs, var)
    # var is exactly 0 where the input patch is all zeros and there is no bias (common after
    # ReLU); sqrt'(0) = inf would make the backward pass NaN. Take the root only where var > 0.
    positive = v > 0
    std = torch.where(positive, v, torch.ones_like(v)).sqrt()
    std = torch.where(positive, std, torch.zeros_like(std))
    return output + std * torch.randn_like(output)


# --------------------------------------------------------------------------------------------
# access


def gaussians_of(module: nn.Module) -> dict[str, GaussianParameter]:
    """The Gaussian parameters a module owns directly, by tensor name (``{}`` for none)."""
    # straight through the module's registry: getattr on a missing attribute is slow in torch,
    # and this runs for every module at every regulariser call
    plist = module.__dict__.get("_modules", {}).get("parametrizations")
    if not isinstance(plist, nn.ModuleDict):
        return {}
    out = {}
    for name, chain in plist._modules.items():
        last = chain._modules.get(str(len(chain._modules) - 1)) if chain is not None else None
        if isinstance(last, GaussianParameter):
            out[name] = last
    return out


def mu_of(module: nn.Module, name: str) -> torch.Tensor:
    """The mu (leaf parameter) of a Gaussian tensor ``name`` owned by ``module``."""
    if name not in gaussians_of(module):
        raise BayesError(f"{type(module).__name__}.{name} is not a Gaussian parameter")
    return module.parametrizations[name].original


class GaussianEntry:
    """One distinct Gaussian tensor of a model: its qualified name(s), owner(s), mu and sigma."""

    __slots__ = ("name", "aliases", "module", "param", "gaussian")

    def __init__(self, name: str, module: nn.Module, param: str, gaussian: GaussianParameter) -> None:
        self.name = name
        self.aliases: list[str] = []
        self.module = module
        self.param = param
        self.gaussian = gaussian

    @property
    def mu(self) -> torch.Tensor:
        return self.module.parametrizations[self.param].original

    @property
    def sigma(self) -> torch.Tensor:
        return self.gaussian.sigma

    def __repr__(self) -> str:
        return f"GaussianEntry({self.name!r}, aliases={self.aliases})"


def gaussian_parameters(model: nn.Module) -> list[GaussianEntry]:
    """Every distinct Gaussian tensor of ``model``, named as in the point-estimate model.

    A tensor shared by several modules (tied weights) or a module used twice appears once, under
    its first name; the other names are in ``aliases``.
    """
    seen: dict[int, GaussianEntry] = {}
    out: list[GaussianEntry] = []
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, gp in gaussians_of(module).items():
            qual = f"{mname}.{pname}" if mname else pname
            entry = seen.get(id(gp))
            if entry is None:
                entry = GaussianEntry(qual, module, pname, gp)
                seen[id(gp)] = entry
                out.append(entry)
            elif qual != entry.name and qual not in entry.aliases:
                entry.aliases.append(qual)
    return out


def sigma_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sigma parameters of ``model`` (each once), e.g. for their own optimizer group."""
    return [e.sigma for e in gaussian_parameters(model)]


def bayesian_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module of ``model`` that owns a Gaussian parameter, with its qualified name (once each)."""
    for name, module in model.named_modules():
        if gaussians_of(module):
            yield name, module


def is_bayesian(model: nn.Module) -> bool:
    """Whether ``model`` has at least one Gaussian parameter."""
    return any(True for _ in bayesian_modules(model))


def local_mode_coverage(model: nn.Module) -> dict[str, bool]:
    """Qualified Gaussian tensor name -> whether ``local`` mode uses local reparameterisation for it."""
    return {e.name: e.gaussian.local_owner for e in gaussian_parameters(model)}


def set_forward_mode(model: nn.Module, mode: str) -> None:
    """Switch every Gaussian parameter of ``model`` to ``mode``."""
    check_mode(mode)
    for e in gaussian_parameters(model):
        e.gaussian.mode = mode


@contextmanager
def forward_mode(model: nn.Module, mode: str):
    """Temporarily run every Gaussian parameter in ``mode``; each one's own mode is restored after."""
    check_mode(mode)
    gps = [e.gaussian for e in gaussian_parameters(model)]
    previous = [g.mode for g in gps]
    try:
        for g in gps:
            g.mode = mode
        yield model
    finally:
        for g, old in zip(gps, previous):
            g.mode = old
