"""Dataset readers: each official format written by hand in tmp_path, read back pixel for pixel."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import datasets as ds
from selfsup.data import folder as fd
from selfsup.data import formats as fm
from selfsup.data.datasets import DataError, dataset_stats, from_arrays, load_dataset

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's $SELFSUP_DATA or ~/.cache/selfsup."""
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ----------------------------------------------------------------------------------------------- writers


def idx_bytes(a: np.ndarray) -> bytes:
    """LeCun's idx format: magic 0x0000 08 ndim, big-endian uint32 dims, raw uint8 data."""
    return struct.pack(">HBB", 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr, dims in (("images", images, 3), ("labels", labels, 1)):
        path = directory / f"{prefix}-{kind}-idx{dims}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the CIFAR release: str and bytes as SHORT_BINSTRING/BINSTRING ('U',
    'T'; Python 3 writes bytes as _codecs.encode calls), numpy's _reconstruct under its old numpy.core name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj) -> None:
        obj = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)

    dispatch[bytes] = dispatch[str] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar(directory: Path, files: dict[str, int], label_key: bytes, meta: tuple[str, bytes, list[str]],
                seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR python batches: dict with b'data' (N, 3072) uint8 and a label list, pickled as in the release."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, len(meta[2]), n).tolist()
        (directory / name).write_bytes(py2_pickle({b"data": data, label_key: labels, b"batch_label": b"x"}))
        written[name] = (data, labels)
    (directory / meta[0]).write_bytes(py2_pickle({meta[1]: [c.encode() for c in meta[2]]}))
    return written


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def stl_bytes(images_chw: np.ndarray) -> bytes:
    """STL-10 binary layout: each 3x96x96 image column-major, i.e. stored as (C, W, H)."""
    return np.ascontiguousarray(images_chw.transpose(0, 1, 3, 2)).tobytes()


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 5, 2], dtype=np.uint8)
    write_idx_split(tmp_path, "t10k", images, labels, gz)
    d = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert d.name == "fashion_mnist/test" and len(d) == 7 and d.image_shape == (1, 28, 28)
    assert d.images.dtype == torch.uint8 and torch.equal(d.images[:, 0], torch.from_numpy(images))
    assert int(d.images[4, 0, 17, 3]) == images[4, 17, 3]
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels.tolist()
    assert d.classes[9] == "Ankle boot" and d.num_classes == 10


