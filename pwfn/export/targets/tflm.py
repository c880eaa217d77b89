"""TFLite-Micro export: a float32 ``.tflite`` whose fixed tensors are lookup-table compressed.

Why our own flatbuffer writer: the converter from PyTorch (``litert-torch``) pulls jax,
transformers, torchao and the LiteRT converter (hundreds of MB, minutes to install, pinned to
narrow torch ranges); the graphs a fixed MLP/CNN needs are a handful of builtin operators.
So the model is written directly with the TFLite schema's object API, as shipped inside the
``tflite-micro`` wheel (``tflite_micro.tensorflow.lite.micro.python.schema_py_generated``,
``flatbuffers``); that wheel also brings the TFLite-Micro interpreter and its compression tool,
which are what checks the result. Nothing else is needed (no TensorFlow).

Graph mapping (``pwfn.export.targets.graph``), one emitter per layer kind in :data:`EMITTERS`:
Linear -> FULLY_CONNECTED (weights [out, in] as in torch), Conv1d/Conv2d -> PAD (when padded) +
CONV_2D (filters OHWI; a 1-D convolution is a 1 x k one on an (N, 1, L, C) tensor), BatchNorm ->
MUL + ADD by its per-channel scale and shift (its own layer, never folded into the weights),
ReLU -> RELU, Sigmoid/Tanh/ReLU6/LeakyReLU/Hardswish/ELU/Softmax -> their builtin operators,
max/average pooling -> (PAD/PADV2 +) MAX_POOL_2D / AVERAGE_POOL_2D, flatten/view/reshape/
unsqueeze/squeeze -> RESHAPE, add -> ADD. The input keeps torch's layout (batch 1): a TRANSPOSE
makes it channels-last for the convolutions, and a reshape or the output transposes back to
torch's order first, so the fully connected weights stay exactly torch's. Anything else is
refused, naming the layer, before anything is built.

Compression: ``tflite_micro.compression.compress`` with ``LookUpTableCompression(index_bitwidth,
PerTensor())`` on every constant weight/bias tensor that has at most 2^7 = 128 distinct values
(budget mode's ``max_values_per_tensor: 128`` guarantees it for all); the interpreter decodes
them with DECODE operators. Verified: compressed and uncompressed models give bit-identical
outputs in the TFLite-Micro interpreter, and those are within 1e-5 (relative to the output
scale) of torch.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...common.hints import install_hint
from ...errors import PwfnError
from .graph import GraphError, Layer, refuse_unsupported

__all__ = ["EMITTERS", "MAX_LUT_VALUES", "TFLM_KINDS", "TflmError", "build_tflite", "check_model",
           "compress_tflite", "export_tflm", "run_tflm"]

log = logging.getLogger(__name__)

#: per-tensor lookup tables hold at most 2^7 values (index_bitwidth 1..7)
MAX_LUT_VALUES = 128
_TOL = 1e-5


class TflmError(PwfnError, ValueError):
    """The TFLite-Micro export or its check failed."""


def _schema() -> Any:
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as tfl
    except ImportError as exc:
        raise TflmError(
            f"TFLite-Micro export needs the 'tflm' extra ({exc.name or exc} is not installed): "
            f"{install_hint('tflm')}"
        ) from exc
    return tfl


class _Builder:
    """Collects tensors, buffers, operator codes and operators of one subgraph."""

    def __init__(self, tfl: Any) -> None:
        self.tfl = tfl
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [tfl.BufferT()]  # buffer 0: the empty sentinel
        self.opcodes: list[Any] = []
        self.code_index: dict[int, int] = {}
        self.operators: list[Any] = []
        self.weight_tensors: list[int] = []  # constant weight/bias tensors (compression candidates)

    def tensor(self, name: str, shape: tuple[int, ...], dtype: int | None = None,
               data: np.ndarray | None = None) -> int:
        t = self.tfl.TensorT()
        t.name = name
        t.shape = [int(s) for s in shape]
        t.type = self.tfl.TensorType.FLOAT32 if dtype is None else dtype
        if data is not None:
            buf = self.tfl.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const_i32(self, name: str, values: list[int]) -> int:
        return self.tensor(name, (len(values),), self.tfl.TensorType.INT32, np.asarray(values, dtype=np.int32))

    def op(self, code: int, inputs: list[int], outputs: list[int], opt_type: int = 0, options: Any = None) -> None:
        if code not in self.code_index:
            oc = self.tfl.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            self.opcodes.append(oc)
            self.code_index[code] = len(self.opcodes) - 1
        o = self.tfl.OperatorT()
        o.opcodeIndex = self.code_index[code]
        o.inputs = inputs
        o.outputs = outputs
        o.builtinOptionsType = opt_type
        o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        sg = self.tfl.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, inputs, outputs, self.operators
        sg.name = "main"
        m = self.tfl.ModelT()
        m.version = 3
        m.operatorCodes = self.opcodes
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.description = "pwfn fixed network"
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _tfl_pool(lay: Layer) -> str | None:
    e = lay.extra
    if e.get("ceil_mode"):
        return "ceil_mode=True"
    if "kernel" not in e:
        return "adaptive pooling whose window the example does not fix"
    if lay.kind == "avgpool" and any(e["padding"]) and not e.get("count_include_pad", True):
        return "padded average pooling with count_include_pad=False"
    return None


def _tfl_linear(lay: Layer) -> str | None:
    src = lay.extra.get("in_shape")
    return f"a Linear layer on a {len(src)}-D input (TFLite-Micro takes (batch, features))" \
        if src is not None and len(src) != 2 else None


def _tfl_activation(lay: Layer) -> str | None:
    if lay.extra.get("fn") == "softmax":
        src = lay.extra.get("in_shape")
        dim = lay.extra.get("dim")
        if src is None or dim is None or dim not in (-1, len(src) - 1):
            return "softmax over another axis than the last"
    return None


#: what the TFLite-Micro target takes: kind -> why a layer of that kind is refused (None: taken)
TFLM_KINDS: dict[str, Any] = {
    "linear": _tfl_linear, "conv": lambda lay: None, "batchnorm": lambda lay: None, "relu": lambda lay: None,
    "activation": _tfl_activation, "maxpool": _tfl_pool, "avgpool": _tfl_pool, "reshape": lambda lay: None,
    "identity": lambda lay: None, "add": lambda lay: None,
}


class _Emitter:
    """Emits one subgraph: activations by fx name -> (tensor index, shape as tflite holds it, layout).

    Layouts: ``torch`` (torch's order, any rank), ``nhwc`` (a 2-D feature map, channels last) and
    ``n1lc`` (a 1-D feature map as (N, 1, L, C)).
    """

    def __init__(self, bld: _Builder, tfl: Any) -> None:
        self.bld, self.tfl = bld, tfl
        self.env: dict[str, tuple[int, tuple[int, ...], str]] = {}
        self.B, self.Opt = tfl.BuiltinOperator, tfl.BuiltinOptions

    def transpose(self, idx: int, shape: tuple[int, ...], perm: list[int], name: str) -> tuple[int, tuple]:
        out_shape = tuple(shape[p] for p in perm)
        out = self.bld.tensor(name, out_shape)
        self.bld.op(self.B.TRANSPOSE, [idx, self.bld.const_i32(f"{name}_perm", perm)], [out],
                    self.Opt.TransposeOptions, self.tfl.TransposeOptionsT())
        return out, out_shape

    def channels_last(self, name: str) -> tuple[int, tuple[int, ...], str]:
        """The activation as ``nhwc`` (4-D) or ``n1lc`` (3-D) for a convolution or pooling."""
        idx, shp, layout = self.env[name]
        if layout in ("nhwc", "n1lc"):
            return idx, shp, layout
        if len(shp) == 4:
            t, s = self.transpose(idx, shp, [0, 2, 3, 1], f"{name}_nhwc")
            return t, s, "nhwc"
        if len(shp) == 3:
            n, c, L = shp
            t, _ = self.transpose(idx, shp, [0, 2, 1], f"{name}_nlc")
            return self._reshape_to(t, (n, 1, L, c), f"{name}_n1lc"), (n, 1, L, c), "n1lc"
        raise TflmError(f"a convolution or pooling needs a 3-D or 4-D input, got shape {shp}")

    def torch_order(self, name: str) -> tuple[int, tuple[int, ...]]:
        idx, shp, layout = self.env[name]
        if layout == "nhwc":
            return self.transpose(idx, shp, [0, 3, 1, 2], f"{name}_nchw")
        if layout == "n1lc":
            n, _, L, c = shp
            t = self._reshape_to(idx, (n, L, c), f"{name}_nlc")
            return self.transpose(t, (n, L, c), [0, 2, 1], f"{name}_ncl")
        return idx, shp

    def unary(self, lay: Layer, code: int, opt_type: int = 0, options: Any = None) -> None:
        idx, shp, layout = self.env[lay.args[0]]
        out = self.bld.tensor(lay.name, shp)
        self.bld.op(code, [idx], [out], opt_type, options)
        self.env[lay.name] = (out, shp, layout)

    # -- one method per kind ------------------------------------------------------------------
    def identity(self, lay: Layer) -> None:
        self.env[lay.name] = self.env[lay.args[0]]

    def linear(self, lay: Layer) -> None:
        idx, shp = self.torch_order(lay.args[0])
        self.env[lay.name] = _linear(self.bld, self.tfl, lay, (idx, shp, "torch"))

    def conv(self, lay: Layer) -> None:
        idx, shp, layout = self.channels_last(lay.args[0])
        self.env[lay.name] = _conv(self.bld, self.tfl, lay, idx, shp, layout)

    def batchnorm(self, lay: Layer) -> None:
        idx, shp, layout = self.env[lay.args[0]]
        if layout == "torch" and len(shp) > 2:
            idx, shp, layout = self.channels_last(lay.args[0])
        scale = lay.extra["scale"].to(torch.float32).numpy()
        shift = lay.extra["shift"].to(torch.float32).numpy()
        q = lay.qual or lay.name
        s_t = self.bld.tensor(f"{q}.scale", (len(scale),), data=scale)
        c_t = self.bld.tensor(f"{q}.shift", (len(shift),), data=shift)
        mid = self.bld.tensor(f"{lay.name}_scaled", shp)
        self.bld.op(self.B.MUL, [idx, s_t], [mid], self.Opt.MulOptions, self.tfl.MulOptionsT())
        out = self.bld.tensor(lay.name, shp)
        self.bld.op(self.B.ADD, [mid, c_t], [out], self.Opt.AddOptions, self.tfl.AddOptionsT())
        self.env[lay.name] = (out, shp, layout)

    def relu(self, lay: Layer) -> None:
        self.unary(lay, self.B.RELU)

    def activation(self, lay: Layer) -> None:
        fn = lay.extra["fn"]
        if fn == "leaky_relu":
            opts = self.tfl.LeakyReluOptionsT()
            opts.alpha = lay.extra["alpha"]
            self.unary(lay, self.B.LEAKY_RELU, self.Opt.LeakyReluOptions, opts)
        elif fn == "softmax":
            idx, shp = self.torch_order(lay.args[0])
            opts = self.tfl.SoftmaxOptionsT()
            opts.beta = 1.0
            out = self.bld.tensor(lay.name, shp)
            self.bld.op(self.B.SOFTMAX, [idx], [out], self.Opt.SoftmaxOptions, opts)
            self.env[lay.name] = (out, shp, "torch")
        else:
            code = {"sigmoid": self.B.LOGISTIC, "tanh": self.B.TANH, "relu6": self.B.RELU6,
                    "hardswish": self.B.HARD_SWISH, "elu": self.B.ELU}[fn]
            self.unary(lay, code)

    def maxpool(self, lay: Layer) -> None:
        self._pool(lay, self.B.MAX_POOL_2D)

    def avgpool(self, lay: Layer) -> None:
        self._pool(lay, self.B.AVERAGE_POOL_2D)

    def _pool(self, lay: Layer, code: int) -> None:
        idx, shp, layout = self.channels_last(lay.args[0])
        e = lay.extra
        k, st, pad = e["kernel"], e["stride"], e["padding"]
        if e["dims"] == 1:
            k, st, pad = (1, *k), (1, *st), (0, *pad)
        n, h, w, c = shp
        if any(pad):
            padded = (n, h + 2 * pad[0], w + 2 * pad[1], c)
            pads = self.bld.tensor(f"{lay.name}_pads", (4, 2), self.tfl.TensorType.INT32,
                                   np.array([[0, 0], [pad[0], pad[0]], [pad[1], pad[1]], [0, 0]], dtype=np.int32))
            t = self.bld.tensor(f"{lay.name}_padded", padded)
            if code == self.B.MAX_POOL_2D:  # torch pads max-pooling with -inf
                lowest = self.bld.tensor(f"{lay.name}_lowest", (1,), data=np.array([-np.inf], dtype=np.float32))
                self.bld.op(self.B.PADV2, [idx, pads, lowest], [t], self.Opt.PadV2Options, self.tfl.PadV2OptionsT())
            else:  # count_include_pad: zeros count in the average
                self.bld.op(self.B.PAD, [idx, pads], [t], self.Opt.PadOptions, self.tfl.PadOptionsT())
            idx, (n, h, w, c) = t, padded
        oshape = (n, (h - k[0]) // st[0] + 1, (w - k[1]) // st[1] + 1, c)
        out = self.bld.tensor(lay.name, oshape)
        opts = self.tfl.Pool2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = self.tfl.Padding.VALID, st[0], st[1]
        opts.filterHeight, opts.filterWidth = k[0], k[1]
        self.bld.op(code, [idx], [out], self.Opt.Pool2DOptions, opts)
        self.env[lay.name] = (out, oshape, layout)

    def reshape(self, lay: Layer) -> None:
        idx, shp = self.torch_order(lay.args[0])
        if lay.extra.get("op") == "flatten":
            new = tuple(torch.flatten(torch.empty(shp), lay.extra["start"], lay.extra["end"]).shape)
        else:
            new = (shp[0], *lay.extra["shape"][1:])
        self.env[lay.name] = (self._reshape_to(idx, new, lay.name), new, "torch")

    def _reshape_to(self, idx: int, shape: tuple[int, ...], name: str) -> int:
        out = self.bld.tensor(name, shape)
        opts = self.tfl.ReshapeOptionsT()
        opts.newShape = list(shape)
        self.bld.op(self.B.RESHAPE, [idx, self.bld.const_i32(f"{name}_shape", list(shape))], [out],
                    self.Opt.ReshapeOptions, opts)
        return out

    def add(self, lay: Layer) -> None:
        (a, sa, la), (b_, sb, lb) = self.env[lay.args[0]], self.env[lay.args[1]]
        if la != lb:
            (a, sa), (b_, sb), la = self.torch_order(lay.args[0]), self.torch_order(lay.args[1]), "torch"
        if sa != sb:
            raise TflmError(f"{lay.name}: the two summands have different shapes {sa} and {sb}")
        out = self.bld.tensor(lay.name, sa)
        self.bld.op(self.B.ADD, [a, b_], [out], self.Opt.AddOptions, self.tfl.AddOptionsT())
        self.env[lay.name] = (out, sa, la)


#: one emitter per layer kind
EMITTERS: dict[str, Any] = {k: getattr(_Emitter, k) for k in TFLM_KINDS}


def check_model(model: nn.Module, example: Tensor | None = None) -> Any:
    """Refuse (``TflmError``) the first layer this target cannot take, naming it and what would work."""
    try:
        return refuse_unsupported(copy.deepcopy(model).eval(), "tflm", TFLM_KINDS, example,
                                  alternative="the onnx target (--to onnx) takes every layer torch.onnx exports")
    except GraphError as exc:
        raise TflmError(str(exc)) from exc


def build_tflite(model: nn.Module, input_shape: tuple[int, ...], example: Tensor | None = None
                 ) -> tuple[bytes, list[int]]:
    """The float32 ``.tflite`` bytes of ``model`` for one input of ``input_shape`` (no batch dim),
    and the indices of its constant weight/bias tensors (``example``: a batch, for its dtype)."""
    tfl = _schema()
    g = check_model(model, example[:1] if example is not None else torch.zeros((1, *input_shape)))
    bld = _Builder(tfl)
    shape = (1, *input_shape)
    x_in = bld.tensor("input", shape)
    em = _Emitter(bld, tfl)
    em.env[g.input] = (x_in, shape, "torch")
    for lay in g.layers:
        EMITTERS[lay.kind](em, lay)
    out_idx, _ = em.torch_order(g.output)
    return bld.finish([x_in], [out_idx]), list(bld.weight_tensors)


def _f32(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).contiguous().numpy()


def _linear(bld: _Builder, tfl: Any, lay: Layer, src: tuple[int, tuple[int, ...], str]) -> tuple[int, tuple, str]:
    m = lay.module
    idx, shp, _ = src
    if len(shp) != 2:
        raise TflmError(f"{lay.qual}: a Linear layer needs a (batch, features) input, got {shp}")
    w = bld.tensor(f"{lay.qual}.weight", tuple(m.weight.shape), data=_f32(m.weight))
    bld.weight_tensors.append(w)
    ins = [idx, w]
    if m.bias is not None:
        bt = bld.tensor(f"{lay.qual}.bias", tuple(m.bias.shape), data=_f32(m.bias))
        bld.weight_tensors.append(bt)
        ins.append(bt)
    else:
        ins.append(-1)
    oshape = (shp[0], m.out_features)
    out = bld.tensor(lay.name, oshape)
    opts = tfl.FullyConnectedOptionsT()
    opts.fusedActivationFunction = tfl.ActivationFunctionType.NONE
    opts.keepNumDims = False
    bld.op(tfl.BuiltinOperator.FULLY_CONNECTED, ins, [out], tfl.BuiltinOptions.FullyConnectedOptions, opts)
    return out, oshape, "torch"


def _conv(bld: _Builder, tfl: Any, lay: Layer, idx: int, shp: tuple[int, ...], layout: str
          ) -> tuple[int, tuple, str]:
    """A 2-D convolution on ``nhwc``, or a 1-D one as a 1 x k convolution on ``n1lc``."""
    m = lay.module
    n, h, w, c = shp
    if lay.extra["dims"] == 1:
        (ph, pw), (kh, kw), (sh, sw) = (0, m.padding[0]), (1, m.kernel_size[0]), (1, m.stride[0])
        filt_data = _f32(m.weight.permute(0, 2, 1).unsqueeze(1))  # O, 1, k, I
    else:
        (ph, pw), (kh, kw), (sh, sw) = m.padding, m.kernel_size, m.stride
        filt_data = _f32(m.weight.permute(0, 2, 3, 1))  # OHWI
    if ph or pw:
        padded = (n, h + 2 * ph, w + 2 * pw, c)
        t = bld.tensor(f"{lay.name}_padded", padded)
        pads = bld.tensor(f"{lay.name}_pads", (4, 2), tfl.TensorType.INT32,
                          np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], dtype=np.int32))
        bld.op(tfl.BuiltinOperator.PAD, [idx, pads], [t], tfl.BuiltinOptions.PadOptions, tfl.PadOptionsT())
        idx, (n, h, w, c) = t, padded
    filt = bld.tensor(f"{lay.qual}.weight", (m.out_channels, kh, kw, c), data=filt_data)
    bld.weight_tensors.append(filt)
    ins = [idx, filt]
    if m.bias is not None:
        bt = bld.tensor(f"{lay.qual}.bias", (m.out_channels,), data=_f32(m.bias))
        bld.weight_tensors.append(bt)
        ins.append(bt)
    else:
        ins.append(-1)
    oshape = (n, (h - kh) // sh + 1, (w - kw) // sw + 1, m.out_channels)
    out = bld.tensor(lay.name, oshape)
    opts = tfl.Conv2DOptionsT()
    opts.padding, opts.strideW, opts.strideH = tfl.Padding.VALID, sw, sh
    opts.dilationWFactor = opts.dilationHFactor = 1
    opts.fusedActivationFunction = tfl.ActivationFunctionType.NONE
    bld.op(tfl.BuiltinOperator.CONV_2D, ins, [out], tfl.BuiltinOptions.Conv2DOptions, opts)
    return out, oshape, layout


def compress_tflite(data: bytes, weight_tensors: list[int]) -> tuple[bytes, dict[str, Any]]:
    """LUT-compress every listed constant tensor with at most 128 distinct values (per tensor)."""
    tfl = _schema()
    from tflite_micro.tensorflow.lite.micro.compression import compress, spec

    model = tfl.ModelT.InitFromObj(tfl.Model.GetRootAsModel(data, 0))
    sg = model.subgraphs[0]
    specs = []
    per: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for ti in weight_tensors:
        t = sg.tensors[ti]
        name = t.name.decode() if isinstance(t.name, bytes) else t.name
        arr = np.frombuffer(bytes(model.buffers[t.buffer].data), dtype=np.float32)
        n_unique = int(np.unique(arr).size)
        if n_unique > MAX_LUT_VALUES:
            skipped[name] = n_unique
            continue
        bits = max(1, (n_unique - 1).bit_length())
        specs.append(spec.Tensor(subgraph=0, tensor=ti,
                                 compression=[spec.LookUpTableCompression(index_bitwidth=bits, mode=spec.PerTensor())]))
        per[name] = {"values": n_unique, "index_bits": bits, "elements": int(arr.size)}
    if not specs:
        return data, {"compressed_tensors": 0, "tensors": per, "not_compressed": skipped}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny bias may "expand" by a few bytes; reported, not fatal
        out = bytes(compress(data, specs))
    return out, {"compressed_tensors": len(specs), "tensors": per, "not_compressed": skipped}


def run_tflm(data: bytes, x: np.ndarray) -> np.ndarray:
    """Run ``x`` (batch, ...) through the TFLite-Micro interpreter one sample at a time."""
    from tflite_micro import runtime

    interp = runtime.Interpreter.from_bytes(data, arena_size=max(1 << 20, 16 * len(data)))
    outs = []
    for i in range(x.shape[0]):
        interp.set_input(np.ascontiguousarray(x[i:i + 1], dtype=np.float32), 0)
        interp.invoke()
        outs.append(np.array(interp.get_output(0), copy=True))
    return np.concatenate(outs, axis=0)


def export_tflm(model: nn.Module, example: Tensor) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``model.tflite`` (compressed) and ``model_uncompressed.tflite``, verified; and info.

    Raises ``TflmError`` when a check fails: compressed vs uncompressed outputs in the
    interpreter must be bit-identical, and within 1e-5 x max(1, |output|) of torch.
    """
    model = copy.deepcopy(model).eval()
    plain, weights = build_tflite(model, tuple(example.shape[1:]), example)
    packed, cinfo = compress_tflite(plain, weights)
    g = torch.Generator().manual_seed(2)
    xs = torch.cat([example, torch.randn((6, *example.shape[1:]), generator=g)]).to(torch.float32)
    try:
        ref_plain = run_tflm(plain, xs.numpy())
        got = run_tflm(packed, xs.numpy())
    except PwfnError:
        raise
    except Exception as exc:  # the interpreter raises RuntimeError and friends
        raise TflmError(f"the TFLite-Micro interpreter rejected the model: {type(exc).__name__}: {exc}") from exc
    if got.shape != ref_plain.shape or not np.array_equal(got.view(np.uint32), ref_plain.view(np.uint32)):
        raise TflmError("TFLite-Micro check failed: the compressed model's outputs differ from the uncompressed "
                        "model's (they must be bit-identical)")
    with torch.no_grad():
        ref = model(xs).to(torch.float32).numpy()
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    tol = _TOL * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    if got.shape != ref.shape or not diff <= tol:
        raise TflmError(f"TFLite-Micro check failed: max |interpreter - torch| = {diff:.3g} > {tol:.3g}")
    info = dict(cinfo)
    info.update({
        "bytes": len(packed),
        "uncompressed_bytes": len(plain),
        "max_abs_diff": diff,
        "bit_identical_to_uncompressed": True,
        "input_shape": [1, *example.shape[1:]],
        "samples_checked": int(xs.shape[0]),
    })
    return {"model.tflite": packed, "model_uncompressed.tflite": plain}, info
