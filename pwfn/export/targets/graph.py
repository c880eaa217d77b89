"""A small, explicit layer graph of a fixed network, shared by the export targets.

``trace(model)`` runs ``torch.fx`` and keeps only the operations every target understands:
Linear, Conv1d/Conv2d (groups 1, dilation 1, numeric zero padding), ReLU (module, function
or method), Max/AvgPool1d/2d, Flatten (module or ``torch.flatten``), Dropout/Identity (no-ops
at inference) and the sum of two activations. Anything else raises ``GraphError`` naming the
node, so a target never silently drops a layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import PwfnError

__all__ = ["GraphError", "Layer", "LayerGraph", "trace"]


class GraphError(PwfnError, ValueError):
    """The model holds an operation the export targets do not support."""


@dataclass
class Layer:
    """One operation: ``kind`` in linear, conv, relu, maxpool, avgpool, flatten, identity, add."""

    kind: str
    name: str  # fx node name (unique)
    args: list[str]  # names of the input activations
    module: nn.Module | None = None
    qual: str = ""  # qualified module name ("features.0"), "" for functions
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerGraph:
    input: str
    output: str
    layers: list[Layer]

    def fixed(self) -> list[Layer]:
        """The layers with weights (Linear and Conv)."""
        return [lay for lay in self.layers if lay.kind in ("linear", "conv")]

    def consumers(self, name: str) -> list[Layer]:
        return [lay for lay in self.layers if name in lay.args]


_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)


def _module_layer(name: str, m: nn.Module, args: list[str], qual: str) -> Layer:
    if isinstance(m, nn.Linear):
        return Layer("linear", name, args, m, qual)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1 or any(d != 1 for d in m.dilation) or m.padding_mode != "zeros" \
                or isinstance(m.padding, str):
            raise GraphError(f"{qual}: only groups=1, dilation=1, numeric zero padding convolutions are supported")
        return Layer("conv", name, args, m, qual, {"dims": 1 if isinstance(m, nn.Conv1d) else 2})
    if isinstance(m, nn.ReLU):
        return Layer("relu", name, args, m, qual)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        dims = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims

        kind = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
        extra = {"dims": dims, "kernel": tup(m.kernel_size), "stride": tup(m.stride or m.kernel_size),
                 "padding": tup(m.padding), "ceil_mode": bool(m.ceil_mode)}
        if kind == "maxpool" and any(d != 1 for d in tup(m.dilation)):
            raise GraphError(f"{qual}: dilated max-pooling is not supported")
        return Layer(kind, name, args, m, qual, extra)
    if isinstance(m, nn.Flatten):
        return Layer("flatten", name, args, m, qual, {"start": m.start_dim, "end": m.end_dim})
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return Layer("identity", name, args, m, qual)
    raise GraphError(f"layer {qual!r} ({type(m).__name__}) is not supported by the export targets")


def trace(model: nn.Module) -> LayerGraph:
    """The model's layers in execution order (see the module docstring)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on untraceable control flow
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    modules = dict(gm.named_modules())
    layers: list[Layer] = []
    inp: str | None = None
    out: str | None = None
    for node in gm.graph.nodes:
        args = [a.name for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            if inp is not None:
                raise GraphError("only single-input models are supported")
            inp = node.name
        elif node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise GraphError("only single-output models are supported")
            out = res.name
        elif node.op == "call_module":
            layers.append(_module_layer(node.name, modules[node.target], args, str(node.target)))
        elif (node.op == "call_function" and node.target in _RELU_FUNCS) or (
                node.op == "call_method" and node.target in ("relu", "relu_")):
            layers.append(Layer("relu", node.name, args[:1]))
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(args) == 2 \
                and len(node.args) == 2 and not node.kwargs:
            layers.append(Layer("add", node.name, args))
        elif node.op == "call_function" and node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            layers.append(Layer("flatten", node.name, args[:1], extra={"start": start, "end": end}))
        else:
            what = node.target if node.op != "call_module" else type(modules[node.target]).__name__
            raise GraphError(f"{node.op} {what!r} (node {node.name!r}) is not supported by the export targets")
    if inp is None or out is None:
        raise GraphError("the traced model has no input or no output")
    return LayerGraph(inp, out, layers)