def test_idx_found_through_selfsup_data_subfolder(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 251
    write_idx_split(tmp_path / "mnist", "train", images, np.array([4, 2]), gz=True)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    d = load_dataset("mnist", download=False)
    assert d.name == "mnist/train" and d.labels.tolist() == [4, 2]
    assert int(d.images[1, 0, 27, 27]) == (2 * 28 * 28 - 1) % 251


def test_idx_truncated_names_path_and_sizes(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    expected = 16 + 3 * 28 * 28
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("fmnist", root=tmp_path, download=False)
    assert str(path) in str(err.value) and str(expected) in str(err.value) and str(expected - 10) in str(err.value)


def test_idx_truncated_gzip_stream(tmp_path):
    write_idx_split(tmp_path, "train", np.ones((3, 28, 28), np.uint8), np.zeros(3, np.uint8), gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_dataset("fmnist", root=tmp_path, download=False)
    assert str(path) in str(err.value)


def test_idx_bad_magic_and_count_mismatch(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), gz=False)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    images_path = tmp_path / "train-images-idx3-ubyte"
    good_images = images_path.read_bytes()
    images_path.write_bytes(labels_path.read_bytes())  # a labels file where images are expected
    with pytest.raises(DataError, match="magic number 2049, expected 2051") as err:
        load_dataset("fmnist", root=tmp_path, download=False)
    assert str(images_path) in str(err.value)
    images_path.write_bytes(good_images)
    labels_path.write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset("fmnist", root=tmp_path, download=False)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_sizes_histogram_and_stats():
    start = time.perf_counter()
    train = load_dataset("fashion_mnist", "train")  # found in /usr/share/datasets via the standard places
    elapsed = time.perf_counter() - start
    test = load_dataset("fmnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x = train.images.float() / 255
    (mean,), (std,) = dataset_stats("fmnist")
    assert abs(x.mean().item() - mean) < 5e-4 and abs(x.std().item() - std) < 5e-4
    assert elapsed < 4.0, f"Fashion-MNIST train took {elapsed:.2f}s (target < 2 s on an idle machine)"


# ----------------------------------------------------------------------------------------------- CIFAR

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_round_trip(tmp_path, point_at_folder):
    folder = tmp_path / "cifar-10-batches-py"
    batches = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    written = write_cifar(folder, batches, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    root = folder if point_at_folder else tmp_path
    train = load_dataset("cifar10", "train", root=root, download=False, verify=False)
    assert len(train) == 10 and train.image_shape == (3, 32, 32) and train.classes == CIFAR10_NAMES
    data3, labels3 = written["data_batch_3"]  # rows 4, 5 of the train split
    c, y, x = 2, 7, 30
    assert int(train.images[5, c, y, x]) == data3[1, c * 1024 + y * 32 + x]
    assert torch.equal(train.images[4].reshape(-1), torch.from_numpy(data3[0]))
    assert train.labels[4:6].tolist() == labels3
    test = load_dataset("cifar-10", "test", root=root, download=False, verify=False)
    assert test.labels.tolist() == written["test_batch"][1] and test.name == "cifar10/test"


def test_cifar100_fine_labels_and_meta(tmp_path):
    names = [f"class{i:02d}" for i in range(100)]
    written = write_cifar(tmp_path / "cifar-100-python", {"train": 4, "test": 2}, b"fine_labels",
                          ("meta", b"fine_label_names", names), seed=1)
    d = load_dataset("cifar100", "test", root=tmp_path, download=False, verify=False)
    assert d.classes == names and d.num_classes == 100
    assert d.labels.tolist() == written["test"][1]
    assert int(d.images[1, 1, 31, 0]) == written["test"][0][1, 1024 + 31 * 32]


def test_cifar_corrupt_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {"test_batch": 2}, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:50])
    with pytest.raises(DataError, match="unpickle") as err:
        load_dataset("cifar10", "test", root=tmp_path, download=False, verify=False)
    assert str(folder / "test_batch") in str(err.value)


def test_cifar_test_files_are_release_shaped(tmp_path):
    """The writer above emits what the release holds: 'U'/'T' strings and only the three numpy globals."""
    write_cifar(tmp_path, {"test_batch": 2}, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    ops = list(pickletools.genops((tmp_path / "test_batch").read_bytes()))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2
    assert {arg for op, arg, _ in ops if op.name == "GLOBAL"} == {
        "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    names = {op.name for op, _, _ in ops}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= names and not names & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"}


class _SystemPayload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _exec_payload(code: str) -> bytes:
    """Hand-written opcodes: GLOBAL builtins.exec, REDUCE with one code string (what a crafted file would hold)."""
    return (b"\x80\x02}(U\x04data" + b"cbuiltins\nexec\n" + b"X" + struct.pack("<I", len(code)) + code.encode()
            + b"\x85R" + b"U\x06labels]u.")  # {b"data": exec(code), b"labels": []}


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("verify", [False, True])
def test_cifar_payload_refused_and_not_run(tmp_path, payload, verify):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {"test_batch": 2}, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    marker = tmp_path / "MARKER"
    if payload == "os.system":
        crafted = py2_pickle({b"data": _SystemPayload(f"touch '{marker}'"), b"labels": []})
    else:
        crafted = _exec_payload(f"open({str(marker)!r}, 'w').close()")
    (folder / "test_batch").write_bytes(crafted)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path, download=False, verify=verify)
    message = str(err.value)
    assert str(folder / "test_batch") in message and not marker.exists()
    if verify:  # the md5 refuses the file before it is unpickled
        assert "checksum mismatch" in message and md5_of(folder / "test_batch") in message
    else:  # the unpickler refuses the global
        glob = f"{os.system.__module__}.system" if payload == "os.system" else "builtins.exec"
        assert f"refused to unpickle the global {glob}" in message and "not an official CIFAR batch" in message


def test_cifar_object_arrays_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {"test_batch": 2}, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    path = folder / "test_batch"
    path.write_bytes(py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": np.array([0], dtype=object)}))
    with pytest.raises(DataError, match="dtype object") as err:
        load_dataset("cifar10", "test", root=tmp_path, download=False, verify=False)
    assert str(path) in str(err.value) and "not an official CIFAR batch" in str(err.value)


def test_cifar_official_name_with_other_md5_refused_by_default(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, {"test": 2}, b"fine_labels", ("meta", b"fine_label_names", ["a", "b"]))
    path = folder / "test"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        load_dataset("cifar100", "test", root=tmp_path, download=False)
    message = str(err.value)
    assert str(path) in message and md5_of(path) in message and fm._CIFAR_MD5["test"] in message
    assert "verify=False" in message and "download again" in message


def test_cifar_md5_accepts_the_expected_file(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, {"test_batch": 3}, b"labels", ("batches.meta", b"label_names", CIFAR10_NAMES))
    monkeypatch.setitem(fm._CIFAR_MD5, "test_batch", md5_of(folder / "test_batch"))
    with pytest.raises(DataError, match="checksum mismatch") as err:  # the meta file is still checked
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert str(folder / "batches.meta") in str(err.value)
    monkeypatch.setitem(fm._CIFAR_MD5, "batches.meta", md5_of(folder / "batches.meta"))
    d = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert d.labels.tolist() == written["test_batch"][1] and d.classes == CIFAR10_NAMES


def test_cifar_md5_table_is_torchvisions():
    """torchvision/datasets/cifar.py (train_list, test_list, meta of CIFAR10 and CIFAR100)."""
    assert fm._CIFAR_MD5 == {
        "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888", "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc", "meta": "7973b15100ade9c7d40fb424638fde48"}
    assert set(fm._CIFAR_MD5) == {f for name in fm._CIFAR for split in fm._CIFAR[name][0].values()
                                  for f in split} | {fm._CIFAR[name][2][0] for name in fm._CIFAR}


# ----------------------------------------------------------------------------------------------- STL-10


def test_stl10_column_major_offset(tmp_path):
    """Pixel (c, y, x) of image i sits at byte i*27648 + c*9216 + x*96 + y (column-major, per the STL README)."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    raw = np.zeros(2 * 27648, np.uint8)
    i, c, y, x = 1, 2, 5, 70
    raw[i * 27648 + c * 9216 + x * 96 + y] = 200
    (folder / "test_X.bin").write_bytes(raw.tobytes())
    (folder / "test_y.bin").write_bytes(bytes([1, 10]))
    d = load_dataset("stl10", "test", root=tmp_path, download=False)
    assert int(d.images[i, c, y, x]) == 200 and int(d.images[i, c, x, y]) == 0
    assert int(d.images.sum()) == 200
    assert d.labels.tolist() == [0, 9] and d.image_shape == (3, 96, 96)


def test_stl10_splits_and_unlabeled_memmap(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, unlabeled = (rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for n in (2, 3))
    (folder / "train_X.bin").write_bytes(stl_bytes(train))
    (folder / "train_y.bin").write_bytes(bytes([3, 7]))
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(unlabeled))
    (folder / "class_names.txt").write_text("\n".join(ds.DATASET_INFO["stl10"].classes) + "\n")
    d = load_dataset("stl10", "train", root=folder, download=False)
    assert torch.equal(d.images, torch.from_numpy(train)) and d.labels.tolist() == [2, 6]
    assert d.classes[7] == "monkey"
    u = load_dataset("stl10", "unlabeled", root=tmp_path, download=False)
    assert u.labels is None and torch.equal(u.images, torch.from_numpy(unlabeled))
    both = load_dataset("stl10", "train+unlabeled", root=tmp_path, download=False, cache_dir=tmp_path / "c")
    assert both.labels is None and len(both) == 5
    assert torch.equal(both.images, torch.from_numpy(np.concatenate([train, unlabeled])))
    assert (tmp_path / "c" / "stl10-train+unlabeled_X.bin").stat().st_size == 5 * 27648


def test_stl10_bad_sizes(tmp_path):
    (tmp_path / "test_X.bin").write_bytes(bytes(27648 + 5))
    (tmp_path / "test_y.bin").write_bytes(bytes([1]))
    with pytest.raises(DataError, match="multiple of"):
        load_dataset("stl10", "test", root=tmp_path, download=False)
    (tmp_path / "test_X.bin").write_bytes(bytes(2 * 27648))
    with pytest.raises(DataError, match="1 labels but .* 2 images"):
        load_dataset("stl10", "test", root=tmp_path, download=False)


# ----------------------------------------------------------------------------------------------- folder


def make_class_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    colors = {"cat/a.png": (255, 0, 0), "cat/sub/b.PNG": (0, 255, 0), "dog/c.png": (0, 0, 255),
              "dog/d.bmp": (10, 20, 30)}
    for rel, color in colors.items():
        save_png(root / rel, np.full((8, 8, 3), color, np.uint8))
    (root / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored")
    return colors


def test_folder_labels_pixels_and_skipped(tmp_path):
    colors = make_class_folder(tmp_path / "data")
    d = load_dataset("folder", root=tmp_path / "data", image_size=8)
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1, 1] and len(d) == 4
    assert d.image_shape == (3, 8, 8) and d.name == "folder/data"
    for k, rel in enumerate(["cat/a.png", "cat/sub/b.PNG", "dog/c.png", "dog/d.bmp"]):
        assert d.images[k, :, 3, 5].tolist() == list(colors[rel])
    assert d.skipped == [str(tmp_path / "data" / "dog" / "broken.jpg")]
    with pytest.raises(DataError, match="cannot identify image file") as err:
        load_dataset("folder", root=tmp_path / "data", image_size=8, on_error="raise")
    assert str(tmp_path / "data" / "dog" / "broken.jpg") in str(err.value)


def test_folder_truncated_image_found_at_decode(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:400])  # header intact, pixels missing
    save_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    d = load_dataset("folder", root=tmp_path, image_size=8)
    assert len(d) == 1 and d.skipped == [str(tmp_path / "cut.jpg")]


def test_folder_flat_gray_and_mixed(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    save_png(tmp_path / "flat" / "g1.png", gray)
    save_png(tmp_path / "flat" / "g2.png", 255 - gray)
    d = load_dataset("folder", root=tmp_path / "flat", image_size=8)
    assert d.labels is None and d.classes is None and d.image_shape == (1, 8, 8)
    assert torch.equal(d.images[0, 0], torch.from_numpy(gray)) and dataset_stats("folder", 1) == ((0.5,), (0.5,))
    save_png(tmp_path / "flat" / "rgb.png", np.full((8, 8, 3), (1, 2, 3), np.uint8))
    m = load_dataset("folder", root=tmp_path / "flat", image_size=8)  # any color image -> RGB for all
    assert m.image_shape == (3, 8, 8) and m.images[0, :, 2, 7].tolist() == [23] * 3
    assert m.images[2, :, 0, 0].tolist() == [1, 2, 3]


def test_folder_center_crop_and_resize(tmp_path):
    cols = np.tile(np.arange(12, dtype=np.uint8) * 10, (8, 1))  # h=8, w=12: value = 10 * column
    save_png(tmp_path / "wide" / "a.png", cols)
    save_png(tmp_path / "tall" / "a.png", np.ascontiguousarray(cols.T))  # h=12, w=8: value = 10 * row
    wide = load_dataset("folder", root=tmp_path / "wide", image_size=8).images[0, 0]
    tall = load_dataset("folder", root=tmp_path / "tall", image_size=8).images[0, 0]
    expected = torch.arange(2, 10, dtype=torch.uint8) * 10  # crop offset round((12 - 8) / 2) = 2
    assert torch.equal(wide[5], expected) and torch.equal(tall[:, 5], expected)
    save_png(tmp_path / "big" / "a.png", np.full((20, 50, 3), (9, 99, 199), np.uint8))
    big = load_dataset("folder", root=tmp_path / "big", image_size=6)
    assert big.image_shape == (3, 6, 6) and (big.images[0] == torch.tensor([9, 99, 199])[:, None, None]).all()
    assert fd.resize_center_crop(Image.new("L", (50, 20)), 6).size == (6, 6)


def test_folder_cache_reused_without_decoding(tmp_path, monkeypatch):
    make_class_folder(tmp_path / "data")
    first = load_dataset("folder", root=tmp_path / "data", image_size=8)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    second = load_dataset("folder", root=tmp_path / "data", image_size=8)
    assert opened == [] and torch.equal(first.images, second.images) and second.skipped == first.skipped
    assert second.labels.tolist() == first.labels.tolist()
    assert len(list((tmp_path / "xdg" / "selfsup" / "folder").glob("data-*-8.u8"))) == 1  # the user's cache
    assert not (tmp_path / "data" / ".selfsup_cache").exists()  # nothing written into the image folder
    save_png(tmp_path / "data" / "cat" / "a.png", np.full((8, 8, 3), 77, np.uint8))  # changed file -> rebuild
    third = load_dataset("folder", root=tmp_path / "data", image_size=8)
    assert opened and third.images[0, :, 0, 0].tolist() == [77] * 3
    opened.clear()
    load_dataset("folder", root=tmp_path / "data", image_size=4)  # another size -> its own cache
    assert opened


def test_folder_size_follows_its_images_when_not_given(tmp_path):
    for i, (w, h) in enumerate([(12, 12), (12, 12), (20, 10), (30, 30)]):  # short sides 10, 12, 12, 30
        save_png(tmp_path / "mixed" / f"{i}.png", np.zeros((h, w), np.uint8))
    assert load_dataset("folder", root=tmp_path / "mixed").image_shape == (1, 12, 12)  # the median short side
    assert fd.typical_side([(4000, 3000)] * 3) == fd.AUTO_SIZE_LIMIT  # phone photos: capped
    assert fd.typical_side([(64, 48)]) == 48


def test_folder_split_subdir_and_cache_fallback(tmp_path):
    save_png(tmp_path / "data" / "train" / "x" / "a.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "data" / "val" / "y" / "b.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "xdg" / "selfsup").mkdir(parents=True)
    (tmp_path / "xdg" / "selfsup" / "folder").write_text("a file where the user's cache folder would go")
    d = load_dataset("folder", "val", root=tmp_path / "data", image_size=8)
    assert d.classes == ["y"] and d.name == "folder/val"
    assert len(list((tmp_path / "data" / ".selfsup_cache").glob("val-*.u8"))) == 1  # the fallback


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_dataset("folder")
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_dataset("folder", root=tmp_path)


# ----------------------------------------------------------------------------------------------- finding / download


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fmnist", root=tmp_path, download=False)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match=r"https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", download=False)  # no root: $SELFSUP_DATA unset, empty cache
    with pytest.raises(DataError, match="stl10_binary.tar.gz"):
        load_dataset("stl10", "unlabeled", download=False)


def test_verify_md5(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert ds._verify_md5(path, "900150983cd24fb0d6963f7d28e17f72") == "900150983cd24fb0d6963f7d28e17f72"
    with pytest.raises(DataError, match="checksum mismatch"):
        ds._verify_md5(path, "0" * 32)


def _with_downloads(monkeypatch, name: str, downloads: tuple) -> None:
    info = dataclasses.replace(ds.DATASET_INFO[name], downloads=downloads, standard_dirs=())
    monkeypatch.setitem(ds.DATASET_INFO, name, info)


def test_download_idx_files_with_checksums(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    images = np.random.default_rng(3).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx_split(src, "train", images, np.array([1, 2, 3]), gz=True)
    write_idx_split(src, "t10k", images[:1], np.array([0]), gz=True)
    files = sorted(src.iterdir())
    downloads = tuple(ds.Download(p.as_uri(), hashlib.md5(p.read_bytes()).hexdigest()) for p in files)
    _with_downloads(monkeypatch, "mnist", downloads)
    d = load_dataset("mnist", "train")
    assert torch.equal(d.images[:, 0], torch.from_numpy(images)) and d.labels.tolist() == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "xdg" / "selfsup" / "mnist").iterdir()) == [p.name for p in files]

    bad = (ds.Download(files[0].as_uri(), "0" * 32),)
    _with_downloads(monkeypatch, "mnist", bad)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", root=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no partial file left behind

    _with_downloads(monkeypatch, "mnist", (ds.Download((tmp_path / "nope.gz").as_uri(), "0" * 32),))
    with pytest.raises(DataError, match="(?s)could not download .*ossci-datasets"):
        load_dataset("mnist", root=tmp_path / "elsewhere")


def test_download_and_extract_cifar_archive(tmp_path, monkeypatch):
    written = write_cifar(tmp_path / "build" / "cifar-10-batches-py", {"test_batch": 2}, b"labels",
                          ("batches.meta", b"label_names", CIFAR10_NAMES))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    _with_downloads(monkeypatch, "cifar10", (ds.Download(archive.as_uri(), md5, extract=True),))
    for name in ("test_batch", "batches.meta"):  # extracted members are md5-checked too: these stand for the release
        monkeypatch.setitem(fm._CIFAR_MD5, name, md5_of(tmp_path / "build" / "cifar-10-batches-py" / name))
    d = load_dataset("cifar10", "test")
    assert d.labels.tolist() == written["test_batch"][1]
    cache = tmp_path / "xdg" / "selfsup" / "cifar10"
    assert (cache / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (cache / "cifar-10-python.tar.gz").exists()


def test_names_splits_and_image_size():
    assert ds.canonical_name("Fashion-MNIST") == "fashion_mnist" and ds.canonical_name("fmnist") == "fashion_mnist"
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        ds.canonical_name("cifar1O")
    with pytest.raises(ValueError, match="valid: train, test, unlabeled, train\\+unlabeled"):
        load_dataset("stl10", "val", download=False)
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("cifar10", image_size=64, download=False)
    assert dataset_stats("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert dataset_stats("stl10")[1] == (0.2603, 0.2566, 0.2713)
    assert dataset_stats("mnist") == ((0.1307,), (0.3081,))
    assert dataset_stats("folder") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------------------------- from_arrays


def test_from_arrays_layouts():
    nchw = np.random.default_rng(4).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    nhwc = nchw.transpose(0, 2, 3, 1)
    for images in (nchw, nhwc, torch.from_numpy(nhwc)):
        d = from_arrays(images, labels=[1, 0], classes=["a", "b"])
        assert d.image_shape == (3, 5, 4) and torch.equal(d.images, torch.from_numpy(nchw))
        assert d.labels.dtype == torch.int64 and d.num_classes == 2
    gray = from_arrays(nchw[:, 0], name="g")
    assert gray.image_shape == (1, 5, 4) and gray.labels is None and gray.num_classes is None
    assert torch.equal(gray.images[:, 0], torch.from_numpy(nchw[:, 0]))
    assert from_arrays(nchw, labels=np.array([0, 4])).num_classes == 5


def test_from_arrays_float_rounding_and_errors():
    x = np.array([0.0, 1 / 255, 0.2, 0.5, 0.75, 1.0], np.float32).reshape(1, 1, 2, 3)
    assert from_arrays(x).images.flatten().tolist() == [0, 1, 51, 128, 191, 255]  # round(255 x): 127.5 -> 128, 191.25 -> 191
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[-0.5, 1\]"):
        from_arrays(x - 0.5 * (x == 0))
    with pytest.raises(ValueError, match="without NaN"):
        from_arrays(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="astype\\(np.uint8\\)"):
        from_arrays(np.zeros((1, 2, 2), np.int32))
    with pytest.raises(ValueError, match="C in"):
        from_arrays(np.zeros((1, 5, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), labels=[0, 1, 2])
    with pytest.raises(ValueError, match="only 2 classes"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), labels=[0, 2], classes=["a", "b"])
    with pytest.raises(ValueError, match="integers"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), labels=[0.0, 1.0])


def test_train_cli_on_cifar_format_files_needs_verify_off_and_never_runs_a_payload(tmp_path, capsys):
    """Through `selfsup train`: own CIFAR-format files are refused by md5 unless data.verify=false; a payload in a
    batch is refused either way and does not run."""
    from selfsup.cli import main

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {f"data_batch_{i}": 8 for i in range(1, 6)} | {"test_batch": 8}, b"labels",
                ("batches.meta", b"label_names", CIFAR10_NAMES))
    args = ["train", "simclr", "data=cifar10", f"data.root={tmp_path}", "epochs=1", "batch_size=16",
            "model.width=4", "model.projector_hidden=16", "model.projector_out=8", "views.size=16",
            "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
            "eval.report=false", "eval.guillotine=false", "eval.init_baseline=false"]
    assert main([*args, f"out={tmp_path / 'refused'}"]) == 1
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "checksum mismatch" in err and "data.verify=false" in err
    assert main([*args, "data.verify=false", f"out={tmp_path / 'ok'}"]) == 0
    marker = tmp_path / "PAYLOAD_RAN"
    (folder / "data_batch_2").write_bytes(py2_pickle({b"data": _SystemPayload(f"touch '{marker}'"), b"labels": []}))
    for verify, expected in (("true", "checksum mismatch"), ("false", "data_batch_2: refused to unpickle")):
        assert main([*args, f"data.verify={verify}", f"out={tmp_path / f'evil-{verify}'}"]) == 1
        assert expected in capsys.readouterr().err
    assert not marker.exists()
