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
  parameter and is called on its own, outside a root forward, opens its own window; a read of
  the weight outside any forward draws afresh. The drawn ``eps`` is remembered for the sigma
  regulariser.
* ``local`` — local reparameterisation: for owners with a registered variance rule (Linear,
  Conv/ConvTranspose 1-3d, Hugging Face ``Conv1D``, or yours via :func:`register_local_rule`)
  the output is ``f(x, mu) + sqrt(f(x**2, sigma**2)) * noise``. Parameters of other owners
  (RNNs, attention, embeddings, free parameters) have no such closed form and are sampled
  as in ``sample`` mode; :func:`local_mode_coverage` tells which.
* ``mean`` — ``w = mu`` itself (the same tensor): a converted model computes exactly what the
  original did.

How a window works, and why it compiles: the window's module holds a :class:`DrawWindow` as
forward pre-hook and (always-called) forward hook. Opening draws ``eps`` for every Gaussian
parameter of the window that samples in one ``torch.randn`` per dtype and device (views of
one buffer, so one RNG call for the whole network), and closing clears the per-window sample.
All of that state lives on the parameters' own scratch objects and is the same at the start of
every forward (closed), so ``torch.compile`` captures one graph per forward mode and never
recompiles for a new draw; no module-wide counter, ``data_ptr`` or ``_version`` is read. The
draw itself is torch's own kernel and generator, an opaque operator inside a compiled graph (see
:func:`fill_normal_`): compiled and eager runs draw the same numbers from the same seed. A sample is one autograd node per tensor
(``mu + max(sigma, floor) * eps``), so each tensor's gradients are ready as soon as its layer's
backward is done (DDP's overlap and FSDP's per-module reduce-scatter keep working).
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


class _Draw(torch.autograd.Function):
    """``mu + max(sigma, floor) * eps`` as one autograd node (the floor passes gradients straight).

    The value is bit-identical to ``torch.addcmul(mu, _floored(sigma, floor), eps)``; the
    gradients are ``g`` for mu and ``g * eps`` for sigma. One node per tensor instead of three
    keeps a training step cheap, and keeps every tensor's gradient independent of the others'.
    (No forward-mode AD rule: ``torch.compile`` cannot trace a Function that has one.)
    """

    @staticmethod
    def forward(ctx, mu, sigma, eps, floor):
        ctx.save_for_backward(eps)
        return torch.addcmul(mu, sigma.clamp_min(floor), eps)

    @staticmethod
    def backward(ctx, grad):
        (eps,) = ctx.saved_tensors
        return grad, grad * eps if ctx.needs_input_grad[1] else None, None, None


class _Scratch:
    """A Gaussian parameter's per-forward state: never saved, copied or pickled.

    ``opener``: the :class:`DrawWindow` whose window is open for this parameter (None: closed);
    ``eps``: the current draw; ``sample``: this window's ``mu + sigma * eps`` (reused by every
    read in the window), computed with grad mode ``grad``.
    """

    __slots__ = ("opener", "eps", "sample", "grad")

    def __init__(self) -> None:
        self.opener: Optional[DrawWindow] = None
        self.eps: Optional[torch.Tensor] = None
        self.sample: Optional[torch.Tensor] = None
        self.grad = False


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
        #: set when the parametrization was removed (``to_point_estimate``): no window draws for it
        self.retired = False
        self._scratch = _Scratch()

    @property
    def draws(self) -> bool:
        """Whether a forward in the current mode samples this tensor (``sample``, or ``local``
        without a local-reparameterisation rule for every owner)."""
        return self.mode == "sample" or (self.mode == "local" and not self.local_owner)

    def floored_sigma(self) -> torch.Tensor:
        """sigma, floored at ``sigma_floor`` with a straight-through gradient."""
        return _floored(self.sigma, self.sigma_floor)

    @property
    def last_eps(self) -> Optional[torch.Tensor]:
        """The eps of the current draw (``None`` before any sample-mode read, or after a mean/local forward)."""
        return self._scratch.eps

    def compute(self, mu: torch.Tensor) -> torch.Tensor:
        """The tensor the owner sees: mu (mean mode, local-mode owners) or this window's draw."""
        st = self._scratch
        if not self.draws:
            st.eps = None
            return mu
        grad = torch.is_grad_enabled()
        sample = st.sample
        if sample is not None and st.grad == grad:
            return sample  # read again in the same window (an LSTM reads its weights twice)
        eps = st.eps if st.opener is not None else None  # outside a window every read draws afresh
        if eps is None or eps.shape != mu.shape or eps.dtype != mu.dtype or eps.device != mu.device:
            eps = torch.randn_like(mu)
            st.eps = eps
        w = _Draw.apply(mu, self.sigma, eps, self.sigma_floor)
        if st.opener is not None:
            st.sample = w
            st.grad = grad
        return w

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        """Called by ``torch.nn.utils.parametrize``: see :meth:`compute`."""
        return self.compute(mu)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, sigma_floor={self.sigma_floor:g}"

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_scratch"] = _Scratch()  # scratch: never pickled or deep-copied
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", _Scratch())
        self.__dict__.setdefault("retired", False)


