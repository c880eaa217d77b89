"""Fuzzing the loaders: config, checkpoint and packed artefact.

Whatever bytes, YAML documents, overrides, truncations or bit flips they are given, the loaders
either succeed or raise one of the project's own errors (``pwfn.errors.PwfnError``): never a
bare ``ValueError``, ``KeyError``, ``RecursionError``, ``OverflowError`` ... from inside.

Besides blind damage (which checksums catch early), the artefact and checkpoint fuzzers also
*reseal* damaged files (recompute every checksum), so the structural checks behind the
checksums are exercised too.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pwfn.common.io import load_checkpoint, save_checkpoint
from pwfn.errors import PwfnError
from pwfn.export import load_packed_model, packing
from pwfn.model.config import RunConfig, config_to_dict, load_config
from pwfn.model.zoo import create_model
from pwfn.training.train import rng_state

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)
FEW = settings(FUZZ, max_examples=100)

_TMP = Path(tempfile.mkdtemp(prefix="pwfn-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)


def _expect_pwfn_error(fn, *args, **kwargs):
    """Run ``fn``; success is fine, a PwfnError is fine, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except PwfnError:
        return None


# --------------------------------------------------------------------------------------------
# config


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict) and v:
            out += _dotted_keys(v, prefix + k + ".")
    return out


KEYS = _dotted_keys(config_to_dict(RunConfig()))
SECTIONS = ["data", "model", "baseline", "pwfn", "wfn", "pwfn.engine", "wfn.engine"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["pwfn", "wfn", "auto", "cpu", "cuda:0", "bf16", "sgd", "std_mu", "digits", "mlp", "1e-3", ".inf"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def config_documents(draw):
    """Mappings shaped like a config: real keys (nested where they are sections) with arbitrary values."""
    doc: dict = {}
    for key in draw(st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), max_size=6)):
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = draw(values)
    return doc


def _load_text(text: str | bytes, overrides=None):
    path = _TMP / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return _expect_pwfn_error(load_config, path, overrides)


@FUZZ
@given(st.binary(max_size=300))
def test_load_config_on_arbitrary_bytes(data):
    _load_text(data)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("{}[]:,-&*!|>'\"#%@` \n\t?abkpw01.e")), max_size=120))
def test_load_config_on_yaml_like_text(text):
    _load_text(text.encode("utf-8"))


@FUZZ
@given(config_documents())
def test_load_config_on_config_shaped_documents(doc):
    cfg = _load_text(yaml.safe_dump(doc, allow_unicode=True))
    if cfg is not None:  # whatever is accepted is a valid, dumpable config
        assert isinstance(cfg, RunConfig)
        yaml.safe_dump(config_to_dict(cfg))


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS + SECTIONS), st.text(max_size=12)),
                          st.one_of(st.text(max_size=20), values.map(lambda v: yaml.safe_dump(v).strip()))),
                max_size=4),
       st.booleans())
def test_load_config_overrides(pairs, with_equals):
    overrides = [f"{k}={v}" if with_equals or i else f"{k}{v}" for i, (k, v) in enumerate(pairs)]
    _expect_pwfn_error(load_config, None, overrides)


def test_pathological_yaml_is_a_config_error():
    for text in ["[" * 5000, "a: " + "{a: " * 3000, "pwfn: {fractions: [1" + "0" * 400 + "]}",
                 "pwfn: {k: 1" + "0" * 400 + "}", "threads: 1" + "0" * 400, "\x00", "\udcff"]:
        with pytest.raises(PwfnError):
            load_config(_write(text))
    with pytest.raises(PwfnError):
        load_config(None, ["pwfn.k=" + "[" * 5000])
    with pytest.raises(PwfnError):
        load_config(_TMP)  # a folder
    with pytest.raises(PwfnError):
        load_config(str(_TMP / "a\x00b"))


def _write(text: str) -> Path:
    path = _TMP / "p.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


# --------------------------------------------------------------------------------------------
# checkpoint


def _real_checkpoint() -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    payload = {"method": "pwfn", "next_round": 2, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "epoch_counter": 3, "history": [{"round": 0, "top1": 50.0, "codebook": [0.5, -0.25]}],
               "pre_metrics": {}, "rng": rng_state(), "fractions": [0.5, 1.0], "config": config_to_dict(RunConfig())}
    path = _TMP / "real.pt"
    save_checkpoint(path, payload, kind="run-pwfn")
    return path.read_bytes()


CKPT = _real_checkpoint()


def _load_ckpt_bytes(data: bytes, kind: str = "run-pwfn"):
    path = _TMP / "fuzz.pt"
    path.write_bytes(data)
    return _expect_pwfn_error(load_checkpoint, path, kind=kind)


def _reseal_checkpoint(header: dict, body: bytes, fix_sha: bool = True) -> bytes:
    header = dict(header)
    if fix_sha:
        header["sha256"] = hashlib.sha256(body).hexdigest()
        header["size"] = len(body)
    h = json.dumps(header).encode()
    return len(h).to_bytes(4, "little") + h + body


