"""TFLite-Micro export: a float32 ``.tflite`` whose fixed tensors are lookup-table compressed.

Why our own flatbuffer writer: the converter from PyTorch (``litert-torch``) pulls jax,
transformers, torchao and the LiteRT converter (hundreds of MB, minutes to install, pinned to
narrow torch ranges); the graphs a fixed MLP/CNN needs are a handful of builtin operators.
So the model is written directly with the TFLite schema's object API, as shipped inside the
``tflite-micro`` wheel (``tflite_micro.tensorflow.lite.micro.python.schema_py_generated``,
``flatbuffers``); that wheel also brings the TFLite-Micro interpreter and its compression tool,
which are what checks the result. Nothing else is needed (no TensorFlow).

Graph mapping (``pwfn.export.targets.graph``): Linear -> FULLY_CONNECTED (weights [out, in] as in
torch), Conv2d -> PAD (when padded) + CONV_2D (filters OHWI), ReLU -> RELU, Max/AvgPool2d ->
MAX_POOL_2D / AVERAGE_POOL_2D, add -> ADD. The input keeps torch's layout (NCHW, batch 1):
a TRANSPOSE makes it NHWC for the convolutions, and a flatten after them transposes back to
NCHW first, so the fully connected weights stay exactly torch's. Conv1d models are refused.

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

from ...errors import PwfnError
from ...hints import install_hint
from .graph import GraphError, Layer, trace

__all__ = ["MAX_LUT_VALUES", "TflmError", "build_tflite", "compress_tflite", "export_tflm", "run_tflm"]

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


def build_tflite(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[bytes, list[int]]:
    """The float32 ``.tflite`` bytes of ``model`` for one input of ``input_shape`` (no batch dim),
    and the indices of its constant weight/bias tensors."""
    tfl = _schema()
    B = tfl.BuiltinOperator
    Opt = tfl.BuiltinOptions
    try:
        g = trace(copy.deepcopy(model).eval())
    except GraphError as exc:
        raise TflmError(str(exc)) from exc
    bld = _Builder(tfl)
    shape = (1, *input_shape)
    x_in = bld.tensor("input", shape)
    # activation name -> (tensor index, shape as tflite holds it, layout "nchw" | "nhwc" | "flat")
    env: dict[str, tuple[int, tuple[int, ...], str]] = {g.input: (x_in, shape, "flat" if len(shape) == 2 else "nchw")}

    def nhwc(name: str) -> tuple[int, tuple[int, ...]]:
        idx, shp, layout = env[name]
        if layout == "nhwc":
            return idx, shp
        if layout != "nchw" or len(shp) != 4:
            raise TflmError(f"a 2-D convolution or pooling needs an NCHW input, got shape {shp}")
        n, c, h, w = shp
        out = bld.tensor(f"{name}_nhwc", (n, h, w, c))
        opts = tfl.TransposeOptionsT()
        bld.op(B.TRANSPOSE, [idx, bld.const_i32(f"{name}_perm", [0, 2, 3, 1])], [out], Opt.TransposeOptions, opts)
        return out, (n, h, w, c)

    for lay in g.layers:
        k = lay.kind
        if k == "identity":
            env[lay.name] = env[lay.args[0]]
        elif k == "linear":
            env[lay.name] = _linear(bld, tfl, lay, env[lay.args[0]])
        elif k == "conv":
            if lay.extra["dims"] != 2:
                raise TflmError(f"{lay.qual}: only 2-D convolutions are exported to TFLite-Micro")
            idx, shp = nhwc(lay.args[0])
            env[lay.name] = _conv(bld, tfl, lay, idx, shp)
        elif k in ("maxpool", "avgpool"):
            if lay.extra["dims"] != 2 or any(lay.extra["padding"]) or lay.extra["ceil_mode"]:
                raise TflmError(f"{lay.qual}: only unpadded 2-D pooling (floor mode) is exported")
            idx, shp = nhwc(lay.args[0])
            (kh, kw), (sh, sw) = lay.extra["kernel"], lay.extra["stride"]
            n, h, w, c = shp
            oshape = (n, (h - kh) // sh + 1, (w - kw) // sw + 1, c)
            out = bld.tensor(lay.name, oshape)
            opts = tfl.Pool2DOptionsT()
            opts.padding, opts.strideW, opts.strideH = tfl.Padding.VALID, sw, sh
            opts.filterWidth, opts.filterHeight = kw, kh
            code = B.MAX_POOL_2D if k == "maxpool" else B.AVERAGE_POOL_2D
            bld.op(code, [idx], [out], Opt.Pool2DOptions, opts)
            env[lay.name] = (out, oshape, "nhwc")
        elif k == "relu":
            idx, shp, layout = env[lay.args[0]]
            out = bld.tensor(lay.name, shp)
            bld.op(B.RELU, [idx], [out])
            env[lay.name] = (out, shp, layout)
        elif k == "add":
            (a, sa, la), (b_, sb, lb) = env[lay.args[0]], env[lay.args[1]]
            if sa != sb or la != lb:
                raise TflmError(f"{lay.name}: the two summands have different shapes or layouts")
            out = bld.tensor(lay.name, sa)
            bld.op(B.ADD, [a, b_], [out], Opt.AddOptions, tfl.AddOptionsT())
            env[lay.name] = (out, sa, la)
        elif k == "flatten":
            idx, shp, layout = env[lay.args[0]]
            if lay.extra["start"] != 1 or lay.extra["end"] not in (-1, len(shp) - 1):
                raise TflmError(f"{lay.qual or lay.name}: only flatten(start_dim=1) is exported")
            if layout == "nhwc":  # back to torch's channel-major order, then flatten
                n, h, w, c = shp
                t = bld.tensor(f"{lay.name}_nchw", (n, c, h, w))
                bld.op(B.TRANSPOSE, [idx, bld.const_i32(f"{lay.name}_perm", [0, 3, 1, 2])], [t],
                       Opt.TransposeOptions, tfl.TransposeOptionsT())
                idx = t
            flat = (shp[0], int(np.prod(shp[1:])))
            out = bld.tensor(lay.name, flat)
            opts = tfl.ReshapeOptionsT()
            opts.newShape = list(flat)
            bld.op(B.RESHAPE, [idx, bld.const_i32(f"{lay.name}_shape", list(flat))], [out], Opt.ReshapeOptions, opts)
            env[lay.name] = (out, flat, "flat")
        else:  # pragma: no cover - graph.trace admits no other kind
            raise TflmError(f"{lay.name}: unsupported layer kind {k!r}")
    out_idx, out_shape, layout = env[g.output]
    if layout == "nhwc":
        n, h, w, c = out_shape
        t = bld.tensor("output_nchw", (n, c, h, w))
        bld.op(B.TRANSPOSE, [out_idx, bld.const_i32("output_perm", [0, 3, 1, 2])], [t],
               Opt.TransposeOptions, tfl.TransposeOptionsT())
        out_idx = t
    return bld.finish([x_in], [out_idx]), list(bld.weight_tensors)


def _f32(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).contiguous().numpy()


def _linear(bld: _Builder, tfl: Any, lay: Layer, src: tuple[int, tuple[int, ...], str]) -> tuple[int, tuple, str]:
    m = lay.module
    idx, shp, layout = src
    if layout == "nhwc" or len(shp) != 2:
        raise TflmError(f"{lay.qual}: a Linear layer needs a flattened (batch, features) input, got {shp}")
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
    return out, oshape, "flat"


def _conv(bld: _Builder, tfl: Any, lay: Layer, idx: int, shp: tuple[int, ...]) -> tuple[int, tuple, str]:
    m = lay.module
    n, h, w, c = shp
    ph, pw = m.padding
    if ph or pw:
        padded = (n, h + 2 * ph, w + 2 * pw, c)
        t = bld.tensor(f"{lay.name}_padded", padded)
        pads = bld.tensor(f"{lay.name}_pads", (4, 2), tfl.TensorType.INT32,
                          np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], dtype=np.int32))
        bld.op(tfl.BuiltinOperator.PAD, [idx, pads], [t], tfl.BuiltinOptions.PadOptions, tfl.PadOptionsT())
        idx, (n, h, w, c) = t, padded
    kh, kw = m.kernel_size
    sh, sw = m.stride
    filt = bld.tensor(f"{lay.qual}.weight", (m.out_channels, kh, kw, c),
                      data=_f32(m.weight.permute(0, 2, 3, 1)))
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
    return out, oshape, "nhwc"


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
    plain, weights = build_tflite(model, tuple(example.shape[1:]))
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
