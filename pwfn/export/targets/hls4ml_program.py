"""The torch program hls4ml converts: a fixed network with each layer in the form hls4ml computes exactly.

:func:`split_model` traces the network (:mod:`pwfn.export.targets.graph`), refuses what the
hls4ml target cannot take (:data:`HLS_KINDS`, :func:`check_model`) and builds the program, one
entry per layer kind in :data:`STEPS`: a fixed layer whose weights have up to ``T`` power-of-two
terms becomes ``T`` parallel layers of one signed power of two each (:func:`fill_terms`), or
stays one layer on the plain ``ap_fixed`` path; a BatchNorm becomes a BatchNorm whose scale and
shift are exactly the fixed-point values the reference rounds them to; pools, ReLU and reshapes
are copied. :mod:`pwfn.export.targets.hls4ml` converts, configures and C-simulates it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import PwfnError
from .graph import GraphError, refuse_unsupported
from .shiftadd import bn_fixed, layer_terms

__all__ = ["HLS_KINDS", "STEPS", "Hls4mlError", "check_model", "fill_terms", "split_model"]


class Hls4mlError(PwfnError, ValueError):
    """The hls4ml export or its check failed."""


def fill_terms(signs: np.ndarray, exps: np.ndarray, orders: np.ndarray, T: int, b: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every weight as exactly ``T`` non-zero signed power-of-two terms (see the module docstring).

    ``signs``/``exps`` (..., width) from ``pwfn.core.centres.decompose``; returns (signs, exps) of
    shape (..., T) with no zero sign.
    """
    shape = orders.shape
    s = np.zeros((*shape, T), dtype=np.int64)
    e = np.zeros((*shape, T), dtype=np.int64)
    w = min(signs.shape[-1], T)
    s[..., :w] = signs[..., :w]
    e[..., :w] = exps[..., :w]
    count = orders.astype(np.int64).copy()
    if T < int(count.max(initial=0)):
        raise Hls4mlError(f"weights need {int(count.max())} terms, more than T = {T}")
    # zeros: +2^-b -2^-b (pairs), with a three-term +2^-b -2^-(b+1) -2^-(b+1) when T is odd
    zero = count == 0
    if zero.any():
        if T < 2:
            raise Hls4mlError("a zero weight needs T >= 2 parallel terms")
        s[zero, 0], e[zero, 0] = 1, -b
        s[zero, 1], e[zero, 1] = -1, -b
        k = 2
        if T % 2:
            s[zero, 1], e[zero, 1] = -1, -b - 1
            s[zero, 2], e[zero, 2] = -1, -b - 1
            k = 3
        while k < T:
            s[zero, k], e[zero, k] = 1, -b
            s[zero, k + 1], e[zero, k + 1] = -1, -b
            k += 2
        count[zero] = T
    # the others: split the largest term in halves until there are T
    while True:
        short = count < T
        if not short.any():
            break
        idx = np.nonzero(short)
        ee = np.where(s[idx] != 0, e[idx], np.iinfo(np.int64).min)
        j = ee.argmax(axis=-1)
        rows = tuple(idx) + (j,)
        e[rows] -= 1
        new = tuple(idx) + (count[idx],)
        s[new] = s[rows]
        e[new] = e[rows]
        count[idx] += 1
    return s, e


class _Program(nn.Module):
    """A fixed network rebuilt with each exponent layer split into parallel term layers."""

    def __init__(self) -> None:
        super().__init__()
        # (kind, out, ins, modules or a view's shape)
        self.steps: list[tuple[str, str, list[str], list[Any]]] = []
        self.add_roles: list[str] = []
        self.input_name = "x"
        self.output_name = "x"

    def forward(self, x: Tensor) -> Tensor:
        env = {self.input_name: x}
        for kind, out, ins, mods in self.steps:
            if kind == "split":
                acc = getattr(self, mods[0])(env[ins[0]])
                for m in mods[1:]:
                    acc = acc + getattr(self, m)(env[ins[0]])
                env[out] = acc
            elif kind == "add":
                env[out] = env[ins[0]] + env[ins[1]]
            elif kind == "module":
                env[out] = getattr(self, mods[0])(env[ins[0]])
            elif kind == "view":
                env[out] = env[ins[0]].view(-1, *mods)
            else:  # identity
                env[out] = env[ins[0]]
        return env[self.output_name]


