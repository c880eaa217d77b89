"""The packed artefact: bit-exact round trips, corruption always caught, size near the entropy bound."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwfn.core import metrics as M
from pwfn.errors import ArtefactError
from pwfn.export.packing import (
    FORMAT_VERSION,
    MAGIC,
    PackError,
    pack,
    read_packed,
    size_breakdown,
    unpack,
    write_packed,
)

HEADER = struct.Struct("<8sIQQ32s")  # magic, version, stored manifest, JSON length, sha256


def raw_bytes(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor: bitwise equality, so -0.0 != 0.0 and NaN payloads count."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert raw_bytes(x) == raw_bytes(y), name
        if x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64):
            assert torch.equal(x, y) or bool(torch.isnan(x).any()), name


# A small codebook of sums of powers of two, and a peaked distribution over it.
CB = torch.tensor(
    sorted(
        {0.0} | {s * (2.0**-e) * m for s in (1, -1) for e in range(1, 8) for m in (1, 1.5, 1.25)}
    ),
    dtype=torch.float32,
)


def peaked_indices(n: int, k: int, g: torch.Generator, scale: float = 8.0) -> torch.Tensor:
    p = torch.exp(-torch.arange(k, dtype=torch.float64) / scale)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


def mixed_dict(seed: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Quantised tensors of several float dtypes and shapes, plus raw tensors of many dtypes."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    quantised: set[str] = set()
    q_shapes = [(37, 5), (3, 4, 3, 3), (), (0, 4), (1,), (200,), (8, 8)]
    for i, shape in enumerate(q_shapes):
        n = int(np.prod(shape)) if shape else 1
        sub = CB[torch.randperm(len(CB), generator=g)[: int(rng.integers(1, len(CB) + 1))]]
        vals = sub[torch.randint(0, len(sub), (n,), generator=g)].reshape(shape)
        dtype = [torch.float32, torch.float16, torch.bfloat16, torch.float64][i % 4]
        tensors[f"q{i}.{dtype}"] = vals.to(dtype)
        quantised.add(f"q{i}.{dtype}")
    tensors["q.negzero"] = torch.tensor([-0.0, 0.0, 0.5, -0.0, -0.5])
    quantised.add("q.negzero")
    tensors["q.const"] = torch.full((4, 4), 0.25)
    quantised.add("q.const")
    tensors["bn.running_var"] = torch.rand(16, generator=g) + 0.5
    tensors["bn.num_batches_tracked"] = torch.tensor(17)
    tensors["emb.f16"] = torch.randn(5, 3, generator=g).half()
    tensors["emb.bf16"] = torch.randn(4, generator=g).bfloat16()
    tensors["f64"] = torch.randn(3, 2, generator=g).double()
    tensors["i8"] = torch.randint(-128, 127, (7,), generator=g).to(torch.int8)
    tensors["u8"] = torch.randint(0, 255, (2, 3), generator=g).to(torch.uint8)
    tensors["i16"] = torch.randint(-1000, 1000, (3,), generator=g).to(torch.int16)
    tensors["i32"] = torch.randint(-(2**31), 2**31 - 1, (4,), generator=g, dtype=torch.int64).to(
        torch.int32
    )
    tensors["mask"] = torch.rand(6, generator=g) > 0.5
    tensors["cplx"] = torch.randn(2, dtype=torch.complex64, generator=g)
    tensors["empty"] = torch.empty(0, 3)
    tensors["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    tensors["noncontig"] = torch.arange(12.0).reshape(3, 4).t()
    return tensors, quantised


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_mixed(seed: int) -> None:
    tensors, quantised = mixed_dict(seed)
    data = pack(tensors, quantised, metadata={"model": "demo", "seed": seed})
    back = unpack(data)
    assert_identical(tensors, back.tensors)
    assert back.metadata == {"model": "demo", "seed": seed}
    # The derived codebook is the sorted distinct quantised values, one (+0.0) zero.
    expected = torch.unique(torch.cat([tensors[n].float().reshape(-1) for n in quantised]) + 0.0)
    assert raw_bytes(back.codebook) == raw_bytes(expected)
    modes = {e["name"]: e["mode"] for e in back.manifest["tensors"]}
    assert modes["q.const"] == "const" and modes["q3.torch.float64"] == "empty"
    assert modes["bn.running_var"] == "raw"


def test_given_codebook_terms_and_signed_zero() -> None:
    codebook = torch.tensor([-0.0, 0.5, 0.75, -0.375])
    terms = [[], [[1, -1]], [[1, -1], [1, -2]], [[-1, -2], [-1, -3]]]
    x = torch.tensor([[0.0, -0.0, 0.5], [0.75, -0.375, 0.0]])
    back = unpack(pack({"x": x}, ["x"], codebook=codebook, terms=terms))
    assert raw_bytes(back.tensors["x"]) == raw_bytes(x)  # both zeros keep their sign
    assert raw_bytes(back.codebook) == raw_bytes(codebook)  # codebook unchanged (order, -0.0)
    assert back.terms == [[], [(1, -1)], [(1, -1), (1, -2)], [(-1, -2), (-1, -3)]]
    assert back.manifest["extra_symbols_hex"] == "00000000"


def test_terms_from_a_padded_decomposition() -> None:
    class Decomposition(NamedTuple):  # the shape of pwfn.core.centres.Decomposition
        signs: torch.Tensor
        exponents: torch.Tensor
        orders: torch.Tensor

    codebook = torch.tensor([0.0, 0.75, -0.875])
    dec = Decomposition(
        signs=torch.tensor([[0, 0], [1, 1], [-1, 1]], dtype=torch.int8),
        exponents=torch.tensor([[0, 0], [-1, -2], [0, -3]], dtype=torch.int16),
        orders=torch.tensor([0, 2, 2]),
    )
    x = torch.tensor([0.75, -0.875, 0.0])
    back = unpack(pack({"x": x}, ["x"], codebook=codebook, terms=dec))
    assert back.terms == [[], [(1, -1), (1, -2)], [(-1, 0), (1, -3)]]


def test_degenerate_codebooks() -> None:
    # K = 1: every quantised tensor is constant or empty; no coded sections at all.
    one = {"a": torch.full((3, 3), 0.5), "b": torch.empty(0), "c": torch.tensor(0.5)}
    back = unpack(pack(one, one.keys()))
    assert_identical(one, back.tensors)
    assert back.codebook.tolist() == [0.5] and back.manifest["data_length"] == 0
    # K = 0: nothing quantised, or only empty quantised tensors.
    none = {"w": torch.randn(4), "e": torch.empty(2, 0)}
    assert_identical(none, unpack(pack(none, [])).tensors)
    assert_identical(none, unpack(pack(none, ["e"])).tensors)
    assert unpack(pack({}, [])).tensors == {}


def test_fixed_width_mode_is_used_when_smallest() -> None:
    codebook = torch.tensor([0.0, 0.5, -0.5, 0.25])
    big = torch.zeros(5000)
    big[:10] = 0.5
    small = codebook[torch.arange(64) % 4]  # uniform: 2 bits each, no table beats that
    tensors = {"big": big, "small": small}
    back = unpack(pack(tensors, tensors, codebook=codebook))
    assert {e["name"]: e["mode"] for e in back.manifest["tensors"]}["small"] == "fixed"
    assert_identical(tensors, back.tensors)


def test_pack_rejects_bad_input() -> None:
    x = torch.tensor([0.5, 0.25])
    with pytest.raises(PackError, match="not in the codebook"):
        pack({"x": x}, ["x"], codebook=torch.tensor([0.5]))
    with pytest.raises(ValueError):  # PackError is a ValueError
        pack({"x": x}, ["y"])
    with pytest.raises(PackError, match="floating point"):
        pack({"x": torch.tensor([1, 2])}, ["x"])
    with pytest.raises(PackError, match="NaN"):
        pack({"x": torch.tensor([0.5, float("nan")])}, ["x"])
    with pytest.raises(PackError, match="float32 cannot represent"):
        pack({"x": torch.tensor([0.1], dtype=torch.float64)}, ["x"])
    with pytest.raises(PackError, match="do not sum"):
        pack({"x": x}, ["x"], terms=[[[1, -2]], [[1, -2]]])
    with pytest.raises(PackError, match="entries"):
        pack({"x": x}, ["x"], terms=[[[1, -2]]])
    with pytest.raises(PackError, match="repeated"):
        pack({"x": x}, ["x"], codebook=torch.tensor([0.5, 0.25, 0.5]))
    with pytest.raises(PackError, match="JSON"):
        pack({"x": x}, ["x"], metadata={"bad": object()})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(0, 6), max_size=3), min_size=1, max_size=4),
    k=st.integers(1, len(CB)),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(shapes: list[list[int]], k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sub = CB[torch.randperm(len(CB), generator=g)[:k]]
    tensors = {}
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape)) if shape else 1
        idx = peaked_indices(n, k, g, scale=1 + seed % 5) if n else torch.empty(0, dtype=torch.long)
        tensors[f"t{i}"] = sub[idx].reshape(shape)
    tensors["raw"] = torch.randn(3, generator=g)
    back = unpack(pack(tensors, [f"t{i}" for i in range(len(shapes))]))
    assert_identical(tensors, back.tensors)


def test_write_and_read_atomically(tmp_path) -> None:
    tensors, quantised = mixed_dict(7)
    path = tmp_path / "model.pwfn"
    n = write_packed(path, tensors, quantised, metadata={"v": 1})
    assert path.stat().st_size == n
    assert_identical(tensors, read_packed(path).tensors)
    before = path.read_bytes()
    with pytest.raises(PackError):  # a failed pack leaves the old file and no temp file
        write_packed(path, {"x": torch.tensor([0.3])}, ["x"], codebook=torch.tensor([0.5]))
    assert path.read_bytes() == before
    write_packed(path, {"x": torch.tensor([0.5])}, ["x"])  # overwrite in place
    assert read_packed(path).tensors["x"].tolist() == [0.5]
    assert sorted(os.listdir(tmp_path)) == ["model.pwfn"]


# --------------------------------------------------------------------------- corruption


def _small_artefact() -> bytes:
    """A few-KB artefact with every section kind: shared table, own table, fixed, const, raw."""
    g = torch.Generator().manual_seed(3)
    codebook = torch.tensor([0.0, 0.5, -0.5, 0.25])
    big = torch.zeros(3000)
    big[:300] = 0.5
    other = codebook[peaked_indices(800, 4, g, scale=0.7)]
    other2 = codebook[peaked_indices(700, 4, g, scale=0.8)]
    skewed = torch.full((1500,), -0.5)
    skewed[:200] = 0.25
    tensors = {
        "big": big,
        "other": other,
        "other2": other2,
        "skewed": skewed,
        "small": codebook[torch.arange(64) % 4],
        "const": torch.full((5,), 0.25),
        "bn.var": torch.rand(8, generator=g),
    }
    quantised = [n for n in tensors if n != "bn.var"]
    data = pack(tensors, quantised, codebook=codebook, metadata={"k": "v"})
    return data


SMALL = _small_artefact()
SMALL_TENSORS = unpack(SMALL).tensors


def test_small_artefact_has_every_section_kind() -> None:
    m = unpack(SMALL).manifest
    modes = {(e["mode"], e.get("table")) for e in m["tensors"]}
    assert {("ans", 0), ("ans", "own"), ("fixed", None), ("const", None), ("raw", None)} <= modes


def _expect_artefact_error(data: bytes) -> str:
    try:
        back = unpack(data)
    except ArtefactError as exc:
        return str(exc)
    # Only acceptable if nothing changed at all (never wrong weights).
    assert_identical(SMALL_TENSORS, back.tensors)
    raise AssertionError("corrupted artefact was accepted")


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(SMALL) - 1), st.integers(1, 255)), min_size=1, max_size=4
    )
)
def test_any_byte_flip_raises_artefact_error(flips: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL)
    for pos, mask in flips:
        data[pos] ^= mask
    if bytes(data) == SMALL:  # flips that cancel out leave a valid file
        return
    _expect_artefact_error(bytes(data))


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(SMALL) - 1))
def test_any_truncation_raises_artefact_error(cut: int) -> None:
    msg = _expect_artefact_error(SMALL[:cut])
    assert "truncated" in msg or "bad magic" in msg


@settings(max_examples=50, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_appended_bytes_raise_artefact_error(extra: bytes) -> None:
    _expect_artefact_error(SMALL + extra)


def test_error_messages_name_the_problem() -> None:
    assert "bad magic" in _expect_artefact_error(b"NOTPWFN!" + SMALL[8:])
    assert "truncated" in _expect_artefact_error(b"")
    assert "truncated" in _expect_artefact_error(SMALL[:4])
    assert "truncated" in _expect_artefact_error(SMALL[:-1])
    # Version mismatch is reported before any checksum.
    bumped = bytearray(SMALL)
    struct.pack_into("<I", bumped, 8, FORMAT_VERSION + 1)
    assert f"unsupported version {FORMAT_VERSION + 1}" in _expect_artefact_error(bytes(bumped))
    # A flipped byte inside a tensor's data names that section.
    m = unpack(SMALL).manifest
    start = HEADER.size + HEADER.unpack_from(SMALL, 0)[2]
    for e in m["tensors"]:
        if "data" in e and e["data"][1]:
            bad = bytearray(SMALL)
            bad[start + e["data"][0]] ^= 0x01
            msg = _expect_artefact_error(bytes(bad))
            assert f"checksum mismatch in section data of tensor {e['name']!r}" in msg
    bad = bytearray(SMALL)
    bad[HEADER.size + 3] ^= 0x10
    assert "checksum mismatch in section manifest" in _expect_artefact_error(bytes(bad))
    bad = bytearray(SMALL)
    bad[-1] ^= 0x10
    assert "whole-file" in _expect_artefact_error(bytes(bad))


def _resign(manifest: dict, data_area: bytes, version: int = FORMAT_VERSION) -> bytes:
    """Build a file with valid checksums around an arbitrary (possibly wrong) manifest."""
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    stored = zlib.compress(mbytes)
    head = HEADER.pack(MAGIC, version, len(stored), len(mbytes), hashlib.sha256(stored).digest())
    body = head + stored + data_area
    return body + hashlib.sha256(body).digest()


def _parts(data: bytes) -> tuple[dict, bytes]:
    slen = HEADER.unpack_from(data, 0)[2]
    manifest = json.loads(zlib.decompress(data[HEADER.size : HEADER.size + slen]))
    return manifest, data[HEADER.size + slen : -32]


def test_well_signed_but_wrong_manifests_raise_artefact_error() -> None:
    manifest, area = _parts(SMALL)
    assert_identical(SMALL_TENSORS, unpack(_resign(manifest, area)).tensors)

    def mutated(fn) -> str:
        m = json.loads(json.dumps(manifest))
        fn(m)
        return _expect_artefact_error(_resign(m, area))

    by_name = {e["name"]: i for i, e in enumerate(manifest["tensors"])}

    def entry(m: dict, name: str) -> dict:
        return m["tensors"][by_name[name]]

    # Wrong weights that decode fine are caught by the per-tensor value checksum.
    assert "checksum" in mutated(lambda m: entry(m, "const").update(symbol=1))
    assert "checksum" in mutated(  # a value no other entry holds (1.75): decodes, fails its checksum
        lambda m: m["codebook"].update(bits_hex="3fe00000" + m["codebook"]["bits_hex"][8:])
    )
    # a value the codebook already holds (0.5) is refused before decoding
    assert "twice" in mutated(
        lambda m: m["codebook"].update(bits_hex="3f000000" + m["codebook"]["bits_hex"][8:])
    )
    mutated(lambda m: entry(m, "big").update(shape=[2999]))
    mutated(lambda m: entry(m, "big").update(shape=[-1]))
    mutated(lambda m: entry(m, "small").update(width=7))
    mutated(lambda m: entry(m, "bn.var").update(dtype="float64"))
    mutated(lambda m: entry(m, "bn.var").update(dtype="no_such_type"))
    mutated(lambda m: entry(m, "other").update(mode="lzma"))
    mutated(lambda m: entry(m, "other").update(table=5))
    mutated(lambda m: entry(m, "other").pop("data"))
    mutated(lambda m: m["tensors"].append(m["tensors"][0]))
    mutated(lambda m: m.update(tables=[]))
    mutated(lambda m: m.update(data_length=m["data_length"] + 1))
    mutated(lambda m: m["codebook"].update(bits_hex="zz"))
    mutated(lambda m: m["codebook"].update(terms=[[["a"]]]))
    mutated(lambda m: m.pop("codebook"))
    mutated(lambda m: m.update(metadata=[1]))
    assert "unsupported version" in mutated(lambda m: m.update(format_version=FORMAT_VERSION + 1))
    assert "unsupported version 9" in _expect_artefact_error(_resign(manifest, area, version=9))
    # A manifest that is not a JSON object at all.
    bad = json.dumps([1, 2]).encode()
    assert "malformed manifest" in _expect_artefact_error(_signed_stored(zlib.compress(bad), len(bad)))


def _signed_stored(stored: bytes, json_len: int, area: bytes = b"") -> bytes:
    """A file with valid checksums around arbitrary stored manifest bytes."""
    head = HEADER.pack(MAGIC, FORMAT_VERSION, len(stored), json_len, hashlib.sha256(stored).digest())
    return head + stored + area + hashlib.sha256(head + stored + area).digest()


def test_bad_compressed_manifests_raise_artefact_error() -> None:
    manifest, area = _parts(SMALL)
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    good = zlib.compress(mbytes)
    assert_identical(SMALL_TENSORS, unpack(_signed_stored(good, len(mbytes), area)).tensors)
    # Not zlib at all; the wrong announced length either way; trailing garbage in the stream.
    assert "zlib" in _expect_artefact_error(_signed_stored(b"not zlib", len(mbytes), area))
    for n in (len(mbytes) - 1, len(mbytes) + 1, 0):
        msg = _expect_artefact_error(_signed_stored(good, n, area))
        assert "does not inflate to the announced" in msg
    assert "announced" in _expect_artefact_error(_signed_stored(good + b"xx", len(mbytes), area))
    # A zip bomb: 64 MiB of zeros announced as 10 bytes is refused without inflating it all.
    bomb = zlib.compress(b"0" * (64 << 20), 9)
    t0 = time.perf_counter()
    assert "does not inflate" in _expect_artefact_error(_signed_stored(bomb, 10, area))
    assert time.perf_counter() - t0 < 1.0
    assert "implausible" in _expect_artefact_error(_signed_stored(good, 1 << 40, area))


def test_old_format_version_is_named() -> None:
    old = bytearray(SMALL)
    struct.pack_into("<I", old, 8, 1)
    assert "unsupported version 1: this pwfn reads format version 2" in _expect_artefact_error(
        bytes(old)
    )


def test_pack_error_lives_in_errors() -> None:
    from pwfn import errors
    from pwfn.export import packing

    assert packing.PackError is errors.PackError
    assert issubclass(errors.PackError, errors.PwfnError) and issubclass(errors.PackError, ValueError)


# --------------------------------------------------------------------------- size


def resnet20_like(seed: int = 0, k: int = 100) -> dict[str, torch.Tensor]:
    """~270k weights in 20 tensors drawn from ~100 shared values with a peaked distribution."""
    g = torch.Generator().manual_seed(seed)
    shapes = (
        [(16, 3, 3, 3)]
        + [(16, 16, 3, 3)] * 6
        + [(32, 16, 3, 3)]
        + [(32, 32, 3, 3)] * 5
        + [(64, 32, 3, 3)]
        + [(64, 64, 3, 3)] * 5
        + [(10, 64)]
    )
    # 0 and +-(sums of up to 3 positive power-of-two terms) below 1: a realistic codebook.
    grid = torch.arange(1, 128, dtype=torch.float64)
    terms = M.term_counts(grid / 128)
    mags = (grid[terms <= 3] / 128)[: (k - 1) // 2]
    values = torch.cat([torch.zeros(1, dtype=torch.float64), mags, -mags]).float()
    order = torch.argsort(values.abs())  # small magnitudes most likely
    return {
        f"layer{i}.weight": values[order][
            peaked_indices(int(np.prod(s)), len(values), g, 12.0)
        ].reshape(s)
        for i, s in enumerate(shapes)
    }


def test_size_within_entropy_bound_and_fast() -> None:
    tensors = resnet20_like()
    assert 250_000 < sum(t.numel() for t in tensors.values()) < 290_000
    rep = M.size_report(tensors, set(tensors))
    assert 90 <= rep.codebook_size <= 100
    t0 = time.perf_counter()
    data = pack(tensors, tensors.keys())
    t1 = time.perf_counter()
    back = unpack(data)
    t2 = time.perf_counter()
    assert_identical(tensors, back.tensors)
    bound = rep.quantised_total.entropy_bound_bytes
    assert len(data) <= 1.02 * bound + 8192  # the whole file, headers and manifest included
    parts = size_breakdown(data)
    coded = sum(parts["quantised"].values()) + parts["shared_tables"]
    assert coded <= 1.01 * bound
    assert parts["total"] - coded < 8192
    assert t1 - t0 < 2.0 and t2 - t1 < 2.0


def test_per_tensor_tables_beat_the_global_bound_when_distributions_differ() -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {}
    k = len(CB)
    for i in range(8):
        # Each tensor peaks on its own part of the codebook.
        idx = (peaked_indices(20_000, k, g, scale=2.0 + i) + 5 * i) % k
        tensors[f"w{i}"] = CB[idx]
    rep = M.size_report(tensors, set(tensors))
    parts = size_breakdown(pack(tensors, tensors.keys()))
    coded = sum(parts["quantised"].values()) + parts["shared_tables"]
    assert coded <= rep.quantised_total.entropy_bound_bytes
    assert coded <= 1.01 * rep.quantised_total.per_tensor_entropy_bound_bytes + 100 * len(tensors)
    # And with identical distributions the shared table keeps it at the global bound.
    same = {f"w{i}": CB[peaked_indices(20_000, k, g, scale=6.0)] for i in range(8)}
    rep = M.size_report(same, set(same))
    parts = size_breakdown(pack(same, same.keys()))
    coded = sum(parts["quantised"].values()) + parts["shared_tables"]
    assert coded <= rep.quantised_total.entropy_bound_bytes + 100 + 8 * len(same)


def test_full_resnet20_state_dict_has_small_fixed_overhead() -> None:
    """~120 tensors (BN statistics included): the manifest used to be ~16 KB of JSON."""
    from pwfn.model.zoo import create_model

    g = torch.Generator().manual_seed(0)
    weights = resnet20_like()
    model = create_model("resnet20")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    quantised = [k for k in sd if k.endswith("weight") and sd[k].dim() > 1]
    pool = torch.cat([w.reshape(-1) for w in weights.values()])
    for k in quantised:
        sd[k] = pool[torch.randint(0, len(pool), sd[k].shape, generator=g)]
    data = pack(sd, quantised)
    parts = size_breakdown(data)
    assert len(sd) > 100
    overhead = parts["header"] + parts["manifest"] + parts["trailer"]
    assert overhead < 8192 and parts["manifest"] < 4096
    bound = M.size_report(sd, quantised).quantised_total.entropy_bound_bytes
    coded = sum(parts["quantised"].values()) + parts["shared_tables"]
    assert coded + overhead <= 1.02 * bound + 8192
    assert_identical(sd, unpack(data).tensors)
