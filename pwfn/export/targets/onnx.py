"""ONNX export with the weights stored as codebook + packed indices, decoded by Gather.

Why: an ONNX file with fp32 initializers is as large as the fp32 model, although a fixed
network has only a few distinct weight values. Here every weight tensor whose values all lie
on the codebook (by default: any float initializer, checked bit for bit) is replaced by

- a small value table (the tensor's distinct float32 values, a subset of the shared codebook),
- its indices into that table, bit-packed into uint8 (1, 2 or 4 bits per index, LSB first) or
  stored as uint8 / uint16 when the table holds more than 16 / 256 values,
- a few standard nodes that decode them when the session is created: ``BitShift`` +
  ``BitwiseAnd`` (unpacking), ``Reshape``/``Slice``, ``Cast`` to int32, ``Gather`` from the
  table and ``Reshape`` to the weight's shape.

The decoded weights are bit-identical to the point model's (checked by exposing them as extra
outputs of a verification copy), so onnxruntime's outputs are bit-identical to those of the
plain fp32 ONNX export of the same model (checked), and within float rounding of torch.
Tensors where indices would not be smaller than floats (tiny biases) stay float. Models of any
architecture work: the rewriting is by content, not by layer type or name.

Needs the ``onnx`` extra (onnx, onnxruntime). Opset 18 (``BitwiseAnd``).
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import PwfnError

__all__ = ["OPSET", "OnnxTargetError", "codebook_onnx", "decode_weights", "export_onnx", "index_bits"]

log = logging.getLogger(__name__)

OPSET = 18
#: protobuf bytes the decode nodes of one tensor add (names, attributes): a tensor is coded
#: only when its table + indices + this overhead are smaller than its float32 bytes
_NODE_OVERHEAD = 200


class OnnxTargetError(PwfnError, ValueError):
    """The ONNX export or its check failed."""


def index_bits(table_size: int) -> int:
    """Bits per stored index for a table of ``table_size`` values: 1, 2, 4, 8 or 16."""
    if table_size <= 0 or table_size > 65536:
        raise OnnxTargetError(f"a table of {table_size} values cannot be indexed")
    need = max(1, (table_size - 1).bit_length())
    for bits in (1, 2, 4, 8, 16):
        if need <= bits:
            return bits
    raise AssertionError("unreachable")  # pragma: no cover


def _pack(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (< 2^bits) -> uint8 bytes, ``8 // bits`` per byte, least significant first."""
    if bits == 16:
        return idx.astype(np.uint16)
    if bits == 8:
        return idx.astype(np.uint8)
    per = 8 // bits
    n = idx.size
    padded = np.zeros(-(-n // per) * per, dtype=np.uint8)
    padded[:n] = idx
    groups = padded.reshape(-1, per).astype(np.uint16)
    shifts = (np.arange(per, dtype=np.uint16) * bits)[None, :]
    return (groups << shifts).sum(axis=1).astype(np.uint8)


def _unpack_reference(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of ``_pack`` in numpy (what the ONNX nodes compute)."""
    if bits >= 8:
        return packed.astype(np.int64)[:n]
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    vals = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1)[:n].astype(np.int64)


@dataclass
class _Coded:
    name: str
    shape: tuple[int, ...]
    table: int
    bits: int
    index_bytes: int
    table_bytes: int
    float_bytes: int


def _as_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def codebook_onnx(data: bytes, codebook: Tensor | None = None) -> tuple[bytes, dict[str, Any]]:
    """Rewrite an ONNX model's float32 initializers as value table + packed indices + Gather.

    With ``codebook`` only tensors whose every value is (bitwise) a codebook value are coded;
    without it every float32 initializer where coding saves bytes. Returns the new bytes and
    per-tensor statistics.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(data)
    g = model.graph
    allowed: np.ndarray | None = None
    if codebook is not None:
        allowed = np.unique(_as_bits(codebook.detach().cpu().to(torch.float32).numpy().reshape(-1)))
    coded: list[_Coded] = []
    kept_float = 0
    new_inits = []
    new_nodes = []
    input_names = {i.name for i in g.input}
    shared: dict[tuple[int, int], str] = {}  # (bits, n_per_byte) -> name of the shift constant

    def const(name: str, arr: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    common: dict[str, str] = {}

    def shared_const(key: str, arr: np.ndarray) -> str:
        if key not in common:
            common[key] = const(f"cb/{key}", arr)
        return common[key]

    for init in list(g.initializer):
        if init.data_type != TensorProto.FLOAT or init.name in input_names:
            if init.data_type == TensorProto.FLOAT:
                kept_float += int(np.prod(init.dims)) * 4
            new_inits.append(init)
            continue
        arr = numpy_helper.to_array(init)
        flat_bits = _as_bits(arr.reshape(-1))
        uniq_bits, inverse = np.unique(flat_bits, return_inverse=True)
        ok = arr.size > 0 and uniq_bits.size <= 65536
        if ok and allowed is not None:
            ok = bool(np.isin(uniq_bits, allowed).all())
        bits = index_bits(int(uniq_bits.size)) if ok else 0
        index_bytes = (-(-arr.size * bits // 8)) if ok else 0
        table_bytes = 4 * int(uniq_bits.size)
        if not ok or index_bytes + table_bytes + _NODE_OVERHEAD >= arr.size * 4:
            kept_float += arr.size * 4
            new_inits.append(init)
            continue
        base = f"cb{len(coded)}"  # short names: every byte of the decoder nodes counts
        table = uniq_bits.view(np.float32)
        packed = _pack(inverse.reshape(-1), bits)
        t_name = const(f"{base}/t", table)
        p_name = const(f"{base}/i", packed)
        idx = p_name
        if bits < 8:
            per = 8 // bits
            key = (bits, per)
            if key not in shared:
                shared[key] = const(f"cb/shifts{bits}", (np.arange(per, dtype=np.uint8) * bits)[None, :])
                const(f"cb/mask{bits}", np.array([(1 << bits) - 1], dtype=np.uint8))
            axes = shared_const("axes", np.array([1], dtype=np.int64))
            new_nodes += [
                helper.make_node("Unsqueeze", [p_name, axes], [f"{base}/c"]),
                helper.make_node("BitShift", [f"{base}/c", shared[key]], [f"{base}/s"], direction="RIGHT"),
                helper.make_node("BitwiseAnd", [f"{base}/s", f"cb/mask{bits}"], [f"{base}/f"]),
                helper.make_node("Reshape", [f"{base}/f", shared_const("flat", np.array([-1], np.int64))],
                                 [f"{base}/a"]),
                helper.make_node("Slice", [f"{base}/a", shared_const("zero", np.array([0], np.int64)),
                                           const(f"{base}/n", np.array([arr.size], np.int64))],
                                 [f"{base}/u"]),
            ]
            idx = f"{base}/u"
        new_nodes += [
            helper.make_node("Cast", [idx], [f"{base}/x"], to=TensorProto.INT32),
            helper.make_node("Gather", [t_name, f"{base}/x"], [f"{base}/v"], axis=0),
            helper.make_node("Reshape", [f"{base}/v", const(f"{base}/shape", np.array(arr.shape, np.int64))],
                             [init.name]),
        ]
        coded.append(_Coded(init.name, tuple(arr.shape), int(uniq_bits.size), bits, int(packed.nbytes),
                            table_bytes, arr.size * 4))
    del g.initializer[:]
    g.initializer.extend(new_inits)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + old_nodes)  # decoders first: the graph stays topologically sorted
    _set_opset(model, OPSET)
    out = model.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(out))
    info = {
        "coded_tensors": len(coded),
        "index_bytes": sum(c.index_bytes for c in coded),
        "table_bytes": sum(c.table_bytes for c in coded),
        "coded_fp32_bytes": sum(c.float_bytes for c in coded),
        "float_bytes": kept_float,
        "tensors": {c.name: {"shape": list(c.shape), "table": c.table, "bits": c.bits,
                             "index_bytes": c.index_bytes} for c in coded},
    }
    return out, info


def _set_opset(model: Any, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version > version:
                raise OnnxTargetError(f"the exported model needs opset {imp.version} > {version}")
            imp.version = version
            return
    model.opset_import.add(domain="", version=version)


def decode_weights(data: bytes) -> dict[str, np.ndarray]:
    """Every weight of a codebook ONNX model as onnxruntime decodes it (name -> array)."""
    import onnx
    import onnxruntime
    from onnx import helper

    model = onnx.load_from_string(data)
    names = [n.output[0] for n in model.graph.node
             if n.op_type == "Reshape" and n.input[0].startswith("cb") and n.input[0].endswith("/v")]
    if not names:
        return {}
    for name in names:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in _dims(i)],
                              dtype=_np_type(i.type)) for i in sess.get_inputs()}
    outs = sess.run(names, feeds)
    return dict(zip(names, outs))


def _dims(inp: Any) -> list[Any]:
    return list(inp.shape)


def _np_type(t: str) -> Any:
    return {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(t, np.float32)


def _torch_onnx(model: nn.Module, example: Tensor) -> bytes:
    kwargs: dict[str, Any] = dict(
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,  # folding would merge e.g. BatchNorm into weights: off the codebook
    )
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter needs no onnxscript and writes one file
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, **kwargs)
    return buf.getvalue()


def export_onnx(model: nn.Module, example: Tensor, codebook: Tensor | None = None
                ) -> tuple[bytes, dict[str, Any]]:
    """Codebook ONNX of ``model``, verified; returns (bytes, info).

    Checks, each raising ``OnnxTargetError``: the decoded weights equal the model's bit for
    bit; onnxruntime's outputs equal those of the plain fp32 ONNX export bit for bit; and they
    are within 1e-4 (+1e-4 relative) of torch. Needs onnx and onnxruntime.
    """
    import onnxruntime

    model = copy.deepcopy(model).eval()  # never change the caller's model (mode, buffers)
    try:
        plain = _torch_onnx(model, example)
        data, info = codebook_onnx(plain, codebook)
        sess = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        ref_sess = onnxruntime.InferenceSession(plain, providers=["CPUExecutionProvider"])
    except PwfnError:
        raise
    except Exception as exc:  # exporter/runtime errors come in many types
        raise OnnxTargetError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc

    import onnx
    from onnx import numpy_helper

    originals = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(plain).graph.initializer}
    for name, arr in decode_weights(data).items():
        if arr.shape != originals[name].shape or not np.array_equal(_as_bits(arr), _as_bits(originals[name])):
            raise OnnxTargetError(f"ONNX check failed: decoded weight {name!r} differs from the model's")
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    if example.is_floating_point():
        other = torch.randn((5, *example.shape[1:]), generator=g).to(example.dtype)
    else:  # token ids and the like: stay within the example's range
        other = torch.randint(0, int(example.max()) + 1, (5, *example.shape[1:]), generator=g).to(example.dtype)
    for x in (example, other):
        with torch.no_grad():
            ref = model(x).detach().to(torch.float32)
        got = sess.run(None, {"input": x.numpy()})[0]
        plain_out = ref_sess.run(None, {"input": x.numpy()})[0]
        if not np.array_equal(_as_bits(got), _as_bits(plain_out)):
            raise OnnxTargetError("ONNX check failed: the codebook model's outputs differ from the fp32 ONNX "
                                  "model's (they must be bit-identical)")
        got_t = torch.from_numpy(got)
        diff = float((got_t - ref).abs().max()) if ref.numel() else 0.0
        tol = 1e-4 + 1e-4 * float(ref.abs().max() if ref.numel() else 0.0)
        if got_t.shape != ref.shape or not diff <= tol:
            raise OnnxTargetError(
                f"ONNX check failed: onnxruntime output differs from torch (shape {tuple(got_t.shape)} vs "
                f"{tuple(ref.shape)}, max |diff| {diff:.3g} > {tol:.3g})"
            )
        worst = max(worst, diff)
    info.update({
        "bytes": len(data),
        "fp32_onnx_bytes": len(plain),
        "max_abs_diff": worst,
        "bit_identical_to_fp32_onnx": True,
        "weights_bit_identical": True,
        "opset": OPSET,
        "input_shape": list(example.shape),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
    })
    return data, info
