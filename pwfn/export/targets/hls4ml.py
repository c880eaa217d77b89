"""hls4ml export: an HLS project whose fixed layers multiply by shifting, checked by C simulation.

Why these steps: hls4ml (1.3, no TensorFlow) converts PyTorch MLPs/CNNs and compiles a C
simulation with g++. Its shift product (``nnet::product::weight_exponential``) is used when a
layer's weight type is an ``ExponentPrecisionType``; the PyTorch front end never produces one,
so the weight variables of the converted layers are replaced through hls4ml's layer API
(``add_weights_variable`` with an exponent quantizer). Two limits shape the design:

- an exponent weight is one signed power of two: a value with several terms is split into
  ``T`` *parallel layers*, layer ``t`` holding every weight's ``t``-th term, summed by ``Add``;
- zero has no exponent code: every weight is written with exactly ``T`` non-zero terms
  (``T >= 2`` when the layer has zeros): a weight with fewer terms has its largest term split
  in halves (``2^e = 2^(e-1) + 2^(e-1)``) until it has ``T``, a zero is ``+2^e - 2^e`` (or
  ``+2^e - 2^(e-1) - 2^(e-1)`` for odd ``T``). All exact in fixed point.

Types are chosen so the arithmetic is exactly the reference shift-add forward
(``pwfn.export.targets.shiftadd``): activations ``ap_fixed<W, I>`` (truncating), products and
partial sums in an accumulator wide enough to be exact, bias exact with ``b`` fractional bits,
and the truncation to ``W, I`` only at each layer's final output. The C simulation must then
equal the reference bit for bit, which ``export_hls4ml`` checks.

A layer goes to the plain ``ap_fixed`` path (weights as exact ``ap_fixed`` with ``b``
fractional bits and hls4ml's ordinary product) when ``mode="fixed"``, or, with
``mode="auto"``, when it would need more than ``max_terms`` parallel layers. That path is
exact too, so the same bit-exact check applies; it reports its multiplications as kept.

Other layers (one entry per kind in :data:`STEPS`, refused by :data:`HLS_KINDS` otherwise):
a BatchNorm is its own layer whose scale and shift are exactly the fixed-point values the
reference rounds them to (``shiftadd.bn_fixed``: the module handed to hls4ml has mean 0,
variance 1, eps 0, so hls4ml's scale and bias are those values), and hls4ml's fusion of a
BatchNorm into the preceding layer is switched off (it would take the weights off the
codebook); average pooling gets an accumulator that holds the window's exact sum; max pooling,
ReLU and reshapes are exact. A feature-map input (N, C, ...) enters the project channels-last.

Needs the ``hls4ml`` extra and a C++ compiler (g++) for the C simulation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ...common.hints import install_hint
from ...errors import PwfnError
from .graph import trace
from .hls4ml_program import HLS_KINDS, STEPS, Hls4mlError, check_model, fill_terms, split_model
from .shiftadd import FixedPoint, ShiftAddNet, calibrate

__all__ = ["HLS_KINDS", "STEPS", "Hls4mlError", "check_model", "export_hls4ml", "fill_terms", "split_model"]

log = logging.getLogger(__name__)

_EXP_WIDTH = 8  # bits of the signed exponent field of an exponent weight


def _fixed_type(width: int, integer: int) -> str:
    return f"ap_fixed<{width},{integer}>"


def _int_bits(max_abs: float) -> int:
    """Integer bits (with sign) that hold +-max_abs."""
    return max(1, math.floor(math.log2(max_abs)) + 2) if max_abs > 0 else 1


def export_hls4ml(
    model: nn.Module,
    example: Tensor,
    *,
    b: int = 7,
    signed_terms: bool = False,
    fixed_point: FixedPoint | None = None,
    frac_bits: int = 12,
    mode: str = "auto",
    max_terms: int = 4,
    check_inputs: Tensor | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Write, compile (g++) and check the hls4ml project; returns (tar.gz of the project, info).

    The C simulation's outputs on ``example`` (and ``check_inputs``) must equal the reference
    shift-add forward bit for bit (``Hls4mlError`` otherwise).
    """
    try:
        import hls4ml
        from hls4ml.model.quantizers import Quantizer
        from hls4ml.model.types import ExponentPrecisionType, ExponentWeightVariable
    except ImportError as exc:
        raise Hls4mlError(
            f"hls4ml export needs the 'hls4ml' extra ({exc.name or exc} is not installed): {install_hint('hls4ml')}"
        ) from exc
    if shutil.which("g++") is None:
        raise Hls4mlError("hls4ml's C simulation needs a C++ compiler: g++ is not on PATH")

    class _Pow2(Quantizer):
        """Passes exact powers of two through; its type makes hls4ml use the shift product."""

        def __init__(self) -> None:
            super().__init__(_EXP_WIDTH, ExponentPrecisionType(width=_EXP_WIDTH, signed=True))

        def __call__(self, data: Any) -> Any:
            return np.asarray(data, dtype=np.float32)

    class _ExpVar(ExponentWeightVariable):
        """hls4ml's exponent weight variable, iterable under numpy 2 (np.product is gone)."""

        def __iter__(self) -> Any:
            data = self._format()
            self._iterator = iter(data.reshape((int(np.prod(data.shape[:-1])), 2)))
            return self

    model = copy.deepcopy(model).eval()
    xs = example if check_inputs is None else torch.cat([example, check_inputs])
    xs = xs.to(torch.float32)
    fp = fixed_point or calibrate(model, xs, frac_bits=frac_bits, headroom_bits=2)
    prog, plan = split_model(model, b=b, signed_terms=signed_terms, mode=mode, max_terms=max_terms,
                             example=example[:1])  # refuses a layer it cannot take before any work
    ref = ShiftAddNet(model, b=b, fixed_point=fp, signed_terms=signed_terms, example=example[:1])
    expected = ref(xs).numpy()
    fixed_plan = {q: p for q, p in plan.items() if p["path"] in ("exponent", "fixed")}

    act = _fixed_type(fp.width, fp.int_bits)
    # exact accumulator: enough fractional bits for every shifted term / weight, integer bits
    # for the largest possible partial sum of any layer at the activation range
    min_e = min((p["min_exponent"] for p in fixed_plan.values()), default=-b)
    acc_frac = fp.frac_bits + max(b, -min_e)
    peak_sum = 0.0
    for lay in trace(model, example[:1]).fixed():
        w = lay.module.weight.detach().double().reshape(lay.module.weight.shape[0], -1)
        row = float(w.abs().sum(1).max()) * 2.0 ** (fp.int_bits - 1)
        bias = float(lay.module.bias.detach().abs().max()) if lay.module.bias is not None else 0.0
        peak_sum = max(peak_sum, 2 * row + bias)  # split terms may overshoot a weight by at most its size
    acc_int = _int_bits(peak_sum) + 1
    accum = _fixed_type(acc_int + acc_frac, acc_int)
    if acc_int + acc_frac > 120:
        raise Hls4mlError(f"the exact accumulator would need {acc_int + acc_frac} bits; lower frac_bits")

    # a feature-map input (N, C, ...) enters the project channels-last, as hls4ml computes: hls4ml's own
    # input transposition ("full") mishandles several input channels
    conversion = "internal" if example.dim() >= 3 else "full"
    workdir = Path(tempfile.mkdtemp(prefix="pwfn_hls4ml_"))
    try:
        cfg = hls4ml.utils.config_from_pytorch_model(
            prog, input_shape=tuple(example.shape[1:]), granularity="name", backend="Vivado",
            default_precision=act, channels_last_conversion=conversion, transpose_outputs=False)
        layer_cfg = cfg["LayerName"]
        split_of = {m: (qual, p) for qual, p in fixed_plan.items() for m in p["modules"]}
        other_of = {m: p for p in plan.values() if p["path"] not in ("exponent", "fixed") for m in p["modules"]}
        cfg["SkipOptimizers"] = ["fuse_batch_normalization", "fuse_consecutive_batch_normalization"]
        for name, lc in layer_cfg.items():
            prec = lc.setdefault("Precision", {})
            if not isinstance(prec, dict):
                prec = lc["Precision"] = {"result": prec}
            for key in list(prec):
                if prec[key] == "auto":
                    prec[key] = act
            prec["result"] = act
            if name in other_of:
                p = other_of[name]
                if p["path"] == "batchnorm":  # scale and shift exactly as the reference rounds them
                    si, ci = _int_bits(p["scale_max"]), _int_bits(p["shift_max"])
                    prec["scale"] = _fixed_type(si + p["frac_bits"], si)
                    prec["bias"] = _fixed_type(ci + p["frac_bits"], ci)
                elif p["path"] == "avgpool":  # the window's sum exactly, then the division
                    extra = max(1, math.ceil(math.log2(p["area"]))) + 1
                    prec["accum"] = _fixed_type(fp.width + extra, fp.int_bits + extra)
            if name in split_of:
                qual, p = split_of[name]
                mod = getattr(prog, name)
                wmax = float(mod.weight.detach().abs().max())
                prec["weight"] = _fixed_type(_int_bits(wmax) + max(b, -p["min_exponent"]), _int_bits(wmax))
                if getattr(mod, "bias", None) is not None:
                    bmax = float(mod.bias.detach().abs().max())
                    prec["bias"] = _fixed_type(_int_bits(bmax) + b, _int_bits(bmax))
                else:
                    prec["bias"] = _fixed_type(b + 1, 1)
                prec["accum"] = accum
                if p["path"] == "exponent" and p["terms"] > 1:
                    prec["result"] = accum  # exact partial sums; truncation after the last Add
        # Add nodes in creation order: the split sums' inner adds stay exact
        add_names = [n.name for n in fx.symbolic_trace(prog).graph.nodes
                     if n.op == "call_function" and "add" in str(n.target)]
        if len(add_names) != len(prog.add_roles):
            raise Hls4mlError("internal error: cannot match the traced additions")
        for name, role in zip(add_names, prog.add_roles):
            if name in layer_cfg:
                layer_cfg[name].setdefault("Precision", {})["result"] = accum if role == "inter" else act
        with _quiet():
            hm = hls4ml.converters.convert_from_pytorch_model(
                prog, hls_config=cfg, output_dir=str(workdir / "prj"), backend="Vivado", io_type="io_parallel")
        from hls4ml.backends import get_backend
        from hls4ml.backends.vivado.passes.transform_types import TransformTypes
        from hls4ml.model.optimizer import get_optimizer

        tt = TransformTypes()  # the backend pass already ran: give the new variable the same treatment
        templates = [get_optimizer(n) for n in get_backend("Vivado")._get_layer_templates()]
        n_exp = 0
        for layer in hm.get_layers():
            if layer.name in split_of and split_of[layer.name][1]["path"] == "exponent":
                # the existing variable's data: hls4ml's layout (transposed by its channels-last pass)
                data = np.asarray(layer.weights["weight"].data, dtype=np.float32)
                var = _ExpVar("w{index}", type_name="weight{index}_t", precision=_Pow2().hls_type,
                              data=data, quantizer=_Pow2(), index=layer.index)
                var.data_unquantized = data
                layer.set_attr("weight", var)
                var = tt.weight_var_converter.convert(layer.weights["weight"])
                layer.set_attr("weight", var)
                for tmpl in templates:  # the templates already ran: regenerate this layer's C++
                    if tmpl.match(layer):
                        tmpl.transform(hm, layer)
                n_exp += 1
        with _quiet():
            hm.write()
            _patch_exponent_loading(workdir / "prj")
            hm._compile()  # compile() would write the project again, undoing the patch
            feed = xs.permute(0, *range(2, xs.dim()), 1) if conversion == "internal" else xs
            got = np.asarray(hm.predict(np.ascontiguousarray(feed.numpy())), dtype=np.float64)
        got = got.reshape(expected.shape)
        if not np.array_equal(got, expected):
            worst = float(np.abs(got - expected).max())
            raise Hls4mlError(f"hls4ml C simulation differs from the reference shift-add forward (max |diff| "
                              f"{worst:.3g}, activation ulp {fp.ulp:.3g})")
        with torch.no_grad():
            float_out = model(xs).double().numpy()
        products = _product_kinds(workdir / "prj")
        data = _tar(workdir / "prj")
    except PwfnError:
        raise
    except Exception as exc:  # hls4ml's and g++'s own failures: one clear error, nothing written
        raise Hls4mlError(f"hls4ml could not convert, compile or simulate the model ({type(exc).__name__}: "
                          f"{str(exc)[:500]}); the onnx and tflm targets take it in float") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    counts = ref.operation_counts(tuple(example.shape[1:]))
    kept = sum(counts["per_layer"][q]["macs"] for q, p in fixed_plan.items() if p["path"] == "fixed")
    # a BatchNorm's scale is a product per value, a pooling window that is not a power of two a division
    kept += counts["total"]["scale_multiplications"] + counts["total"]["divisions"]
    info = {
        "bytes": len(data),
        "fixed_point": {"activation": act, "accumulator": accum, "frac_bits": fp.frac_bits, "width": fp.width},
        "layers": {q: {"path": p["path"], "parallel_layers": p["terms"] or 1} for q, p in fixed_plan.items()},
        "other_layers": {q: {k: v for k, v in p.items() if k != "modules"} for q, p in plan.items()
                         if q not in fixed_plan},
        "scale_multiplications": counts["total"]["scale_multiplications"],
        "divisions": counts["total"]["divisions"],
        "exponent_layers": n_exp,
        "products": products,
        "bit_identical_to_reference": True,
        "input_layout": "channels last (N, ..., C)" if conversion == "internal" else "as torch's",
        "samples_checked": int(xs.shape[0]),
        "max_abs_diff_to_float": float(np.abs(got - float_out).max()) if got.size else 0.0,
        "error_bound": ref.error_bound(),
        "macs": counts["total"]["macs"],
        "multiplications_left": kept,
        "hls4ml": hls4ml.__version__,
    }
    return data, info


