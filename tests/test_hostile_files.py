"""Hostile packed artefacts and export files (issue 23): reads bounded by what the file justifies.

A FIFO or a device is refused by name (never opened for reading: it would block or never end);
a self-consistent ``.pwfn`` (valid SHA-256 and CRCs) whose manifest declares tensors far larger
than its bytes can justify is refused before anything is decoded; a codebook must be distinct
finite values whose stored terms sum to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pwfn.errors import ArtefactError
from pwfn.export import load_packed_model, packing
from pwfn.export.packcheck import MAX_EXPANSION, MIN_DECODED_CAP, check_declared_sizes, decoded_cap
from pwfn.tools.inspection import inspect_file


def _parts(data: bytes) -> tuple[dict, bytes]:
    slen = packing._HEADER.unpack_from(data, 0)[2]
    manifest = json.loads(zlib.decompress(data[packing._HEADER.size: packing._HEADER.size + slen]))
    return manifest, data[packing._HEADER.size + slen: -32]


def _forge(manifest: dict, area: bytes) -> bytes:
    """A file with every checksum valid around an arbitrary manifest (what an attacker can write)."""
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    stored = zlib.compress(mbytes)
    head = packing._HEADER.pack(packing.MAGIC, packing.FORMAT_VERSION, len(stored), len(mbytes),
                                hashlib.sha256(stored).digest())
    body = head + stored + area
    return body + hashlib.sha256(body).digest()


def _entry(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["tensors"] if e["name"] == name)


@pytest.fixture
def no_decoding(monkeypatch):
    """``no_decoding()``: from then on, fail the test if any tensor is decoded (the refusal must come first)."""
    def boom(*a, **k):
        raise AssertionError("a tensor was decoded before the manifest's sizes were checked")

    return lambda: monkeypatch.setattr(packing, "_decode_tensor", boom)


def _call_with_timeout(fn, seconds: float = 20.0):
    """Run ``fn`` in a thread; a call that blocks (a FIFO opened for reading) fails the test."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the call blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------------------- not regular files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("reader", ["inspect", "load", "read_packed"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, reader: str) -> None:
    fifo = tmp_path / "model.pwfn"
    os.mkfifo(fifo)
    fn = {"inspect": inspect_file, "load": load_packed_model, "read_packed": packing.read_packed}[reader]
    with pytest.raises(ArtefactError, match="FIFO"):
        _call_with_timeout(lambda: fn(fifo))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_is_refused_without_reading_it() -> None:
    with pytest.raises(ArtefactError, match="device"):
        _call_with_timeout(lambda: inspect_file("/dev/zero"))
    with pytest.raises(ArtefactError, match="folder"):
        inspect_file(Path(__file__).parent)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_cli_inspect_of_a_fifo_answers_at_once(tmp_path: Path, capsys) -> None:
    from pwfn.cli import main

    fifo = tmp_path / "x.pwfn"
    os.mkfifo(fifo)
    assert _call_with_timeout(lambda: main(["inspect", str(fifo)])) == 2
    assert "FIFO" in capsys.readouterr().err


# ------------------------------------------------------------------------------- declared sizes


def test_a_constant_tensor_declaring_150_million_values_is_refused_before_decoding(no_decoding) -> None:
    data = packing.pack({"w": torch.full((64,), 0.5), "b": torch.zeros(3)}, ["w"])
    m, area = _parts(data)
    assert _entry(m, "w")["mode"] == "const"
    _entry(m, "w")["shape"] = [150_000_000]
    forged = _forge(m, area)
    assert len(forged) < 2000
    no_decoding()
    with pytest.raises(ArtefactError, match="150,000,000 values.*nothing was decoded"):
        packing.unpack(forged)


def test_an_ans_stream_claiming_400_million_symbols_is_refused_before_decoding(no_decoding) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.where(torch.rand(4000, generator=g) < 0.95, 0.5, -0.5)
    data = packing.pack({"w": w}, ["w"])
    m, area = _parts(data)
    assert _entry(m, "w")["mode"] == "ans"
    _entry(m, "w")["shape"] = [400_000_000]
    no_decoding()
    with pytest.raises(ArtefactError, match="400,000,000 values"):
        packing.unpack(_forge(m, area))