def _fill_normal(out: torch.Tensor) -> None:
    out.normal_()


if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    # The draw as an opaque operator: torch.compile keeps it in the graph (no graph break) and runs
    # torch's own kernel and generator. Compiled and eager runs draw the same numbers from the same
    # seed (unless the graph also holds random ops of inductor's, which draw its seeds first), and
    # inductor's own CPU random kernels, about ten times slower than torch's, are not used. It
    # mutates its argument, so a compiler never merges two draws into one.
    @torch.library.custom_op("bayes::fill_normal_", mutates_args=("out",))
    def _fill_normal_op(out: torch.Tensor) -> None:
        out.normal_()

    @_fill_normal_op.register_fake
    def _(out: torch.Tensor) -> None:
        return None

    fill_normal_ = _fill_normal_op
else:  # pragma: no cover - older torch: dynamo steps around the eager draw
    fill_normal_ = torch.compiler.disable(_fill_normal)


def _draw_eps(params: list[GaussianParameter]) -> None:
    """A fresh eps for each parameter: one standard-normal fill per (dtype, device), cut into views.

    The fill is :func:`fill_normal_`, torch's own kernel and generator also inside
    ``torch.compile``; the compiled forward reads the views.
    """
    groups: dict[tuple, tuple[list[GaussianParameter], list[torch.Tensor]]] = {}
    for g in params:
        s = g.sigma
        gs, sigmas = groups.setdefault((s.dtype, s.device), ([], []))
        gs.append(g)
        sigmas.append(s)
    for (dtype, device), (gs, sigmas) in groups.items():
        flat = torch.empty(sum(s.numel() for s in sigmas), dtype=dtype, device=device)
        fill_normal_(flat)
        # views shaped like each sigma, made by torch in one call (DDP's bucket flattening uses it too)
        for g, eps in zip(gs, torch._utils._unflatten_dense_tensors(flat, sigmas)):
            g._scratch.eps = eps


class DrawWindow:
    """The draw window of one module's forward: its pre-hook opens it, its forward hook closes it.

    ``params``: the Gaussian parameters the window covers (a converted root: all of its own; an
    owner: the ones it owns). A window opens only for parameters not already in an open window
    (an owner called inside its root's forward shares the root's draw) and closes only what it
    opened, also when the forward raised.
    """

    def __init__(self, params) -> None:
        self.params: tuple[GaussianParameter, ...] = tuple(params)

    def open(self, module: nn.Module, args: Any) -> None:
        drawing = []
        for g in self.params:
            st = g._scratch
            if st.opener is not None or g.retired:
                continue
            st.opener = self
            st.sample = None
            if g.draws:
                drawing.append(g)
            else:
                st.eps = None
        if drawing:
            _draw_eps(drawing)

    def close(self, module: nn.Module, args: Any, output: Any) -> None:
        for g in self.params:
            st = g._scratch
            if st.opener is self:
                st.opener = None
                st.sample = None


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


def _named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules(remove_duplicate=False)`` (same order), minus the insides of
    parametrizations (the ``parametrizations`` containers hold no Gaussian owner): about a third
    of the modules of a converted model, and this walk runs at every regulariser call."""
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = module._modules
        skip = "parametrizations" if isinstance(children.get("parametrizations"), nn.ModuleDict) else None
        for cname, child in reversed(children.items()):
            if child is not None and cname != skip:
                stack.append((f"{name}.{cname}" if name else cname, child))


def gaussian_parameters(model: nn.Module) -> list[GaussianEntry]:
    """Every distinct Gaussian tensor of ``model``, named as in the point-estimate model.

    A tensor shared by several modules (tied weights) or a module used twice appears once, under
    its first name; the other names are in ``aliases``.
    """
    seen: dict[int, GaussianEntry] = {}
    out: list[GaussianEntry] = []
    for mname, module in _named_modules(model):
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
