"""ONNX export with the weights stored as bit-packed codebook indices, decoded in the graph.

Why: an ONNX file with fp32 initializers is as large as the fp32 model, although a fixed
network has only K distinct weight values. Here every weight tensor whose values all lie on the
codebook (by default: any float initializer with few distinct values, checked bit for bit) is
replaced by its indices into a table of the values it uses:

- its indices at ``k_t = ceil(log2 K_t) <= k = ceil(log2 K)`` bits each (K_t: the values it
  holds), packed least significant bit first into a uint8 stream, one stream per width (a
  tensor may take a wider width to share a stream: :func:`_choose_widths`): at most about
  ``N k / 8`` bytes for N weights, below one byte a weight, i.e. below int8, whenever K <= 128;
- the values its indices point at: the codebook's K values, once (4 K bytes), for tensors at the
  full width ``k``, or a table of its own K_t values for a narrower tensor;
- a few standard ONNX nodes that unpack them (opset 18, all run by onnxruntime's CPU provider),
  one chain per width: ``Range`` (the weight positions), ``Mul``/``Div``/``Mod`` (bit offset ->
  byte and shift), ``Gather`` of two or three bytes, ``Cast``/``BitShift``/``BitwiseOr`` (a 16-
  or 24-bit window), ``BitShift`` right + ``BitwiseAnd`` (the index), ``Split`` per tensor, then
  per tensor ``Gather`` from its table and ``Reshape`` to its shape, named as the initializer it
  replaces.

All of it depends on constants only, so onnxruntime folds it once when the session is created;
inference then runs on the decoded float32 weights. The decoded weights are bit-identical to
the point model's (checked by exposing them as extra outputs of a verification copy), so
onnxruntime's outputs are bit-identical to those of the plain fp32 ONNX export of the same
model (checked), and within float rounding of torch. Models of any architecture work: the
rewriting is by content, not by layer type or name.

Needs the ``onnx`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import PwfnError

__all__ = ["OPSET", "OnnxTargetError", "codebook_onnx", "decode_weights", "export_onnx", "index_bits",
           "pack_bits", "unpack_bits"]

log = logging.getLogger(__name__)

OPSET = 18
#: name prefix of the nodes that output a decoded weight (what decode_weights exposes)
_OUT = "pwfn/w"
#: prefix of the decoder's own tensors and nodes (short: every byte of a small model counts)
_P = "d/"
#: protobuf bytes one unpacking chain (one index width) adds, about: what a width must save to get its own
_CHAIN_BYTES = 600
#: without a codebook, a tensor joins the table when it holds at most this many distinct values ...
_MAX_TENSOR_VALUES = 256
#: ... and at least this many weights per distinct value (a quantised tensor, not a float one)
_MIN_REUSE = 4


class OnnxTargetError(PwfnError, ValueError):
    """The ONNX export or its check failed."""


def index_bits(table_size: int) -> int:
    """Bits per stored index for a table of ``table_size`` values: ``max(1, ceil(log2 K))``, at most 16."""
    if table_size <= 0 or table_size > 65536:
        raise OnnxTargetError(f"a table of {table_size} values cannot be indexed")
    return max(1, (table_size - 1).bit_length())


def pack_bits(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (< 2^bits) -> uint8 stream, ``bits`` bits each, least significant bit first."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << bits):
        raise OnnxTargetError(f"an index does not fit {bits} bits")
    planes = ((idx[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(stream: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits` in numpy (what the ONNX nodes compute)."""
    planes = np.unpackbits(np.asarray(stream, dtype=np.uint8), bitorder="little")[: n * bits]
    return (planes.reshape(n, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


def _as_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _choose(g: Any, allowed: np.ndarray | None, input_names: set[str]) -> tuple[list[Any], np.ndarray]:
    """The float32 initializers to code and the table (uint32 bits, sorted) they index."""
    from onnx import TensorProto, numpy_helper

    chosen, values = [], []
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in input_names:
            continue
        bits = np.unique(_as_bits(numpy_helper.to_array(init).reshape(-1)))
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        if n == 0:
            continue
        if allowed is not None:
            if not bool(np.isin(bits, allowed).all()):
                continue
        elif bits.size > _MAX_TENSOR_VALUES or n < _MIN_REUSE * bits.size:
            continue
        chosen.append(init)
        values.append(bits)
    if not chosen:
        return [], np.zeros(0, dtype=np.uint32)
    table = np.unique(np.concatenate(values))
    if table.size > 65536:
        raise OnnxTargetError(f"{table.size} distinct weight values: more than a 16-bit index can address")
    return chosen, table


def _choose_widths(tensors: list[tuple[int, int]]) -> list[int]:
    """The index widths to unpack: each width costs one chain of nodes (:data:`_CHAIN_BYTES`), so a
    tensor may use a wider width than its own ``ceil(log2 K_t)`` to share one; the set of widths with
    the fewest bytes in all (the largest width is always in it)."""
    import itertools

    own = sorted({k for _, k in tensors})
    top, rest = own[-1], own[:-1]
    best: tuple[int, list[int]] | None = None
    for r in range(len(rest) + 1):
        for extra in itertools.combinations(rest, r):
            ws = sorted({*extra, top})
            cost = _CHAIN_BYTES * len(ws) + sum(-(-n * min(w for w in ws if w >= k) // 8) for n, k in tensors)
            if best is None or cost < best[0]:
                best = (cost, ws)
    assert best is not None
    return best[1]


def codebook_onnx(data: bytes, codebook: Tensor | None = None) -> tuple[bytes, dict[str, Any]]:
    """Rewrite an ONNX model's float32 initializers as one value table + packed indices (see the module note).

    With ``codebook`` the tensors whose every value is (bitwise) a codebook value are coded;
    without it every float32 initializer with at most 256 distinct values, each used 4 times
    or more on average. The rewrite is kept only when it makes the file smaller. Returns the
    new bytes and statistics (index bits, stream, table and float bytes, coded tensors).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(data)
    g = model.graph
    allowed: np.ndarray | None = None
    if codebook is not None:
        allowed = np.unique(_as_bits(codebook.detach().cpu().to(torch.float32).numpy().reshape(-1)))
    chosen, table = _choose(g, allowed, {i.name for i in g.input})
    float_bytes = sum(4 * int(np.prod(i.dims) if len(i.dims) else 1) for i in g.initializer
                      if i.data_type == TensorProto.FLOAT) - sum(4 * int(np.prod(i.dims)) for i in chosen)
    info: dict[str, Any] = {"coded_tensors": 0, "index_bits": None, "table_values": int(table.size),
                            "index_bits_global": index_bits(int(table.size)) if table.size else None,
                            "index_bytes": 0, "table_bytes": 0, "coded_weights": 0, "coded_fp32_bytes": 0,
                            "float_bytes": float_bytes + sum(4 * int(np.prod(i.dims)) for i in chosen),
                            "tensors": {}}
    if not chosen:
        _set_opset(model, OPSET)
        return model.SerializeToString(), info
    # each tensor indexes its own table (the codebook values it uses) at ceil(log2 K_t) <= ceil(log2 K)
    # bits; tensors of one width share one bit stream and one unpacking chain
    tensors = []
    for init in chosen:
        arr = numpy_helper.to_array(init)
        bits = _as_bits(arr.reshape(-1))
        own, local = np.unique(bits, return_inverse=True)
        tensors.append({"init": init, "shape": tuple(int(d) for d in arr.shape), "table": own, "values": own.size,
                        "idx": local.reshape(-1), "k": index_bits(int(own.size))})
    widths = _choose_widths([(int(t["idx"].size), t["k"]) for t in tensors])
    k_all = index_bits(int(table.size))
    for t in tensors:
        t["k"] = min(w for w in widths if w >= t["k"])
        if t["k"] >= k_all:  # as wide as the codebook's indices: index the one shared table, no table of its own
            t["k"] = k_all
            t["idx"] = np.searchsorted(table, t["table"])[t["idx"]]
            t["table"] = None
    names = {i.name for i in chosen}
    kept = [i for i in g.initializer if i.name not in names]
    consts: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, arr: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(arr, _P + name))
        return _P + name

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [_P + out], **attrs))
        return _P + out

    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    u32 = TensorProto.UINT32
    const("zero", i64(0))
    const("one", i64(1))
    const("eight", i64(8))
    stream_bytes = 0
    outputs: dict[int, str] = {}
    for k in sorted({t["k"] for t in tensors}):
        group = [i for i, t in enumerate(tensors) if t["k"] == k]
        idx = np.concatenate([tensors[i]["idx"] for i in group])
        window = 3 if k > 9 else 2  # bytes read per index: shift (<= 7) + k bits must fit
        stream = np.concatenate([pack_bits(idx, k), np.zeros(window, dtype=np.uint8)])
        stream_bytes += int(stream.size)
        p = f"k{k}/"
        pos = node("Range", [_P + "zero", const(p + "n", i64(idx.size)), _P + "one"], p + "pos")
        bit = node("Mul", [pos, const(p + "k", i64(k))], p + "bit")
        byte = node("Div", [bit, _P + "eight"], p + "byte")
        shift = node("Cast", [node("Mod", [bit, _P + "eight"], p + "shift64")], p + "shift", to=u32)
        s_name = const(p + "stream", stream)
        word = node("Cast", [node("Gather", [s_name, byte], p + "b0")], p + "w0", to=u32)
        for j in range(1, window):
            bj = node("Gather", [s_name, node("Add", [byte, const(f"{p}off{j}", i64(j))], f"{p}byte{j}")],
                      f"{p}b{j}")
            part = node("BitShift", [node("Cast", [bj], f"{p}c{j}", to=u32),
                                     const(f"{p}sh{j}", np.array(8 * j, np.uint32))], f"{p}p{j}", direction="LEFT")
            word = node("BitwiseOr", [word, part], f"{p}w{j}")
        index = node("BitwiseAnd", [node("BitShift", [word, shift], p + "shifted", direction="RIGHT"),
                                    const(p + "mask", np.array((1 << k) - 1, np.uint32))], p + "index")
        index = node("Cast", [index], p + "index64", to=TensorProto.INT64)
        if len(group) > 1:
            parts = [f"{_P}{p}{i}" for i in group]
            sizes = [int(tensors[i]["idx"].size) for i in group]
            nodes.append(helper.make_node("Split", [index, const(p + "sizes", i64(sizes))], parts, axis=0))
        else:
            parts = [index]
        outputs.update(zip(group, parts))
    shared_table = const("table", table.view(np.float32)) if any(t["table"] is None for t in tensors) else None
    for i, t in enumerate(tensors):
        own = shared_table if t["table"] is None else const(f"t{i}", t["table"].view(np.float32))
        values = node("Gather", [own, outputs[i]], f"v{i}")
        nodes.append(helper.make_node("Reshape", [values, const(f"s{i}", i64(list(t["shape"])))], [t["init"].name],
                                      name=f"{_OUT}{i}"))
    n = sum(int(t["idx"].size) for t in tensors)
    table_bytes = 4 * sum(int(t["table"].size) for t in tensors if t["table"] is not None)
    table_bytes += 4 * int(table.size) if shared_table is not None else 0
    del g.initializer[:]
    g.initializer.extend(kept + consts)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)  # decoders first: the graph stays topologically sorted
    _compact(model)
    _set_opset(model, OPSET)
    out = model.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(out))
    if len(out) >= len(data):  # a tiny model: the decoder costs more than it saves
        model = onnx.load_from_string(data)
        _set_opset(model, OPSET)
        info["not_coded"] = f"coding would not make the file smaller ({len(out):,} >= {len(data):,} bytes)"
        return model.SerializeToString(), info
    info.update({
        "coded_tensors": len(chosen),
        "index_bits": max(t["k"] for t in tensors),
        "index_bits_global": index_bits(int(table.size)),
        "index_bytes": stream_bytes,
        "table_bytes": table_bytes,
        "coded_weights": n,
        "coded_fp32_bytes": 4 * n,
        "float_bytes": float_bytes,
        "bits_per_coded_weight": 8.0 * (stream_bytes + table_bytes) / n,
        "tensors": {t["init"].name: {"shape": list(t["shape"]), "values": int(t["values"]), "bits": t["k"],
                                     "table": "shared" if t["table"] is None else "own"} for t in tensors},
    })
    return out, info


def _compact(model: Any) -> None:
    """Shorter protobuf for the same graph: intermediate activations renamed ``a0, a1, ...``, node names
    (but the decoder's output nodes) and doc strings dropped, optional shape annotations removed.
    Inputs, outputs and weights keep their names; for a small model these names were a large part
    of the file."""
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {i.name for i in g.initializer}
    keep |= {n.output[0] for n in g.node if n.name.startswith(_OUT)}  # decoded weights keep their names
    rename: dict[str, str] = {}
    for node in g.node:
        for out in node.output:
            if out and out not in keep and out not in rename:
                rename[out] = f"a{len(rename)}"
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        if not node.name.startswith(_OUT):
            node.name = ""
        node.doc_string = ""
    del g.value_info[:]
    g.doc_string = ""


def _set_opset(model: Any, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version > version:
                raise OnnxTargetError(f"the exported model needs opset {imp.version} > {version}")
            imp.version = version
            return
    model.opset_import.add(domain="", version=version)


def decode_weights(data: bytes) -> dict[str, np.ndarray]:
    """Every coded weight of a codebook ONNX model as onnxruntime decodes it (name -> array)."""
    import onnx
    import onnxruntime
    from onnx import helper

    model = onnx.load_from_string(data)
    names = [n.output[0] for n in model.graph.node if n.name.startswith(_OUT)]
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