def test_real_checkpoint_loads():
    state = _load_ckpt_bytes(CKPT)
    assert state is not None and state["next_round"] == 2
    np.random.set_state(state["rng"]["numpy"])  # the numpy RNG state survives weights-only loading


@FUZZ
@given(st.binary(max_size=400))
def test_checkpoint_loader_on_random_bytes(data):
    _load_ckpt_bytes(data)


@FUZZ
@given(st.integers(min_value=0, max_value=len(CKPT) - 1))
def test_checkpoint_loader_on_truncations(n):
    assert _load_ckpt_bytes(CKPT[:n]) is None


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(CKPT) - 1), st.integers(0, 7)), min_size=1, max_size=4,
                unique_by=lambda t: t[0]))
def test_checkpoint_loader_on_bit_flips(flips):
    data = bytearray(CKPT)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    assert _load_ckpt_bytes(bytes(data)) is None  # every flip is caught (header or checksum)


_N = int.from_bytes(CKPT[:4], "little")
_HEADER = json.loads(CKPT[4:4 + _N])
_BODY = CKPT[4 + _N:]


@FEW
@given(st.dictionaries(st.sampled_from(["magic", "format", "kind", "sha256", "size", "other"]), values, max_size=3),
       st.booleans())
def test_checkpoint_loader_on_resealed_headers(changes, fix_sha):
    _load_ckpt_bytes(_reseal_checkpoint({**_HEADER, **changes}, _BODY, fix_sha))


@FEW
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(_BODY) - 1), st.binary(min_size=1, max_size=8)).map(
                     lambda t: _BODY[:t[0]] + t[1] + _BODY[t[0] + len(t[1]):])))
def test_checkpoint_loader_on_resealed_bodies(body):
    """A body that passes its checksum but is garbage, or a damaged pickle: still a CheckpointError."""
    _load_ckpt_bytes(_reseal_checkpoint(_HEADER, body))


def test_checkpoint_body_cannot_run_code():
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    buf = io.BytesIO()
    torch.save({"model": Evil()}, buf)
    assert _load_ckpt_bytes(_reseal_checkpoint(_HEADER, buf.getvalue())) is None
    deep = b"[" * 4000
    assert _load_ckpt_bytes(len(deep).to_bytes(4, "little") + deep) is None


# --------------------------------------------------------------------------------------------
# packed artefact


RECIPE = {"name": "mlp", "kwargs": {"in_features": 8, "hidden": [6], "num_classes": 3}}


def _recipe_model() -> nn.Module:
    return create_model(RECIPE["name"], **RECIPE["kwargs"])


def _real_artefact() -> bytes:
    """A small artefact with every coding: ANS-coded and constant quantised tensors, a raw tensor."""
    torch.manual_seed(0)
    codebook = torch.tensor([-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 0.75])
    quantised = ["net.1.weight", "net.1.bias", "net.3.weight"]
    state = _recipe_model().state_dict()
    with torch.no_grad():
        for name in quantised:
            state[name].copy_(codebook[torch.randint(0, len(codebook), state[name].shape)])
        state["net.1.bias"].fill_(0.25)  # a 'const' tensor; net.3.bias stays raw
    meta = {"pwfn_export": 1, "recipe": RECIPE, "unfixed": None}
    return packing.pack(state, quantised, codebook=codebook, metadata=meta)


ART = _real_artefact()
_H = packing._HEADER


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, slen, mlen, _ = _H.unpack_from(data, 0)
    manifest = json.loads(zlib.decompress(data[_H.size:_H.size + slen]))
    return manifest, data[_H.size + slen:-32]


def _reseal(manifest, sections: bytes, fix_crcs: bool = False) -> bytes:
    """Re-serialise with every checksum recomputed (optionally the section CRCs too)."""
    if fix_crcs and isinstance(manifest, dict):
        try:
            for sec in packing._sections_of(manifest):
                off, n = sec[1][0], sec[1][1]
                sec[1][2] = packing._crc(sections[off:off + n])
        except Exception:  # a manifest too broken to name its sections: reseal it as it is
            pass
    try:
        mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        mbytes = b"{}"
    stored = zlib.compress(mbytes)
    head = _H.pack(packing.MAGIC, packing.FORMAT_VERSION, len(stored), len(mbytes), hashlib.sha256(stored).digest())
    body = head + stored + sections
    return body + hashlib.sha256(body).digest()


MANIFEST, SECTIONS_BYTES = _split(ART)


def _unpack_and_load(data: bytes):
    """Both loaders on the same bytes: ``unpack`` and ``load_packed_model`` (with and without a model)."""
    pm = _expect_pwfn_error(packing.unpack, data)
    path = _TMP / "fuzz.pwfn"
    path.write_bytes(data)
    loaded = _expect_pwfn_error(load_packed_model, path)
    _expect_pwfn_error(load_packed_model, path, _recipe_model())
    return pm, loaded