def test_several_tensors_count_together_and_shapes_are_checked(no_decoding) -> None:
    data = packing.pack({f"w{i}": torch.full((8,), 0.5) for i in range(4)}, [f"w{i}" for i in range(4)])
    m, area = _parts(data)
    each = decoded_cap(len(data)) // 16 // 3 + 1  # each one alone fits, the four together do not
    for e in m["tensors"]:
        e["shape"] = [each]
    no_decoding()
    with pytest.raises(ArtefactError, match="would decode to more than"):
        packing.unpack(_forge(m, area))
    _entry(m, "w0")["shape"] = [-5]
    with pytest.raises(ArtefactError, match="bad shape"):
        packing.unpack(_forge(m, area))


def test_the_bound_scales_with_the_file_and_honest_files_pass() -> None:
    assert decoded_cap(10) == MIN_DECODED_CAP
    assert decoded_cap(1 << 30) == MAX_EXPANSION << 30
    # a constant tensor within the floor still loads (a large all-zero buffer is legitimate)
    big = torch.zeros(1 << 20)
    back = packing.unpack(packing.pack({"z": big}, ["z"]))
    assert torch.equal(back.tensors["z"], big)
    # and a real mixed artefact is far below the bound
    g = torch.Generator().manual_seed(1)
    t = {"a": torch.randint(-4, 5, (300, 40), generator=g).float() / 8, "b": torch.randn(7, generator=g)}
    data = packing.pack(t, ["a"])
    m, _ = _parts(data)
    assert check_declared_sizes(m, len(data)) < 40 * len(data)
    # the caller may lower the bound
    with pytest.raises(ArtefactError, match="would decode"):
        packing.unpack(data, max_decoded_bytes=100)


# ------------------------------------------------------------------------------- codebook


def _with_codebook(bits_hex: str, size_delta: int, terms=None) -> bytes:
    data = packing.pack({"w": torch.tensor([0.5, -0.25, 0.5, 0.125] * 4)}, ["w"],
                        terms=[[[-1, -2]], [[1, -3]], [[1, -1]]])
    m, area = _parts(data)
    m["codebook"]["bits_hex"] += bits_hex
    m["codebook"]["size"] += size_delta
    m["codebook"]["terms"] = terms
    return _forge(m, area)


@pytest.mark.parametrize("bad", ["7fc00000", "7f800000", "ff800000"])
def test_a_self_consistent_file_whose_codebook_holds_nan_or_inf_is_refused(tmp_path: Path, bad: str) -> None:
    forged = _with_codebook(bad, 1)  # an unused extra value: every tensor still decodes and checks
    with pytest.raises(ArtefactError, match="non-finite"):
        packing.unpack(forged)
    path = tmp_path / "nan.pwfn"
    path.write_bytes(forged)
    with pytest.raises(ArtefactError, match="non-finite"):
        inspect_file(path)
    with pytest.raises(ArtefactError, match="non-finite"):
        load_packed_model(path, model=torch.nn.Linear(4, 4, bias=False))


def test_stored_terms_must_sum_to_their_values() -> None:
    m, area = _parts(packing.pack({"w": torch.tensor([0.5, -0.25])}, ["w"], terms=[[[-1, -2]], [[1, -1]]]))
    assert packing.unpack(_forge(m, area)).terms == [[(-1, -2)], [(1, -1)]]
    m["codebook"]["terms"] = [[[-1, -2]], [[1, -2]]]  # says 0.25 where the value is 0.5
    with pytest.raises(ArtefactError, match="do not sum"):
        packing.unpack(_forge(m, area))
    m["codebook"]["terms"] = [[[-1, -2]], [[True, -1]]]
    with pytest.raises(ArtefactError, match="do not sum"):
        packing.unpack(_forge(m, area))


def test_extra_symbols_may_only_be_the_missing_signed_zero() -> None:
    t = {"w": torch.tensor([0.0, -0.0, 0.5, 0.0])}
    data = packing.pack(t, ["w"])
    m, area = _parts(data)
    assert m["extra_symbols_hex"] == "80000000"
    back = packing.unpack(data).tensors["w"]
    assert np.array_equal(back.numpy().view(np.uint32), t["w"].numpy().view(np.uint32))
    m["extra_symbols_hex"] = "3f800000"  # 1.0 is no zero
    with pytest.raises(ArtefactError, match="signed zero"):
        packing.unpack(_forge(m, area))


# ------------------------------------------------------------------------------- export folders