class _quiet:
    """Silence hls4ml's prints (it writes progress to stdout) while keeping errors."""

    def __enter__(self) -> None:
        self._buf = io.StringIO()
        self._ctx = contextlib.redirect_stdout(self._buf)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        if exc[0] is not None:
            log.warning("hls4ml output:\n%s", self._buf.getvalue()[-4000:])


_LOADER = r"""
// pwfn: the C simulation reads weights from text files, and hls4ml has no reader for its
// exponent (power-of-two) weight structs; their text form is "{sign, exponent}, ...".
#ifndef __SYNTHESIS__
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
template <class T, size_t SIZE> void pwfn_load_exponent_weights(T *w, const char *fname) {
    std::string full_path = std::string(WEIGHTS_DIR) + "/" + std::string(fname);
    std::ifstream infile(full_path.c_str(), std::ios::binary);
    if (infile.fail()) {
        std::cerr << "ERROR: file " << std::string(fname) << " does not exist" << std::endl;
        exit(1);
    }
    std::stringstream buffer;
    buffer << infile.rdbuf();
    const std::string text = buffer.str();
    size_t i = 0, pos = 0;
    while (i < SIZE) {
        size_t open = text.find('{', pos);
        size_t close = text.find('}', open);
        if (open == std::string::npos || close == std::string::npos) break;
        const std::string item = text.substr(open + 1, close - open - 1);
        const size_t comma = item.find(',');
        w[i].sign = std::strtod(item.substr(0, comma).c_str(), nullptr) != 0.0 ? 1 : 0;
        w[i].weight = std::strtol(item.substr(comma + 1).c_str(), nullptr, 10);
        ++i;
        pos = close + 1;
    }
    if (i != SIZE) {
        std::cerr << "ERROR: expected " << SIZE << " values in " << std::string(fname) << ", but read only " << i
                  << std::endl;
        exit(1);
    }
}
#endif
"""


