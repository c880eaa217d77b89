"""A small, explicit layer graph of a fixed network, shared by the export targets.

``trace(model, example)`` runs ``torch.fx`` and turns every node into a :class:`Layer` of one
*kind* through a table of handlers, one per layer type (as hls4ml's converter registers its
handlers): :data:`MODULE_HANDLERS` for ``nn.Module`` types, :data:`FUNCTION_HANDLERS` for
functions (``torch.relu``, ``torch.flatten``, ``operator.add`` ...) and :data:`METHOD_HANDLERS`
for tensor methods (``x.view``, ``x.unsqueeze`` ...). Register more with :func:`register_module`
/ :func:`register_function` / :func:`register_method`.

Kinds: ``linear``, ``conv`` (1-D and 2-D, groups 1, dilation 1, numeric zero padding),
``batchnorm`` (1-D and 2-D, in eval mode: its own per-channel ``scale`` and ``shift``, never
folded into the weights), ``relu``, ``activation`` (``fn``: sigmoid, tanh, relu6, leaky_relu,
hardswish, elu, softmax), ``maxpool``/``avgpool`` (1-D and 2-D, any window, stride and padding;
adaptive average pooling whose output divides its input), ``reshape`` (flatten, view/reshape,
unsqueeze, squeeze: the output shape comes from the example), ``identity`` (dropout, identity)
and ``add`` (a residual sum). Each target has its own table of the kinds it emits and refuses
the others by name (:func:`refuse_unsupported`), before any toolchain runs.

Shapes: with an ``example`` batch, every layer records its output shape (``extra["shape"]``,
batch included) from :class:`torch.fx.passes.shape_prop.ShapeProp`; shape-only nodes
(``x.size(0)``, ``x.shape``) feed reshapes and are not layers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import PwfnError

__all__ = ["FUNCTION_HANDLERS", "METHOD_HANDLERS", "MODULE_HANDLERS", "GraphError", "Layer", "LayerGraph",
           "describe_kinds", "refuse_unsupported", "register_function", "register_method", "register_module",
           "trace"]


class GraphError(PwfnError, ValueError):
    """The model holds an operation an export target does not support."""


@dataclass
class Layer:
    """One operation of kind ``kind`` (see the module docstring)."""

    kind: str
    name: str  # fx node name (unique)
    args: list[str]  # names of the input activations
    module: nn.Module | None = None
    qual: str = ""  # qualified module name ("features.0"), "" for functions
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How messages name the layer: ``'features.1' (BatchNorm1d)`` or ``'view_1' (view)``."""
        what = type(self.module).__name__ if self.module is not None else str(self.extra.get("op", self.kind))
        return f"{(self.qual or self.name)!r} ({what})"


@dataclass
class LayerGraph:
    input: str
    output: str
    layers: list[Layer]

    def fixed(self) -> list[Layer]:
        """The layers with weights on the codebook (Linear and Conv)."""
        return [lay for lay in self.layers if lay.kind in ("linear", "conv")]

    def consumers(self, name: str) -> list[Layer]:
        return [lay for lay in self.layers if name in lay.args]


class _Unsupported(GraphError):
    """A node no handler takes (``what`` names it for the target's message)."""

    def __init__(self, what: str, why: str = "") -> None:
        self.what, self.why = what, why
        super().__init__(f"{what}{': ' + why if why else ''}")


# --------------------------------------------------------------------------------------------
# handler tables

ModuleHandler = Callable[[str, nn.Module, list[str], str], Layer]
NodeHandler = Callable[[fx.Node, list[str]], Layer]

MODULE_HANDLERS: dict[type, ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Any, NodeHandler] = {}
METHOD_HANDLERS: dict[str, NodeHandler] = {}


def register_module(*types: type) -> Callable[[ModuleHandler], ModuleHandler]:
    """Decorator: ``fn(node_name, module, input_names, qualified_name) -> Layer`` handles these module types."""
    def wrap(fn: ModuleHandler) -> ModuleHandler:
        for t in types:
            MODULE_HANDLERS[t] = fn
        return fn
    return wrap


def register_function(*fns: Any) -> Callable[[NodeHandler], NodeHandler]:
    """Decorator: ``fn(node, input_names) -> Layer`` handles calls of these functions."""
    def wrap(fn: NodeHandler) -> NodeHandler:
        for f in fns:
            FUNCTION_HANDLERS[f] = fn
        return fn
    return wrap