def _hls_avgpool(lay: Any) -> str | None:
    if any(lay.extra["padding"]) or lay.extra.get("ceil_mode"):
        return "padded or ceil-mode average pooling (hls4ml leaves padding out of the average); padding=0 works"
    return None


def _hls_maxpool(lay: Any) -> str | None:
    return "ceil_mode=True" if lay.extra.get("ceil_mode") else None


def _hls_reshape(lay: Any) -> str | None:
    shape, src = lay.extra.get("shape"), lay.extra.get("in_shape")
    if lay.extra.get("op") != "flatten" and (shape is None or (src is not None and shape[0] != src[0])):
        return "a reshape that needs the example's shape or mixes the batch dimension"
    return None


#: what the hls4ml target takes: kind -> why a layer of that kind is refused (None: taken)
HLS_KINDS: dict[str, Callable[[Any], str | None]] = {
    "linear": lambda lay: None, "conv": lambda lay: None, "batchnorm": lambda lay: None,
    "relu": lambda lay: None, "maxpool": _hls_maxpool, "avgpool": _hls_avgpool, "reshape": _hls_reshape,
    "identity": lambda lay: None, "add": lambda lay: None,
}


def _plan_fixed(prog: _Program, lay: Any, i: int, plan: dict[str, dict[str, Any]], b: int, signed_terms: bool,
                mode: str, max_terms: int) -> None:
    m = lay.module
    signs, exps, orders = (t.numpy() for t in layer_terms(m.weight, b, signed_terms))
    T = max(1, int(orders.max(initial=0)))
    if T == 1 and (orders == 0).any():
        T = 2
    path = "fixed" if mode == "fixed" or (mode == "auto" and T > max_terms) else "exponent"
    if path == "fixed":
        name = f"q{i}"
        prog.add_module(name, copy.deepcopy(m))
        prog.steps.append(("module", lay.name, lay.args, [name]))
        plan[lay.qual] = {"path": "fixed", "terms": 0, "modules": [name], "node": lay.name, "min_exponent": -b}
        return
    s, e = fill_terms(signs, exps, orders, T, b)
    names = []
    for t in range(T):
        name = f"q{i}t{t}"
        mod = copy.deepcopy(m)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(s[..., t] * np.exp2(e[..., t].astype(np.float64))).to(mod.weight.dtype))
        if t:
            mod.bias = None
        prog.add_module(name, mod)
        names.append(name)
    prog.steps.append(("split", lay.name, lay.args, names))
    prog.add_roles += ["inter"] * (T - 2) + ["final"] if T > 1 else []
    plan[lay.qual] = {"path": "exponent", "terms": T, "modules": names, "node": lay.name,
                      "min_exponent": int(e.min())}


def _plan_batchnorm(prog: _Program, lay: Any, i: int, plan: dict[str, dict[str, Any]]) -> None:
    """Its own scale-and-shift layer: a BatchNorm whose statistics make hls4ml's scale and bias exactly
    the fixed-point values the reference uses (mean 0, variance 1, eps 0)."""
    s_int, c_int, S = bn_fixed(lay.extra["scale"], lay.extra["shift"])
    bn = (nn.BatchNorm1d if lay.extra["dims"] == 1 else nn.BatchNorm2d)(len(s_int), eps=0.0)
    with torch.no_grad():
        bn.weight.copy_(s_int.double() * 2.0**-S)
        bn.bias.copy_(c_int.double() * 2.0**-S)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    name = f"n{i}"
    prog.add_module(name, bn.eval())
    prog.steps.append(("module", lay.name, lay.args, [name]))
    plan[f"bn:{lay.qual}"] = {"path": "batchnorm", "modules": [name], "frac_bits": S,
                              "scale_max": float(s_int.abs().max()) * 2.0**-S if len(s_int) else 0.0,
                              "shift_max": float(c_int.abs().max()) * 2.0**-S if len(c_int) else 0.0}


def check_model(model: nn.Module, example: Tensor | None = None) -> Any:
    """Refuse (``Hls4mlError``) the first layer this target cannot take, naming it and what would work."""
    try:
        return refuse_unsupported(copy.deepcopy(model).eval(), "hls4ml", HLS_KINDS, example,
                                  alternative="the onnx and tflm targets take it in float")
    except GraphError as exc:
        raise Hls4mlError(str(exc)) from exc