def _patch_exponent_loading(prj: Path) -> None:
    """Let the C simulation load exponent weights (see ``_LOADER``)."""
    path = prj / "firmware" / "myproject.cpp"
    text = path.read_text()
    new, n = re.subn(r"nnet::load_weights_from_txt<(exponent_\w+),\s*(\d+)>", r"pwfn_load_exponent_weights<\1, \2>",
                     text)
    if n:
        anchor = '#include "parameters.h"\n'
        if anchor not in new:
            raise Hls4mlError("unexpected hls4ml project layout: myproject.cpp does not include parameters.h")
        new = new.replace(anchor, anchor + _LOADER, 1)
        path.write_text(new)


def _product_kinds(prj: Path) -> dict[str, int]:
    """How many layer configs in the generated firmware use each product implementation."""
    text = (prj / "firmware" / "parameters.h").read_text(errors="replace")
    out: dict[str, int] = {}
    for kind in ("weight_exponential", "mult"):
        out[kind] = text.count(f"nnet::product::{kind}<")
    return out


def _tar(prj: Path) -> bytes:
    """The project as tar.gz, without build outputs (objects, shared libraries)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(prj.rglob("*")):
            if path.is_file() and path.suffix not in (".so", ".o") and "__pycache__" not in path.parts:
                info = tar.gettarinfo(str(path), arcname=str(Path("hls4ml_prj") / path.relative_to(prj)))
                info.mtime = 0  # reproducible archive
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    return buf.getvalue()