def _mlp_export_args():
    from test_export import fixed_model

    kwargs = {"in_features": 64, "hidden": [16], "num_classes": 10}
    model, q = fixed_model("mlp", **kwargs)
    return model, q, {"name": "mlp", "kwargs": kwargs}


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink()
                     else "dir") for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("planted", ["foreign model.json", "pwfn description, extra file", "edited file",
                                     "sub-folder", "link"])
def test_an_export_never_replaces_a_folder_it_cannot_prove_it_wrote(tmp_path: Path, planted: str, capsys) -> None:
    from test_export import write_run

    from pwfn.cli import main
    from pwfn.export import ExportError, export_model, export_run

    model, q, recipe = _mlp_export_args()
    run = write_run(tmp_path / "r" / "pwfn", model, recipe, q)
    keep = tmp_path / "keep"
    if planted == "foreign model.json":
        keep.mkdir()
        (keep / "model.json").write_text('{"my": "own model card"}')
        (keep / "thesis.tex").write_text("years of work")
    else:
        export_model(model, q, keep, recipe)  # a real pwfn export ...
        if planted == "pwfn description, extra file":
            (keep / "notes.txt").write_text("mine")  # ... with a file of the user's
        elif planted == "edited file":
            (keep / "size.json").write_text("{}")  # ... or one changed since
        elif planted == "sub-folder":
            (keep / "data").mkdir()
            (keep / "data" / "x.npy").write_bytes(b"123")
        else:
            (keep / "model.onnx").symlink_to(tmp_path / "r" / "pwfn" / "report.json")
    before = _snapshot(keep)
    with pytest.raises(ExportError, match="choose a new or empty --out"):
        export_run(run, keep)
    assert main(["export", str(run), "--out", str(keep)]) == 2
    err = capsys.readouterr().err
    assert "pwfn: error:" in err and ("did not write" in err or "changed since" in err or "not a pwfn export" in err)
    assert _snapshot(keep) == before
    assert not list(tmp_path.glob(".keep.*"))


def test_an_earlier_pwfn_export_is_replaced_as_a_whole(tmp_path: Path) -> None:
    from test_export import write_run

    from pwfn.export import export_run

    model, q, recipe = _mlp_export_args()
    run = write_run(tmp_path / "r" / "pwfn", model, recipe, q)
    first = export_run(run, tmp_path / "out")
    described = json.loads((tmp_path / "out" / "model.json").read_text())
    assert set(described["files"]) == set(first["files"]) and "model.json" not in described["files"]
    export_run(run, tmp_path / "out")  # provably pwfn's: replaced
    export_run(run)  # the default folder too, twice
    export_run(run)
    assert (run / "export" / "model.pwfn").is_file()


def test_an_export_folder_that_is_a_link_or_a_file_is_refused(tmp_path: Path) -> None:
    from test_export import write_run

    from pwfn.export import ExportError, export_run

    model, q, recipe = _mlp_export_args()
    run = write_run(tmp_path / "r" / "pwfn", model, recipe, q)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "a.txt").write_text("a")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(ExportError, match="symbolic link"):
        export_run(run, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (target / "a.txt").read_text() == "a"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_run(run, tmp_path / "file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_in_an_export_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    from pwfn.export import ExportError, export_model

    model, q, recipe = _mlp_export_args()
    export_model(model, q, tmp_path / "e", recipe)
    os.mkfifo(tmp_path / "e" / "model.onnx")
    with pytest.raises(ExportError, match="model.onnx \\(not a regular file\\)"):
        _call_with_timeout(lambda: export_model(model, q, tmp_path / "e", recipe))


def test_a_file_added_during_an_export_is_kept(tmp_path: Path, monkeypatch) -> None:
    """The folder is checked, then renamed aside: a file that appears in between is not deleted with it."""
    from pwfn.export import export_model, ownership

    model, q, recipe = _mlp_export_args()
    out = tmp_path / "e"
    export_model(model, q, out, recipe)
    real = ownership.check_replaceable
    calls = {"n": 0}

    def racing(folder, **kw):
        calls["n"] += 1
        result = real(folder, **kw)
        if calls["n"] == 1:  # after the first check passed, someone writes into the folder
            (out / "late.txt").write_text("arrived during the export")
        return result

    monkeypatch.setattr(ownership, "check_replaceable", racing)
    export_model(model, q, out, recipe)
    kept = [p for p in tmp_path.rglob("late.txt")]
    assert len(kept) == 1 and kept[0].read_text() == "arrived during the export"