@dataclass
class _Plan:
    """What split_model builds: the program, the plan, tensor ranks, and the settings of fixed layers."""

    prog: _Program
    plan: dict[str, dict[str, Any]]
    rank: dict[str, int]
    b: int
    signed_terms: bool
    mode: str
    max_terms: int


def _step_fixed(p: _Plan, lay: Any, i: int) -> None:
    _plan_fixed(p.prog, lay, i, p.plan, p.b, p.signed_terms, p.mode, p.max_terms)


def _step_batchnorm(p: _Plan, lay: Any, i: int) -> None:
    _plan_batchnorm(p.prog, lay, i, p.plan)


def _step_add(p: _Plan, lay: Any, i: int) -> None:
    p.prog.steps.append(("add", lay.name, lay.args, []))
    p.prog.add_roles.append("residual")


def _step_identity(p: _Plan, lay: Any, i: int) -> None:
    p.prog.steps.append(("identity", lay.name, lay.args, []))


def _step_module(p: _Plan, lay: Any, i: int, module: nn.Module) -> str:
    name = f"m{i}"
    p.prog.add_module(name, module)
    p.prog.steps.append(("module", lay.name, lay.args, [name]))
    return name


def _step_reshape(p: _Plan, lay: Any, i: int) -> None:
    if lay.extra.get("op") != "flatten":
        p.prog.steps.append(("view", lay.name, lay.args, list(lay.extra["shape"][1:])))
        return
    p.rank[lay.name] = 2
    if p.rank[lay.args[0]] <= 2:  # a flatten of a flat input is a no-op
        _step_identity(p, lay, i)
    else:
        _step_module(p, lay, i, nn.Flatten(lay.extra["start"], lay.extra["end"]))


def _step_pool(p: _Plan, lay: Any, i: int) -> None:
    e = lay.extra
    cls = {("maxpool", 1): nn.MaxPool1d, ("maxpool", 2): nn.MaxPool2d, ("avgpool", 1): nn.AvgPool1d,
           ("avgpool", 2): nn.AvgPool2d}[(lay.kind, e["dims"])]
    k, st, pad = (e["kernel"][0], e["stride"][0], e["padding"][0]) if e["dims"] == 1 else (
        e["kernel"], e["stride"], e["padding"])
    name = _step_module(p, lay, i, cls(k, st, pad))
    p.plan[f"pool:{lay.qual or lay.name}"] = {"path": lay.kind, "modules": [name], "area": math.prod(e["kernel"])}


def _step_relu(p: _Plan, lay: Any, i: int) -> None:
    _step_module(p, lay, i, nn.ReLU())


#: one entry per layer kind HLS_KINDS admits: how it enters the program hls4ml converts
STEPS: dict[str, Callable[[_Plan, Any, int], None]] = {
    "linear": _step_fixed, "conv": _step_fixed, "batchnorm": _step_batchnorm, "add": _step_add,
    "identity": _step_identity, "reshape": _step_reshape, "maxpool": _step_pool, "avgpool": _step_pool,
    "relu": _step_relu,
}


def split_model(model: nn.Module, *, b: int, signed_terms: bool, mode: str = "auto",
                max_terms: int = 4, input_rank: int = 2, example: Tensor | None = None
                ) -> tuple[_Program, dict[str, dict[str, Any]]]:
    """The torch model hls4ml converts, and per fixed layer how it is implemented.

    Returns ``(program, plan)``; ``plan[qual] = {"path": "exponent"|"fixed", "terms": T,
    "modules": [...], "min_exponent": ...}``; a BatchNorm's entry (``bn:<qual>``) has path
    ``batchnorm`` and its scale's fractional bits; a pooling's (``pool:<qual>``) its window.
    Each layer kind enters through its entry in :data:`STEPS`.
    """
    if mode not in ("auto", "exponent", "fixed"):
        raise Hls4mlError(f"mode must be auto, exponent or fixed, got {mode!r}")
    g = check_model(model, example)
    p = _Plan(_Program(), {}, {g.input: input_rank if example is None else example.dim()}, b, signed_terms, mode,
              max_terms)
    p.prog.input_name, p.prog.output_name = g.input, g.output
    for i, lay in enumerate(g.layers):
        p.rank[lay.name] = len(lay.extra["shape"]) if "shape" in lay.extra else (
            p.rank[lay.args[0]] if lay.args else input_rank)
        STEPS[lay.kind](p, lay, i)
    return p.prog.eval(), p.plan