def register_method(*names: str) -> Callable[[NodeHandler], NodeHandler]:
    """Decorator: ``fn(node, input_names) -> Layer`` handles these tensor methods."""
    def wrap(fn: NodeHandler) -> NodeHandler:
        for n in names:
            METHOD_HANDLERS[n] = fn
        return fn
    return wrap


def _tup(v: Any, dims: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * dims


@register_module(nn.Linear)
def _linear(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    return Layer("linear", name, args, m, qual)


@register_module(nn.Conv1d, nn.Conv2d)
def _conv(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    what = type(m).__name__
    if m.groups != 1:
        raise _Unsupported(f"{qual!r} ({what})", f"groups={m.groups} (grouped/depthwise convolution); groups=1 works")
    if any(d != 1 for d in m.dilation):
        raise _Unsupported(f"{qual!r} ({what})", f"dilation={m.dilation}; dilation=1 works")
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise _Unsupported(f"{qual!r} ({what})", f"padding={m.padding!r}, padding_mode={m.padding_mode!r}; "
                           "numeric zero padding works")
    return Layer("conv", name, args, m, qual, {"dims": 1 if isinstance(m, nn.Conv1d) else 2})


@register_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    if m.running_mean is None or m.running_var is None:
        raise _Unsupported(f"{qual!r} ({type(m).__name__})", "no running statistics (track_running_stats=False)")
    var = m.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.detach().double()
    shift = -m.running_mean.detach().double() * scale
    if m.bias is not None:
        shift = shift + m.bias.detach().double()
    return Layer("batchnorm", name, args, m, qual,
                 {"dims": 1 if isinstance(m, nn.BatchNorm1d) else 2, "scale": scale, "shift": shift})


@register_module(nn.ReLU)
def _relu_module(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    return Layer("relu", name, args, m, qual)


_ACTIVATIONS: dict[type, Callable[[nn.Module], dict[str, Any]]] = {
    nn.Sigmoid: lambda m: {"fn": "sigmoid"},
    nn.Tanh: lambda m: {"fn": "tanh"},
    nn.ReLU6: lambda m: {"fn": "relu6"},
    nn.LeakyReLU: lambda m: {"fn": "leaky_relu", "alpha": float(m.negative_slope)},
    nn.Hardswish: lambda m: {"fn": "hardswish"},
    nn.ELU: lambda m: {"fn": "elu", "alpha": float(m.alpha)},
    nn.Softmax: lambda m: {"fn": "softmax", "dim": m.dim},
}


@register_module(*_ACTIVATIONS)
def _activation(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    extra = _ACTIVATIONS[type(m)](m)
    if extra["fn"] == "elu" and extra["alpha"] != 1.0:
        raise _Unsupported(f"{qual!r} (ELU)", "alpha != 1")
    return Layer("activation", name, args, m, qual, extra)


@register_module(nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
def _pool(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    dims = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
    kind = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
    extra = {"dims": dims, "kernel": _tup(m.kernel_size, dims), "stride": _tup(m.stride or m.kernel_size, dims),
             "padding": _tup(m.padding, dims), "ceil_mode": bool(m.ceil_mode)}
    if kind == "maxpool" and any(d != 1 for d in _tup(m.dilation, dims)):
        raise _Unsupported(f"{qual!r} ({type(m).__name__})", "dilated max-pooling")
    if kind == "avgpool":
        extra["count_include_pad"] = bool(m.count_include_pad)
        if getattr(m, "divisor_override", None):
            raise _Unsupported(f"{qual!r} ({type(m).__name__})", "divisor_override")
    return Layer(kind, name, args, m, qual, extra)


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    dims = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
    # the window is known once the input shape is (see _resolve_adaptive)
    return Layer("avgpool", name, args, m, qual, {"dims": dims, "adaptive": _tup(m.output_size, dims),
                                                  "padding": (0,) * dims, "ceil_mode": False,
                                                  "count_include_pad": True})


@register_module(nn.Flatten)
def _flatten_module(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    return Layer("reshape", name, args, m, qual, {"op": "flatten", "start": m.start_dim, "end": m.end_dim})


@register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
def _identity_module(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    return Layer("identity", name, args, m, qual)


@register_function(F.relu, torch.relu, torch.relu_)
def _relu_fn(node: fx.Node, args: list[str]) -> Layer:
    return Layer("relu", node.name, args[:1], extra={"op": "relu"})


@register_method("relu", "relu_")
def _relu_method(node: fx.Node, args: list[str]) -> Layer:
    return Layer("relu", node.name, args[:1], extra={"op": "relu"})


@register_function(torch.sigmoid, F.sigmoid, torch.tanh, F.tanh)
def _act_fn(node: fx.Node, args: list[str]) -> Layer:
    fn = "sigmoid" if "sigmoid" in getattr(node.target, "__name__", "") else "tanh"
    return Layer("activation", node.name, args[:1], extra={"fn": fn, "op": fn})


@register_function(operator.add, torch.add, operator.iadd)
def _add(node: fx.Node, args: list[str]) -> Layer:
    if len(args) != 2 or len(node.args) != 2 or node.kwargs:
        raise _Unsupported(f"{node.name!r} (add)", "only the sum of two activations is supported")
    return Layer("add", node.name, args, extra={"op": "add"})


@register_function(torch.flatten)
def _flatten_fn(node: fx.Node, args: list[str]) -> Layer:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return Layer("reshape", node.name, args[:1], extra={"op": "flatten", "start": start, "end": end})


@register_method("flatten")
def _flatten_method(node: fx.Node, args: list[str]) -> Layer:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return Layer("reshape", node.name, args[:1], extra={"op": "flatten", "start": start, "end": end})


@register_method("view", "reshape", "unsqueeze", "squeeze")
@register_function(torch.reshape, torch.unsqueeze, torch.squeeze)
def _reshape(node: fx.Node, args: list[str]) -> Layer:
    op = node.target if isinstance(node.target, str) else node.target.__name__
    return Layer("reshape", node.name, args[:1], extra={"op": op})


@register_function(F.dropout)
def _dropout_fn(node: fx.Node, args: list[str]) -> Layer:
    return Layer("identity", node.name, args[:1], extra={"op": "dropout"})


# shape-only nodes: their values are sizes that feed reshapes, not activations
_SHAPE_METHODS = ("size", "dim")


def _is_shape_node(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_shape_node(node.args[0])
    return False


# --------------------------------------------------------------------------------------------
# tracing


def _what(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{str(node.target)!r} ({type(modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({node.op.replace('call_', '')} {target})"


def trace(model: nn.Module, example: Tensor | None = None,
          unsupported: list[tuple[str, str]] | None = None) -> LayerGraph:
    """The model's layers in execution order (see the module docstring); ``GraphError`` names the first
    node no handler takes, or with ``unsupported`` (a list) every such node is appended to it as
    ``(what, why)`` and left out. With ``example`` (a batch), every layer records its output shape."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on untraceable control flow
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); the "
                         "onnx target exports any model torch.onnx can") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    if example is not None:
        shapes = _shapes(gm, example)
    modules = dict(gm.named_modules())
    layers: list[Layer] = []
    inp: str | None = None
    out: str | None = None
    for node in gm.graph.nodes:
        args = [a.name for a in node.all_input_nodes if not _is_shape_node(a)]
        if node.op == "placeholder":
            if inp is not None:
                raise _Unsupported(f"input {node.name!r}", "only single-input models are supported")
            inp = node.name
            continue
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise _Unsupported("the output", "only single-output models (one tensor) are supported")
            out = res.name
            continue
        if _is_shape_node(node):
            continue
        try:
            if node.op == "call_module":
                m = modules[node.target]
                handler = _module_handler(type(m))
                if handler is None:
                    raise _Unsupported(_what(node, modules))
                lay = handler(node.name, m, args, str(node.target))
            elif node.op == "call_function" and node.target in FUNCTION_HANDLERS:
                lay = FUNCTION_HANDLERS[node.target](node, args)
            elif node.op == "call_method" and node.target in METHOD_HANDLERS:
                lay = METHOD_HANDLERS[node.target](node, args)
            else:
                raise _Unsupported(_what(node, modules))
        except _Unsupported as exc:
            if unsupported is None:
                raise
            unsupported.append((exc.what, exc.why))
            continue
        if node.name in shapes:
            lay.extra["shape"] = shapes[node.name]
        if lay.kind == "reshape" and lay.extra.get("op") != "flatten" and "shape" not in lay.extra:
            raise _Unsupported(lay.label, "a reshape needs the example input's shape (internal error)")
        layers.append(lay)
    if inp is None or out is None:
        raise GraphError("the traced model has no input or no output")
    g = LayerGraph(inp, out, layers)
    if shapes:
        for lay in layers:
            lay.extra["in_shape"] = shapes.get(lay.args[0]) if lay.args else None
        _resolve_adaptive(g)
    return g


def _module_handler(cls: type) -> ModuleHandler | None:
    """The handler of ``cls``, or of a parent class whose forward it does not override."""
    if cls in MODULE_HANDLERS:
        return MODULE_HANDLERS[cls]
    for parent in cls.__mro__[1:]:
        if parent in MODULE_HANDLERS and getattr(cls, "forward", None) is getattr(parent, "forward", None):
            return MODULE_HANDLERS[parent]
    return None


def _shapes(gm: fx.GraphModule, example: Tensor) -> dict[str, tuple[int, ...]]:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = copy.deepcopy(gm).eval()
    try:  # ShapeProp prints a traceback of its own on failure: the message below says it once
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # the model's own errors on the example (fx wraps them)
        root = exc.__cause__ or exc
        text = str(root).strip().splitlines()[0][:300] if str(root).strip() else ""
        raise GraphError(f"the model cannot run on the example input (shape {tuple(example.shape)}, "
                         f"{str(example.dtype).replace('torch.', '')}): {type(root).__name__}: {text}") from exc
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node.name] = tuple(int(d) for d in meta.shape)
    return out


def _resolve_adaptive(g: LayerGraph) -> None:
    """Adaptive average pooling becomes plain pooling once the input size is known (output divides input)."""
    for lay in g.layers:
        if lay.kind == "avgpool" and "adaptive" in lay.extra:
            shape = lay.extra.get("in_shape")
            if shape is None:
                continue
            size = shape[-lay.extra["dims"]:]
            outs = tuple(o if o is not None else s for o, s in zip(lay.extra["adaptive"], size))
            if any(s % o for s, o in zip(size, outs)):
                raise _Unsupported(lay.label, f"output size {outs} does not divide the input size {tuple(size)}")
            lay.extra["kernel"] = tuple(s // o for s, o in zip(size, outs))
            lay.extra["stride"] = lay.extra["kernel"]


# --------------------------------------------------------------------------------------------
# per-target refusals


def describe_kinds(kinds: Iterable[str]) -> str:
    words = {"linear": "Linear", "conv": "Conv1d/Conv2d", "batchnorm": "BatchNorm1d/2d", "relu": "ReLU",
             "activation": "Sigmoid/Tanh/ReLU6/LeakyReLU/Hardswish/ELU/Softmax", "maxpool": "max pooling",
             "avgpool": "average pooling", "reshape": "flatten/view/reshape/unsqueeze/squeeze",
             "identity": "Dropout/Identity", "add": "residual sums"}
    return ", ".join(words.get(k, k) for k in kinds)


def refuse_unsupported(model: nn.Module, target: str, kinds: Mapping[str, Callable[[Layer], str | None]],
                       example: Tensor | None = None, alternative: str = "the onnx target (--to onnx) takes every "
                       "layer torch.onnx exports") -> LayerGraph:
    """Trace ``model`` and refuse (``GraphError``) the first layer ``target`` cannot take, naming it, why,
    what the target takes and what would work. ``kinds`` maps each supported kind to a check that
    returns why a layer of that kind is refused (or None)."""
    bad: list[tuple[str, str]] = []
    g = trace(model, example, bad)
    for lay in g.layers:
        check = kinds.get(lay.kind)
        why = "" if check is None else check(lay)
        if check is None or why:
            bad.append((lay.label, why or ""))
    if bad:
        listed = "; ".join(f"{what}{': ' + why if why else ''}" for what, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        word = "layer" if len(bad) == 1 else "layers"
        raise GraphError(f"{target} cannot take {word} {listed}{more}. {target} takes {describe_kinds(kinds)}; "
                         f"{alternative}")
    return g


def padding_pairs(padding: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(int(p), int(p)) for p in padding]


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """torch's pooling output size along one axis."""
    num = size + 2 * pad - kernel
    out = (math.ceil(num / stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out