def test_real_artefact_round_trips():
    for data in (ART, _reseal(MANIFEST, SECTIONS_BYTES)):  # the resealer itself is faithful
        pm, model = _unpack_and_load(data)
        assert pm is not None and isinstance(model, nn.Module)
    modes = {e["name"]: e["mode"] for e in MANIFEST["tensors"]}
    assert modes["net.1.bias"] == "const" and modes["net.3.bias"] == "raw" and modes["net.1.weight"] in ("ans", "fixed")


@FUZZ
@given(st.binary(max_size=300))
def test_unpack_on_random_bytes(data):
    _unpack_and_load(packing.MAGIC + data if data[:1] == b"\x00" else data)


@FUZZ
@given(st.integers(min_value=0, max_value=len(ART) - 1))
def test_unpack_on_truncations(n):
    assert _unpack_and_load(ART[:n]) == (None, None)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(ART) - 1), st.integers(0, 7)), min_size=1, max_size=4,
                unique_by=lambda t: t[0]))
def test_unpack_on_bit_flips(flips):
    data = bytearray(ART)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    assert _unpack_and_load(bytes(data)) == (None, None)


small_ints = st.one_of(st.integers(-3, 70000), st.sampled_from([2**31, 2**40, 2**62, 2**64, -(2**63)]))
leaf = st.one_of(st.none(), st.booleans(), small_ints, st.floats(allow_nan=False), st.text(max_size=10),
                 st.sampled_from(["own", "ans", "const", "fixed", "empty", "raw", "quantised", "float32", "int64",
                                  "bool", "00000000", "3f800000", "mlp", "lenet5", "split"]))
json_values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(MANIFEST) if p]


def _mutate(manifest, path, op, value):
    m = json.loads(json.dumps(manifest))
    node = m
    for k in path[:-1]:
        node = node[k]
    last = path[-1]
    if op == "delete" and isinstance(node, dict):
        del node[last]
    elif op == "wrap":
        node[last] = [node[last]]
    else:
        node[last] = value
    return m


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "set", "delete", "wrap"]), json_values),
                min_size=1, max_size=3),
       st.booleans())
def test_unpack_on_resealed_manifest_mutations(mutations, fix_crcs):
    manifest = MANIFEST
    for path, op, value in mutations:
        try:
            manifest = _mutate(manifest, path, op, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    _unpack_and_load(_reseal(manifest, SECTIONS_BYTES, fix_crcs))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SECTIONS_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_unpack_on_resealed_data_damage(changes):
    """Garbage symbol tables and ANS streams behind valid CRCs reach the decoders themselves."""
    data = bytearray(SECTIONS_BYTES)
    for pos, byte in changes:
        data[pos] = byte
    _unpack_and_load(_reseal(json.loads(json.dumps(MANIFEST)), bytes(data), fix_crcs=True))


@FEW
@given(json_values, json_values)
def test_load_packed_model_on_resealed_metadata(recipe, unfixed):
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["metadata"] = {"pwfn_export": 1, "recipe": recipe, "unfixed": unfixed}
    _unpack_and_load(_reseal(manifest, SECTIONS_BYTES))


def test_packed_loader_pathological_cases():
    deep = json.loads(json.dumps(MANIFEST))
    deep["metadata"] = {"x": 1}
    text = json.dumps(deep).replace('{"x":1}', "[" * 3000 + "]" * 3000).replace('{"x": 1}', "[" * 3000 + "]" * 3000)
    stored = zlib.compress(text.encode())
    head = _H.pack(packing.MAGIC, packing.FORMAT_VERSION, len(stored), len(text), hashlib.sha256(stored).digest())
    body = head + stored + SECTIONS_BYTES
    assert _unpack_and_load(body + hashlib.sha256(body).digest()) == (None, None)
    huge = json.loads(json.dumps(MANIFEST))
    entry = next(e for e in huge["tensors"] if e.get("mode") == "const")
    entry["shape"] = [2**61]  # a 'const' tensor announcing more elements than memory
    assert _unpack_and_load(_reseal(huge, SECTIONS_BYTES)) == (None, None)
    for metadata in ({"pwfn_export": 1, "recipe": {"name": "mlp", "kwargs": {"hidden": [-1]}}, "unfixed": None},
                     {"pwfn_export": 1, "recipe": RECIPE, "unfixed": [1]},
                     {"pwfn_export": 1, "recipe": {"name": "tv_resnet18", "kwargs": {}}, "unfixed": None},
                     {"pwfn_export": 2, "recipe": RECIPE, "unfixed": None}):
        meta = json.loads(json.dumps(MANIFEST))
        meta["metadata"] = metadata
        pm, model = _unpack_and_load(_reseal(meta, SECTIONS_BYTES))
        assert pm is not None and model is None  # unpack is fine, building the model is refused
        with pytest.raises(PwfnError):
            load_packed_model(_TMP / "fuzz.pwfn")
