"""Mean-field Gaussian Linear and Conv layers.

Each layer holds ``weight_mu``/``weight_sigma`` (and ``bias_mu``/``bias_sigma``) as ordinary
Parameters. Nothing is ever attached to a Parameter object, so state_dict, ``.to()``, DDP,
deepcopy and pickling behave exactly as for any ``nn.Module``.

Three forward modes:

* ``sample`` — one reparameterised weight sample ``w = mu + sigma * eps`` per forward (the
  paper's choice); the drawn ``eps`` is remembered for the sigma regulariser.
* ``local`` — local reparameterisation: pre-activations are drawn from their exact Gaussian
  (mean ``f(x, mu)``, variance ``f(x**2, sigma**2)``); lower variance, one noise draw per output.
* ``mean`` — ``w = mu``: a converted model computes exactly what the original did.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BayesError
from .init import DEFAULT_SIGMA_FLOOR, SigmaInit, resolve_sigma_init

MODES = ("sample", "local", "mean")

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BayesError(f"unknown forward mode {mode!r}; choose one of {list(MODES)}")
    return mode


def _floored(sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """max(sigma, floor) whose gradient passes straight through.

    A plain clamp would zero the gradient below the floor, so a sigma pushed under it could
    never be pulled back up by the regulariser. Built from native ops rather than a Python
    ``autograd.Function`` (whose per-call forward/backward overhead cost ~5 % of a LeNet-5
    training step on a CPU, see benchmarks/results/bayes_layer_cost.md): the value is exactly
    the clamp of the detached sigma, and ``sigma - sigma.detach()`` (exactly zero) carries the
    identity gradient.
    """
    d = sigma.detach()
    return d.clamp_min(floor) + (sigma - d)


class BayesianLayer(nn.Module):
    """Base of every variational layer: parameters, modes, sampling and conversion hooks."""

    #: names of the quantisable parameter pairs, e.g. ("weight", "bias")
    param_names: tuple[str, ...] = ("weight", "bias")

    def _init_bayes(self, mode: str, sigma_floor: float) -> None:
        if not sigma_floor > 0:
            raise BayesError(f"sigma_floor must be positive, got {sigma_floor}")
        self.mode = check_mode(mode)
        self.sigma_floor = float(sigma_floor)
        # eps drawn by the last sample-mode forward, per parameter name; not state.
        self._last_eps: dict[str, torch.Tensor] = {}

    # -- parameter access -------------------------------------------------------------------
    def mu(self, name: str) -> Optional[torch.Tensor]:
        return getattr(self, f"{name}_mu")

    def sigma(self, name: str) -> Optional[torch.Tensor]:
        return getattr(self, f"{name}_sigma")

    def present_params(self) -> list[str]:
        """Names of the parameter pairs that exist (``bias`` is absent when bias=False)."""
        return [n for n in self.param_names if getattr(self, f"{n}_mu") is not None]

    def floored_sigma(self, name: str) -> torch.Tensor:
        return _floored(self.sigma(name), self.sigma_floor)

    def last_eps(self, name: str) -> Optional[torch.Tensor]:
        """The eps drawn for parameter ``name`` by the last ``sample``-mode forward, if any."""
        return self._last_eps.get(name)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only view of ``weight_mu`` for code that inspects ``module.weight``."""
        return self.weight_mu

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.bias_mu

    # -- construction helpers ---------------------------------------------------------------
    def _make_pair(self, name: str, shape: Sequence[int], factory_kwargs: dict) -> None:
        self.register_parameter(f"{name}_mu", nn.Parameter(torch.empty(*shape, **factory_kwargs)))
        self.register_parameter(f"{name}_sigma", nn.Parameter(torch.empty(*shape, **factory_kwargs)))

    def _absent_pair(self, name: str) -> None:
        self.register_parameter(f"{name}_mu", None)
        self.register_parameter(f"{name}_sigma", None)

    @torch.no_grad()
    def init_sigma(self, sigma_init: SigmaInit = "power_of_two", **kwargs) -> None:
        """(Re)initialise every sigma from its mu with a named, constant or callable rule."""
        fn = resolve_sigma_init(sigma_init, **kwargs)
        for name in self.present_params():
            mu = self.mu(name)
            self.sigma(name).copy_(fn(mu).to(mu.dtype).clamp_min(self.sigma_floor))

    @torch.no_grad()
    def reset_parameters(self, sigma_init: SigmaInit = "power_of_two") -> None:
        """Fresh layer: mu like torch's default init, sigma from ``sigma_init``."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.bias_mu is not None:
            fan_in = self.weight_mu[0].numel() if self.weight_mu.shape[0] > 0 else 0  # zero-sized layer
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias_mu, -bound, bound)
        self.init_sigma(sigma_init)

    # -- forward ----------------------------------------------------------------------------
    def _apply_fn(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _sampled(self, name: str) -> Optional[torch.Tensor]:
        mu = self.mu(name)
        if mu is None:
            return None
        eps = torch.randn_like(mu)
        self._last_eps[name] = eps
        return mu + self.floored_sigma(name) * eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            self._last_eps = {}
            return self._apply_fn(x, self.weight_mu, self.bias_mu)
        if self.mode == "sample":
            return self._apply_fn(x, self._sampled("weight"), self._sampled("bias"))
        # local reparameterisation
        self._last_eps = {}
        mean = self._apply_fn(x, self.weight_mu, self.bias_mu)
        w_var = self.floored_sigma("weight") ** 2
        b_var = self.floored_sigma("bias") ** 2 if self.bias_mu is not None else None
        var = self._apply_fn(x * x, w_var, b_var)
        # var is exactly 0 where the input patch is all zeros and there is no bias (common after
        # ReLU); sqrt'(0) = inf would turn the backward pass into NaN. Take the root only where
        # var > 0 (std = 0 elsewhere, with a zero gradient) so values are unchanged.
        positive = var > 0
        std = torch.where(positive, var, torch.ones_like(var)).sqrt()
        std = torch.where(positive, std, torch.zeros_like(std))
        return mean + std * torch.randn_like(mean)

    # -- conversion -------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> BayesianLayer:  # pragma: no cover
        raise NotImplementedError

    def to_module(self) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def _copy_from(self, module: nn.Module) -> None:
        # A frozen (requires_grad=False) torch parameter stays frozen: mu and sigma alike.
        self.weight_mu.copy_(module.weight)
        self.weight_mu.requires_grad_(module.weight.requires_grad)
        self.weight_sigma.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            self.bias_mu.copy_(module.bias)
            self.bias_mu.requires_grad_(module.bias.requires_grad)
            self.bias_sigma.requires_grad_(module.bias.requires_grad)

    @torch.no_grad()
    def _copy_to(self, module: nn.Module) -> nn.Module:
        module.weight.copy_(self.weight_mu)
        module.weight.requires_grad_(self.weight_mu.requires_grad)
        if self.bias_mu is not None:
            module.bias.copy_(self.bias_mu)
            module.bias.requires_grad_(self.bias_mu.requires_grad)
        module.train(self.training)
        return module

    def extra_repr(self) -> str:
        return f"{self._hyper_repr()}, mode={self.mode}"

    def _hyper_repr(self) -> str:  # pragma: no cover
        return ""

    def __getstate__(self):
        # The remembered eps is scratch state: do not pickle or deepcopy it. Start from
        # nn.Module's own state (it drops a ``compile()``d call wrapper, which cannot be pickled).
        state = super().__getstate__()
        state["_last_eps"] = {}
        return state


class BayesLinear(BayesianLayer):
    """Gaussian ``nn.Linear``: same arguments, ``weight_mu/sigma`` and ``bias_mu/sigma``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        mode: str = "sample",
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
        sigma_init: SigmaInit = "power_of_two",
    ) -> None:
        super().__init__()
        self._init_bayes(mode, sigma_floor)
        self.in_features = in_features
        self.out_features = out_features
        fk = {"device": device, "dtype": dtype}
        self._make_pair("weight", (out_features, in_features), fk)
        if bias:
            self._make_pair("bias", (out_features,), fk)
        else:
            self._absent_pair("bias")
        self.reset_parameters(sigma_init)

    def _apply_fn(self, x, weight, bias):
        return F.linear(x, weight, bias)

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs) -> BayesLinear:
        w = module.weight
        layer = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        layer._copy_from(module)
        layer.init_sigma(kwargs.get("sigma_init", "power_of_two"))
        layer.train(module.training)
        return layer

    def to_module(self) -> nn.Linear:
        w = self.weight_mu
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias_mu is not None,
                      device=w.device, dtype=w.dtype)
        return self._copy_to(m)

    def _hyper_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_mu is not None}"


