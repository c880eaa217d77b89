"""Reference shift-add forward: the integer arithmetic a multiplier-free device performs.

Why: a fixed network's weights are sums of signed powers of two ``w = sum_t s_t 2^{e_t}``
(``e_t >= -b``), so a device can replace every multiplication by shifts and adds. This module
states *exactly* what that device computes, in pure PyTorch, so that every export target
(hls4ml's C simulation above all) can be checked against it bit for bit:

- activations are signed fixed-point integers with ``frac_bits`` fractional bits
  (``x_int = floor(x * 2^F)``, i.e. truncation towards minus infinity, like ``ap_fixed``'s
  default ``AP_TRN``), and must fit ``width`` bits (two's complement) or an error is raised;
- a Linear/Conv output is accumulated exactly in units of ``2^-(F+b)``:
  ``acc = sum_i sum_t s_t * (x_int_i << (e_t + b)) + bias * 2^(F+b)``, then brought back to
  ``F`` fractional bits by ``acc >> b`` (floor);
- ReLU, max-pooling, reshapes and residual additions are exact on the integers; average
  pooling is the window's exact sum divided by its size, truncated towards zero (what
  ``ap_fixed``'s ``sum /= n`` does; a power-of-two window is a shift, any other a division);
- a BatchNorm is its own per-channel scale and shift (never folded into the weights, which would
  take them off the codebook), both rounded to ``S`` fractional bits (:func:`bn_fixed`):
  ``floor((x_int * s_int + c_int * 2^F) / 2^S)``, one multiplication per value.

``mode="shift"`` applies every weight as its signed power-of-two terms (shift, then add or
subtract; zero weights are skipped); ``mode="multiply"`` does the same integer arithmetic with
integer matrix products ``x_int @ (w * 2^b)``. They are bit-identical by construction of the
arithmetic, which the tests check; the float output is ``y_int * 2^-F``. ``error_bound``
propagates the truncation errors through the layers (infinity-norm bound), so a test can check
that the reference is within the fixed-point error of the float model.

Supported layers (one entry per kind in ``_PREPARE``/``_RUN``, traced by
:mod:`pwfn.export.targets.graph`): ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (groups 1,
dilation 1, zero padding), ``nn.BatchNorm1d``/``2d``, ``nn.ReLU`` (module, function or method),
max and average pooling (1-D and 2-D, any window, stride and padding, adaptive average pooling
whose output divides its input), flatten/view/reshape/unsqueeze/squeeze, dropout/identity and
the sum of two activations (residual). Anything else raises ``ShiftAddError`` naming the
layer: it has no exact integer form here (the float targets take it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.centres import decompose
from ...errors import PwfnError
from .graph import GraphError, refuse_unsupported

__all__ = [
    "FixedPoint",
    "ShiftAddError",
    "ShiftAddNet",
    "bn_fixed",
    "calibrate",
    "layer_terms",
]

#: elements (rows x terms) of one shift-add chunk; bounds the temporary memory (~64 MB int64)
_CHUNK = 1 << 23


class ShiftAddError(PwfnError, ValueError):
    """The model (or a value in it) has no exact multiplier-free integer form."""


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed-point activation format: ``width`` bits of which ``frac_bits`` fractional.

    ``ap_fixed<width, width - frac_bits>`` in HLS terms (truncation, no saturation).
    """

    frac_bits: int = 12
    width: int = 24

    def __post_init__(self) -> None:
        if not (0 <= self.frac_bits < self.width <= 62):
            raise ShiftAddError(f"fixed point needs 0 <= frac_bits < width <= 62, got {self}")

    @property
    def int_bits(self) -> int:
        """Integer bits including the sign (HLS ``I`` of ``ap_fixed<W, I>``)."""
        return self.width - self.frac_bits

    @property
    def ulp(self) -> float:
        return 2.0**-self.frac_bits

    def quantise(self, x: Tensor) -> Tensor:
        """floor(x * 2^F) as int64 (x must be finite; range checked by ``check``)."""
        xd = x.detach().to(torch.float64)
        if not bool(torch.isfinite(xd).all()):
            raise ShiftAddError("input holds NaN or inf")
        out = torch.floor(xd * 2.0**self.frac_bits).to(torch.int64)
        self.check(out, "the input")
        return out

    def check(self, v: Tensor, where: str) -> None:
        lim = 1 << (self.width - 1)
        if v.numel() and (int(v.max()) >= lim or int(v.min()) < -lim):
            worst = max(int(v.max()), -int(v.min())) * 2.0**-self.frac_bits
            raise ShiftAddError(
                f"{where} overflows the activation format ap_fixed<{self.width},{self.int_bits}> "
                f"(|value| up to {worst:.4g}, range +-{lim * 2.0**-self.frac_bits:.4g}); "
                "use more integer bits (a larger width)"
            )