def _ntuple(value: Union[int, Sequence[int]], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    t = tuple(int(v) for v in value)
    if len(t) != n:
        raise BayesError(f"{what} must be an int or a sequence of {n} ints, got {value!r}")
    return t


class _BayesConvNd(BayesianLayer):
    """Gaussian convolution with every hyper-parameter of ``nn.ConvNd``."""

    _dims: int = 2
    _torch_cls: type = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mode: str = "sample",
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
        sigma_init: SigmaInit = "power_of_two",
    ) -> None:
        super().__init__()
        self._init_bayes(mode, sigma_floor)
        n = self._dims
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise BayesError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in _PADDING_MODES:
            raise BayesError(f"padding_mode must be one of {list(_PADDING_MODES)}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size")
        self.stride = _ntuple(stride, n, "stride")
        self.dilation = _ntuple(dilation, n, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise BayesError(f"string padding must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise BayesError("padding='same' is not supported for strided convolutions")
            self.padding: Union[str, tuple[int, ...]] = padding
        else:
            self.padding = _ntuple(padding, n, "padding")
        self._explicit_pad = self._explicit_padding()
        fk = {"device": device, "dtype": dtype}
        self._make_pair("weight", (out_channels, in_channels // groups, *self.kernel_size), fk)
        if bias:
            self._make_pair("bias", (out_channels,), fk)
        else:
            self._absent_pair("bias")
        self.reset_parameters(sigma_init)

    def _explicit_padding(self) -> list[int]:
        """Padding for ``F.pad`` (last dimension first, (left, right) each) for non-zero modes."""
        pads: list[int] = []
        for i in reversed(range(self._dims)):
            if self.padding == "valid":
                left = right = 0
            elif self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = self.padding[i]
            pads += [left, right]
        return pads

    def _conv(self, x, weight, bias, padding):
        raise NotImplementedError

    def _apply_fn(self, x, weight, bias):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            return self._conv(x, weight, bias, 0)
        return self._conv(x, weight, bias, self.padding)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> _BayesConvNd:
        w = module.weight
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        layer._copy_from(module)
        layer.init_sigma(kwargs.get("sigma_init", "power_of_two"))
        layer.train(module.training)
        return layer

    def to_module(self) -> nn.Module:
        w = self.weight_mu
        m = self._torch_cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias_mu is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        return self._copy_to(m)

    def _hyper_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias_mu is not None}, padding_mode={self.padding_mode}"
        )


class BayesConv1d(_BayesConvNd):
    _dims = 1
    _torch_cls = nn.Conv1d

    def _conv(self, x, weight, bias, padding):
        return F.conv1d(x, weight, bias, self.stride, padding, self.dilation, self.groups)


class BayesConv2d(_BayesConvNd):
    _dims = 2
    _torch_cls = nn.Conv2d

    def _conv(self, x, weight, bias, padding):
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)


class BayesConv3d(_BayesConvNd):
    _dims = 3
    _torch_cls = nn.Conv3d

    def _conv(self, x, weight, bias, padding):
        return F.conv3d(x, weight, bias, self.stride, padding, self.dilation, self.groups)


#: torch layer type -> its Bayesian counterpart (exact types: subclasses are not converted).
BAYESIAN_COUNTERPARTS: dict[type, type] = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
}


def bayesian_layers(model: nn.Module) -> Iterator[tuple[str, BayesianLayer]]:
    """Every Bayesian layer of ``model`` with its qualified name (shared layers once)."""
    for name, module in model.named_modules():
        if isinstance(module, BayesianLayer):
            yield name, module


def set_forward_mode(model: nn.Module, mode: str) -> None:
    """Switch every Bayesian layer of ``model`` (or the layer itself) to ``mode``."""
    check_mode(mode)
    for _, layer in bayesian_layers(model):
        layer.mode = mode


@contextmanager
def forward_mode(model: nn.Module, mode: str):
    """Temporarily run every Bayesian layer in ``mode``; each layer's own mode is restored after."""
    check_mode(mode)
    layers = [layer for _, layer in bayesian_layers(model)]
    previous = [layer.mode for layer in layers]
    try:
        for layer in layers:
            layer.mode = mode
        yield model
    finally:
        for layer, old in zip(layers, previous):
            layer.mode = old