# --------------------------------------------------------------------------------------------
# weights as terms


@dataclass
class _Terms:
    """Every non-zero power-of-two term of a weight matrix (out x in), as flat lists."""

    out_idx: Tensor  # int64
    in_idx: Tensor  # int64
    shift: Tensor  # int64, e + b >= 0
    negative: Tensor  # bool
    w_int: Tensor  # (out, in) int64: w * 2^b
    n_weights: int
    n_zero: int

    @property
    def n_terms(self) -> int:
        return int(self.out_idx.numel())


def layer_terms(weight: Tensor, b: int, signed_terms: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(signs int8, exponents int16, orders) of every weight (``pwfn.core.centres.decompose``).

    Raises ``ShiftAddError`` when a weight is not a sum of powers of two down to ``2^-b``.
    """
    w = weight.detach().to(torch.float64)
    try:
        dec = decompose(w, b=b, signed_terms=signed_terms)
    except PwfnError as exc:
        raise ShiftAddError(f"weights are not sums of powers of two down to 2^-{b}: {exc}") from exc
    return dec.signs, dec.exponents, dec.orders


def _terms(weight2d: Tensor, b: int, signed_terms: bool) -> _Terms:
    signs, exps, _ = layer_terms(weight2d, b, signed_terms)
    nz = signs != 0  # (out, in, width)
    o, i, t = torch.nonzero(nz, as_tuple=True)
    shift = exps[o, i, t].to(torch.int64) + b
    negative = signs[o, i, t] < 0
    w_int = torch.round(weight2d.detach().to(torch.float64) * 2.0**b).to(torch.int64)
    return _Terms(o, i, shift, negative, w_int, int(weight2d.numel()), int((w_int == 0).sum()))


def _bias_int(bias: Tensor | None, out: int, b: int, fp: FixedPoint) -> Tensor:
    if bias is None:
        return torch.zeros(out, dtype=torch.int64)
    scaled = bias.detach().to(torch.float64) * 2.0 ** (fp.frac_bits + b)
    rounded = torch.round(scaled)
    if not bool((rounded == scaled).all()):
        raise ShiftAddError(f"a bias is not a multiple of 2^-{b}: it has no exact fixed-point form")
    return rounded.to(torch.int64)


def _shift_add(x: Tensor, terms: _Terms, out_features: int) -> Tensor:
    """sum_i sum_t +-(x[:, i] << shift): rows x out, exact int64, no multiplication."""
    rows = x.shape[0]
    acc = torch.zeros(rows, out_features, dtype=torch.int64)
    if terms.n_terms == 0 or rows == 0:
        return acc
    step = max(1, _CHUNK // max(rows, 1))
    for s in range(0, terms.n_terms, step):
        o = terms.out_idx[s:s + step]
        v = torch.bitwise_left_shift(x[:, terms.in_idx[s:s + step]], terms.shift[s:s + step])
        v = torch.where(terms.negative[s:s + step], -v, v)  # subtract instead of add
        acc.index_add_(1, o, v)
    return acc


def _multiply(x: Tensor, terms: _Terms) -> Tensor:
    return x @ terms.w_int.t()


@dataclass
class _Op:
    kind: str
    node: str
    args: list[str]
    module: nn.Module | None = None
    terms: _Terms | None = None
    bias: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the compiled integer network


#: fractional bits of a BatchNorm's scale and shift (fewer when a value is large: both must stay
#: exact in float32, which the hls4ml project reads them from)
BN_FRAC_BITS = 16


def bn_fixed(scale: Tensor, shift: Tensor, frac_bits: int = BN_FRAC_BITS) -> tuple[Tensor, Tensor, int]:
    """A BatchNorm's per-channel scale and shift on a ``2^-S`` grid: (scale_int, shift_int, S), int64.

    S is ``frac_bits`` or fewer, so that every value has at most 24 significant bits (exact in float32).
    """
    peak = float(torch.cat([scale.abs().reshape(-1), shift.abs().reshape(-1)]).max()) if scale.numel() else 0.0
    top = max(0, math.ceil(math.log2(peak + 1.0)))
    S = max(0, min(frac_bits, 23 - top))
    s_int = torch.round(scale.double() * 2.0**S).to(torch.int64)
    c_int = torch.round(shift.double() * 2.0**S).to(torch.int64)
    return s_int, c_int, S


class ShiftAddNet:
    """A fixed network compiled to integer shift-add arithmetic (see the module docstring).

    ``ShiftAddNet(model, b=7, fixed_point=FixedPoint(12, 24), signed_terms=False)``;
    ``net.forward_int(x_int, mode)`` runs on ``floor(x * 2^F)`` integers, ``net(x)`` on floats.
    ``example`` (a batch) gives the shapes a view/reshape/unsqueeze needs. Each layer kind has
    one entry in :data:`_PREPARE` (checks, integer constants) and one in :data:`_RUN`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        b: int = 7,
        fixed_point: FixedPoint | None = None,
        signed_terms: bool = False,
        example: Tensor | None = None,
    ) -> None:
        self.b = int(b)
        self.fp = fixed_point or FixedPoint()
        self.signed_terms = signed_terms
        try:
            g = refuse_unsupported(model.eval(), "the shift-add reference", {k: _CHECK.get(k, _ok) for k in _RUN},
                                   example, alternative="the onnx and tflm targets take it in float")
        except GraphError as exc:
            raise ShiftAddError(str(exc)) from exc
        self.input_name, self.output_name = g.input, g.output
        self.ops: list[_Op] = []
        for lay in g.layers:
            op = _Op(lay.kind, lay.name, lay.args, lay.module, extra=dict(lay.extra, qual=lay.qual or lay.name))
            prepare = _PREPARE.get(lay.kind)
            if prepare is not None:
                prepare(self, op)
            self.ops.append(op)

    # -- running ----------------------------------------------------------------------------
    def forward_int(self, x_int: Tensor, mode: str = "shift") -> Tensor:
        """Integer forward pass: activations in units of ``2^-F`` (int64) in and out."""
        if mode not in ("shift", "multiply"):
            raise ShiftAddError(f"mode must be 'shift' or 'multiply', got {mode!r}")
        if x_int.dtype != torch.int64:
            raise ShiftAddError(f"forward_int takes int64 fixed-point input, got {x_int.dtype}")
        env: dict[str, Tensor] = {self.input_name: x_int}  # type: ignore[dict-item]
        for op in self.ops:
            env[op.node] = _RUN[op.kind](self, op, [env[a] for a in op.args], mode)
        return env[self.output_name]  # type: ignore[index]

    def __call__(self, x: Tensor, mode: str = "shift") -> Tensor:
        """Float in, float out (``forward_int`` on ``floor(x * 2^F)``, scaled back)."""
        with torch.no_grad():
            y = self.forward_int(self.fp.quantise(x), mode)
        return y.to(torch.float64) * self.fp.ulp

    def _affine(self, op: _Op, rows: Tensor, mode: str) -> Tensor:
        terms = op.terms
        assert terms is not None and op.bias is not None
        acc = _shift_add(rows, terms, terms.w_int.shape[0]) if mode == "shift" else _multiply(rows, terms)
        acc += op.bias
        out = torch.bitwise_right_shift(acc, self.b)  # floor(acc / 2^b): back to F fractional bits
        self.fp.check(out, f"the output of {op.extra['qual']}")
        return out

    def _conv(self, op: _Op, x: Tensor, mode: str) -> Tensor:
        m = op.module
        nd = 1 if isinstance(m, nn.Conv1d) else 2
        pad = m.padding
        if nd == 1:
            x = F.pad(x, (pad[0], pad[0]))
            win = x.unfold(2, m.kernel_size[0], m.stride[0])  # N, C, L, k
            n, c, L, kk = win.shape
            rows = win.permute(0, 2, 1, 3).reshape(n * L, c * kk)
            out = self._affine(op, rows, mode)
            return out.reshape(n, L, -1).permute(0, 2, 1).contiguous()
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        win = x.unfold(2, m.kernel_size[0], m.stride[0]).unfold(3, m.kernel_size[1], m.stride[1])
        n, c, oh, ow, kh, kw = win.shape  # N, C, OH, OW, kh, kw
        rows = win.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        out = self._affine(op, rows, mode)
        return out.reshape(n, oh, ow, -1).permute(0, 3, 1, 2).contiguous()

    # -- analysis ---------------------------------------------------------------------------
    def layers(self) -> list[_Op]:
        return [op for op in self.ops if op.kind in ("linear", "conv")]

    def operation_counts(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """Per fixed layer and in total, for one input of ``input_shape`` (no batch dim):
        multiply-accumulates of the dense float layer, how many of them a shift-add device
        skips (zero weight), does with one shift per term plus adds, and multiplications left
        (0 for the fixed layers). The total also counts what other layers still multiply or
        divide: a BatchNorm's per-channel scale (one product per value) and an average pool
        whose window is not a power of two (one division per output)."""
        outputs = self._output_sizes(input_shape)
        per: dict[str, dict[str, int]] = {}
        for op in self.layers():
            assert op.terms is not None
            p = outputs[op.node] // op.terms.w_int.shape[0]
            n_w = op.terms.n_weights
            terms = op.terms.n_terms
            shifts = int((op.terms.shift != 0).sum())
            per[op.extra["qual"]] = {
                "weights": n_w,
                "positions": p,
                "macs": n_w * p,
                "zero_weight_macs_skipped": op.terms.n_zero * p,
                "terms": terms * p,
                "shifts": shifts * p,
                # every term is added into the accumulator (the first into a zero one is free on
                # hardware too, but counted: a conservative upper bound)
                "adds": terms * p,
                "multiplications_left": 0,
            }
        total = {k: sum(v[k] for v in per.values()) for k in
                 ("weights", "macs", "zero_weight_macs_skipped", "terms", "shifts", "adds", "multiplications_left")}
        scale_mults = sum(outputs[op.node] for op in self.ops if op.kind == "batchnorm")
        divisions = sum(outputs[op.node] for op in self.ops if op.kind == "avgpool" and op.extra["divide"])
        total["scale_multiplications"] = scale_mults
        total["divisions"] = divisions
        total["multiplications_left"] += scale_mults + divisions
        return {"per_layer": per, "total": total, "b": self.b,
                "fixed_point": {"frac_bits": self.fp.frac_bits, "width": self.fp.width}}

    def _output_sizes(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """Values each layer outputs per input."""
        x = torch.zeros((1, *input_shape), dtype=torch.int64)
        env: dict[str, Tensor] = {self.input_name: x}  # type: ignore[dict-item]
        out: dict[str, int] = {}
        for op in self.ops:
            y = _RUN[op.kind](self, op, [env[a] for a in op.args], "multiply")
            env[op.node] = y
            out[op.node] = int(y[0].numel())
        return out

    def error_bound(self) -> float:
        """Bound on max |reference - float model| at the output (infinity norm).

        Input quantisation and every layer's truncation add at most one ulp (2^-F); a layer
        multiplies the incoming error by at most its largest absolute row sum (a BatchNorm by its
        largest scale, plus the rounding of its scale and shift over the activation range), ReLU,
        pooling, reshapes do not increase it, a residual sum adds the two branch errors.
        """
        ulp = self.fp.ulp
        span = 2.0 ** (self.fp.int_bits - 1)
        err: dict[str, float] = {self.input_name: ulp}  # type: ignore[dict-item]
        for op in self.ops:
            ins = [err[a] for a in op.args]
            if op.kind in ("linear", "conv"):
                assert op.terms is not None
                row = float(op.terms.w_int.abs().sum(1).max()) * 2.0**-self.b if op.terms.w_int.numel() else 0.0
                err[op.node] = row * ins[0] + ulp
            elif op.kind == "batchnorm":
                S = op.extra["S"]
                smax = float(op.extra["s_int"].abs().max()) * 2.0**-S if op.extra["s_int"].numel() else 0.0
                err[op.node] = smax * ins[0] + 2.0 ** -(S + 1) * (span + 1.0) + ulp
            elif op.kind == "add":
                err[op.node] = ins[0] + ins[1]
            elif op.kind == "avgpool":
                err[op.node] = ins[0] + ulp
            else:
                err[op.node] = ins[0]
        return err[self.output_name]  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# one entry per layer kind


def _ok(lay: Any) -> str | None:
    return None


def _check_avgpool(lay: Any) -> str | None:
    if lay.extra.get("ceil_mode"):
        return "ceil_mode=True"
    if "kernel" not in lay.extra:
        return "adaptive pooling needs the input shape (pass an example)"
    if any(lay.extra["padding"]) and not lay.extra.get("count_include_pad", True):
        return "padding with count_include_pad=False"
    return None


def _check_reshape(lay: Any) -> str | None:
    if lay.extra.get("op") == "flatten":
        return None
    shape, src = lay.extra.get("shape"), lay.extra.get("in_shape")
    if shape is None:
        return "a reshape needs the example input's shape"
    if src is not None and shape[0] != src[0]:
        return f"it mixes the batch dimension ({tuple(src)} -> {tuple(shape)})"
    return None


_CHECK: dict[str, Callable[[Any], str | None]] = {"avgpool": _check_avgpool, "reshape": _check_reshape}


def _prepare_linear(net: ShiftAddNet, op: _Op) -> None:
    m = op.module
    op.terms = _terms_checked(m.weight, net.b, net.signed_terms, op.extra["qual"])
    op.bias = _bias_int(m.bias, m.out_features, net.b, net.fp)


def _prepare_conv(net: ShiftAddNet, op: _Op) -> None:
    m = op.module
    op.terms = _terms_checked(m.weight.reshape(m.out_channels, -1), net.b, net.signed_terms, op.extra["qual"])
    op.bias = _bias_int(m.bias, m.out_channels, net.b, net.fp)


def _prepare_batchnorm(net: ShiftAddNet, op: _Op) -> None:
    s_int, c_int, S = bn_fixed(op.extra["scale"], op.extra["shift"])
    op.extra.update(s_int=s_int, c_int=c_int, S=S)


def _prepare_avgpool(net: ShiftAddNet, op: _Op) -> None:
    area = math.prod(op.extra["kernel"])
    op.extra["area"] = area
    op.extra["divide"] = bool(area & (area - 1))  # a power-of-two window is a shift


_PREPARE: dict[str, Callable[[ShiftAddNet, _Op], None]] = {
    "linear": _prepare_linear, "conv": _prepare_conv, "batchnorm": _prepare_batchnorm, "avgpool": _prepare_avgpool,
}


def _run_add(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    out = xs[0] + xs[1]
    net.fp.check(out, f"the sum {op.node!r}")
    return out


def _run_linear(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    x = xs[0]
    lead = x.shape[:-1]
    out = net._affine(op, x.reshape(-1, x.shape[-1]), mode)
    return out.reshape(*lead, out.shape[-1])


def _run_batchnorm(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    """``floor((x s + c) / 2^S)`` per channel (axis 1), exact in int64: the fixed-point product and sum
    an ``ap_fixed`` BatchNorm computes, truncated once at the output."""
    x = xs[0]
    view = (1, -1) + (1,) * (x.dim() - 2)
    s, c, S = op.extra["s_int"].view(view), op.extra["c_int"].view(view), op.extra["S"]
    out = torch.bitwise_right_shift(x * s + torch.bitwise_left_shift(c, net.fp.frac_bits), S)
    net.fp.check(out, f"the output of {op.extra['qual']}")
    return out


def _pool_input(x: Tensor, dims: int) -> Tensor:
    return x.to(torch.float64) if dims == 2 else x.to(torch.float64).unsqueeze(2)


def _run_maxpool(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    e = op.extra
    # max is exact; float64 holds every int below 2^53 (width <= 62 is checked per layer); padding is -inf
    x = _pool_input(xs[0], e["dims"])
    k, st, pad = (e["kernel"], e["stride"], e["padding"]) if e["dims"] == 2 else (
        (1, *e["kernel"]), (1, *e["stride"]), (0, *e["padding"]))
    y = F.max_pool2d(x, k, st, pad, 1, e["ceil_mode"])
    return (y if e["dims"] == 2 else y.squeeze(2)).to(torch.int64)


def _run_avgpool(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    """The window's exact sum (zero padding counted, as torch's default), divided by its size and
    truncated towards zero: what ``ap_fixed``'s ``sum /= n`` computes (an arithmetic shift for a
    power-of-two window would round negative values down instead)."""
    e = op.extra
    x = _pool_input(xs[0], e["dims"])
    k, st, pad = (e["kernel"], e["stride"], e["padding"]) if e["dims"] == 2 else (
        (1, *e["kernel"]), (1, *e["stride"]), (0, *e["padding"]))
    summed = F.avg_pool2d(x, k, st, pad, False, True, divisor_override=1)
    summed = (summed if e["dims"] == 2 else summed.squeeze(2)).round().to(torch.int64)
    return torch.div(summed, e["area"], rounding_mode="trunc")


def _run_reshape(net: ShiftAddNet, op: _Op, xs: list[Tensor], mode: str) -> Tensor:
    x = xs[0]
    if op.extra.get("op") == "flatten":
        return torch.flatten(x, op.extra["start"], op.extra["end"])
    return x.reshape(x.shape[0], *op.extra["shape"][1:])


_RUN: dict[str, Callable[[ShiftAddNet, _Op, list[Tensor], str], Tensor]] = {
    "identity": lambda net, op, xs, mode: xs[0],
    "relu": lambda net, op, xs, mode: xs[0].clamp_min(0),
    "add": _run_add,
    "linear": _run_linear,
    "conv": lambda net, op, xs, mode: net._conv(op, xs[0], mode),
    "batchnorm": _run_batchnorm,
    "maxpool": _run_maxpool,
    "avgpool": _run_avgpool,
    "reshape": _run_reshape,
}


def _terms_checked(weight: Tensor, b: int, signed_terms: bool, qual: str) -> _Terms:
    try:
        return _terms(weight.reshape(weight.shape[0], -1), b, signed_terms)
    except ShiftAddError as exc:
        raise ShiftAddError(f"layer {qual!r}: {exc}") from exc


def calibrate(model: nn.Module, x: Tensor, frac_bits: int = 12, headroom_bits: int = 1,
              max_width: int = 40) -> FixedPoint:
    """The narrowest ``FixedPoint`` with ``frac_bits`` whose integer part holds every activation
    (Linear/Conv/ReLU outputs and the input) of ``model`` on ``x``, plus ``headroom_bits``."""
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    hooks = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal peak
        if isinstance(out, Tensor) and out.numel():
            peak = max(peak, float(out.detach().abs().max()))

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    int_bits = max(1, math.ceil(math.log2(peak + 1.0))) + 1 + headroom_bits  # + sign
    width = int_bits + frac_bits
    if width > max_width:
        raise ShiftAddError(f"activations up to {peak:.4g} need {width} bits with {frac_bits} fractional "
                            f"bits (> {max_width})")
    return FixedPoint(frac_bits=frac_bits, width=width)

