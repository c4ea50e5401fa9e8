"""Readers of the official file formats: idx (MNIST, Fashion-MNIST), CIFAR python pickles, STL-10 binaries.

Each ``_<format>_has(directory, split)`` says whether a split's files are in ``directory``; each
``_<format>_read(directory, split, info, cache_dir, verify)`` returns it as an :class:`ImageDataset` of uint8
``(N, C, H, W)`` (DESIGN.md §2), in RAM except STL-10, which is memory-mapped. Corrupt or truncated files raise
:class:`DataError` naming the file. ``verify`` checks files against the md5 of the official release before
reading them (only CIFAR uses it for now: its pickles are the one format whose reading can run code). Finding
the folder and dispatching by dataset name is :func:`selfsup.data.datasets.load_dataset`'s job.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from selfsup.data.download import _verify_md5, atomic_write_json, cache_home, writable_cache_dir
from selfsup.data.types import DataError, ImageDataset, _numpy_to_tensor

if TYPE_CHECKING:
    from selfsup.data.datasets import DatasetInfo


def _dataset(images: np.ndarray, labels: np.ndarray | None, classes, info: DatasetInfo, split: str) -> ImageDataset:
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(_numpy_to_tensor(images), y, classes, f"{info.name}/{split}")


# ----------------------------------------------------------------------------------------------- idx (MNIST)

_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}. The file is truncated or corrupt; download it again.") from e


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format, also Fashion-MNIST) of ``kind`` "images" or "labels" as uint8.

    Layout: big-endian magic ``0x0000 08 D`` (08 = ubyte, D = number of dims), D big-endian uint32 sizes, then
    the data. The magic, and the declared sizes against the byte count, are checked.
    """
    path = Path(path)
    raw = _read_bytes(path)
    expected = _IDX_MAGIC[kind]
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        raise DataError(f"{path}: magic number {magic}, expected {expected} for an idx {kind} file. It is not an "
                        f"idx {kind} file (wrong file?) or is corrupt; download it again.")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = header + int(np.prod(dims))
    if len(raw) != size:
        what = "truncated" if len(raw) < size else "longer than declared"
        raise DataError(f"{path} is {what}: its header declares {kind} of shape {dims}, i.e. {size} bytes, but "
                        f"it holds {len(raw)} bytes. Download it again.")
    # A copy makes the array writable (frombuffer on bytes is read-only); ~50 MB for Fashion-MNIST train.
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_file(directory: Path, split: str, kind: str) -> Path | None:
    stem = f"{_IDX_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)


def _idx_has(directory: Path, split: str) -> bool:
    return all(_idx_file(directory, split, kind) is not None for kind in ("images", "labels"))


def _check_idx_shape(shape: tuple[int, ...], path: Path, info: DatasetInfo) -> None:
    """Refuse images that are not square, as the release's bytes re-declared as e.g. 14x56 would be.

    The header is the only record of the image shape, and any H x W of the right product reads without error, as
    rows of the wrong width: wrong images, no error. The release is 28x28; other square sizes are accepted, for
    your own (or synthetic test) data in the idx format. With as many labels as images, no square shape other
    than 28x28 fits the release's bytes, so a reshaped official file is always caught.
    """
    n, h, w = shape
    if h != w:
        raise DataError(f"{path}: its header declares {n} images of {h}x{w} pixels, but {info.name} images are "
                        f"{info.size}x{info.size} (and this reader takes square images only). It is not a "
                        f"{info.name} images file, or it was re-saved with another shape; download it again.")


def _idx_read(directory: Path, split: str, info: DatasetInfo, cache_dir, verify: bool = True) -> ImageDataset:
    images_path, labels_path = (_idx_file(directory, split, kind) for kind in ("images", "labels"))
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    _check_idx_shape(images.shape, images_path, info)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                        "the two files come from different releases or one is corrupt")
    if len(labels) and labels.max() >= len(info.classes):
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{len(info.classes) - 1}")
    return _dataset(images[:, None], labels, list(info.classes), info, split)


# ----------------------------------------------------------------------------------------------- CIFAR

_CIFAR = {  # split -> batch files, label key, (meta file, names key)
    "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels",
                ("batches.meta", b"label_names")),
    "cifar100": ({"train": ["train"], "test": ["test"]}, b"fine_labels", ("meta", b"fine_label_names")),
}


# md5 of each file of the official releases, as torchvision publishes them (torchvision/datasets/cifar.py:
# CIFAR10.train_list / test_list / meta, CIFAR100 likewise). Checked before a file is unpickled.
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}

# The only globals of the official files (Python 2 cPickle, protocol 2): numpy arrays pickled through
# _reconstruct + ndarray.__setstate__, and their dtype. numpy 2 renamed numpy.core to numpy._core; both spellings
# map to the real function, taken from ndarray.__reduce__ so that the deprecated numpy.core shim is never imported.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
_NOT_CIFAR = ("is not an official CIFAR batch (those hold only dicts, lists, byte strings, numbers and uint8 numpy "
              "arrays); delete it and download the dataset again")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR python files contain.

    ``pickle`` runs code: any global a file names (``os.system``, ``builtins.exec``, ...) is imported and can be
    called while loading. Here every global outside :data:`_CIFAR_GLOBALS` is refused, so a crafted file can only
    build dicts, lists, tuples, strings, bytes, numbers and numpy arrays.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the release's keys are read
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[module, name]
        except KeyError:
            raise DataError(f"{self.path}: refused to unpickle the global {module}.{name}: the file "
                            f"{_NOT_CIFAR}") from None


def _refuse_object_arrays(obj, path: Path) -> None:
    """Object arrays are no part of the release: refuse any inside dicts, lists or tuples (cycles allowed)."""
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray) and o.dtype.hasobject:
            raise DataError(f"{path} holds a numpy array of dtype {o.dtype} (Python objects): the file {_NOT_CIFAR}")
        stack.extend(o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ())


def _unpickle(path: Path, verify: bool) -> dict:
    """A CIFAR python pickle, md5-checked first when ``verify`` and always read with :class:`_CifarUnpickler`."""
    expected = _CIFAR_MD5.get(path.name)
    if verify and expected is not None:
        _verify_md5(path, expected, hint=" Your own files in the CIFAR format load with data.verify=false "
                                         "(Python: load_dataset(..., verify=False)).")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, RecursionError) as e:
        raise DataError(f"cannot unpickle {path}: {e!r}. The file is truncated or corrupt; download it again.") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dict (got {type(obj).__name__})")
    _refuse_object_arrays(obj, path)
    return obj


def _cifar_has(name: str) -> Callable[[Path, str], bool]:
    return lambda directory, split: all((directory / f).is_file() for f in _CIFAR[name][0][split])


def _cifar_labels(raw, path: Path, label_key: bytes, num_classes: int | None) -> np.ndarray:
    """The labels of a batch as int64, refused unless they are integers in 0..num_classes-1.

    The release stores Python ints. Floats are accepted only when integral (3.0 -> 3): casting would silently
    turn 3.5 into 3. Negative labels (-1 is a common "unlabeled" marker) would fail at the first training step.
    """
    try:
        y = np.asarray(raw)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integer labels ({e})") from e
    fix = "the file is corrupt or not a CIFAR batch; download it again, or fix the labels of your own files"
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{path}: {label_key!r} must be a list of integer labels; got {y.dtype} of shape "
                        f"{y.shape}: {fix}")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{path}: label {float(y[bad[0]])!r} (index {bad[0]}) is not an integer: {fix}")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) if num_classes is None else (y < 0) | (y >= num_classes))
    if len(bad):
        valid = ">= 0" if num_classes is None else f"0..{num_classes - 1}"
        raise DataError(f"{path}: {len(bad)} label(s) outside {valid}, the first {y[bad[0]]} at index {bad[0]}: "
                        f"{fix}")
    return y


def _cifar_classes(meta: Path, names_key: bytes, info: DatasetInfo, verify: bool) -> list[str] | None:
    """Class names from the meta file when present, else the known names (CIFAR-10), else None."""
    if not meta.is_file():
        return list(info.classes) if info.classes else None
    names = _unpickle(meta, verify).get(names_key)
    if not isinstance(names, list) or not all(isinstance(c, (bytes, str)) for c in names):
        raise DataError(f"{meta}: expected {names_key!r} to hold the list of class names; got "
                        f"{type(names).__name__}. The file is corrupt or not a CIFAR meta file; download it again.")
    return [c.decode() if isinstance(c, bytes) else c for c in names]


def _cifar_read(directory: Path, split: str, info: DatasetInfo, cache_dir, verify: bool = True) -> ImageDataset:
    files, label_key, (meta_file, names_key) = _CIFAR[info.name]
    batches = [(path, _unpickle(path, verify)) for path in (directory / f for f in files[split])]
    classes = _cifar_classes(directory / meta_file, names_key, info, verify)  # after the batches: md5 errors name them
    images, labels = [], []
    for path, batch in batches:
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{path} lacks b'data' or {label_key!r} (keys: {sorted(batch, key=repr)}); wrong file?")
        data = np.asarray(batch[b"data"])
        y = _cifar_labels(batch[label_key], path, label_key, None if classes is None else len(classes))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(y):
            raise DataError(f"{path}: expected uint8 data (N, 3072) with N labels; got {data.dtype} {data.shape} "
                            f"and {len(y)} labels")
        images.append(data.reshape(-1, 3, 32, 32))  # each row: 1024 R, 1024 G, 1024 B, each row-major 32x32
        labels.append(y)
    return _dataset(np.concatenate(images), np.concatenate(labels), classes, info, split)


# ----------------------------------------------------------------------------------------------- STL-10

_STL_PIXELS = 3 * 96 * 96
_STL_FILES = {"train": [("train_X.bin", "train_y.bin")], "test": [("test_X.bin", "test_y.bin")],
              "unlabeled": [("unlabeled_X.bin", None)]}
_STL_FILES["train+unlabeled"] = _STL_FILES["train"] + _STL_FILES["unlabeled"]


def _stl_has(directory: Path, split: str) -> bool:
    return all((directory / x).is_file() and (y is None or (directory / y).is_file())
               for x, y in _STL_FILES[split])


def read_stl_images(path: Path) -> np.ndarray:
    """Memory-map an STL-10 ``*_X.bin``: N images of 3x96x96 stored column-major, i.e. (C, W, H) per image.

    Returned as an (N, C, H, W) transposed view on the memmap (STL-10 README; torchvision's reader does the same
    transpose), so the 2.7 GB unlabeled split is never read into RAM.
    """
    size = path.stat().st_size
    if size == 0 or size % _STL_PIXELS:
        raise DataError(f"{path} holds {size} bytes, not a positive multiple of 3*96*96 = {_STL_PIXELS}: it is "
                        "truncated or corrupt; download stl10_binary.tar.gz again")
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=(size // _STL_PIXELS, 3, 96, 96))  # "c": never writes back
    return mm.transpose(0, 1, 3, 2)


def _stl_concat(parts: list[Path], cache: Path) -> Path:
    """One file with the bytes of ``parts`` (a memmap cannot span files), rebuilt only when a part changed."""
    target, meta = cache / "stl10-train+unlabeled_X.bin", cache / "stl10-train+unlabeled_X.json"
    signature = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]
    try:
        if json.loads(meta.read_text()) == signature and target.stat().st_size == sum(s for _, s, _ in signature):
            return target
    except (OSError, ValueError):
        pass
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, target)
    atomic_write_json(meta, signature)
    return target


def _stl_labels(path: Path, n: int) -> np.ndarray:
    y = np.fromfile(path, dtype=np.uint8)
    if len(y) != n:
        raise DataError(f"{path} holds {len(y)} labels but the matching images file holds {n} images")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10, found {y.min()}..{y.max()}; corrupt file?")
    return y - 1


def _stl_read(directory: Path, split: str, info: DatasetInfo, cache_dir, verify: bool = True) -> ImageDataset:
    parts = _STL_FILES[split]
    if len(parts) == 1:
        x_path = directory / parts[0][0]
    else:  # train+unlabeled: labels would exist for 5% only, so the combined split is unlabeled
        cache = writable_cache_dir(cache_dir, directory / ".selfsup_cache", cache_home() / "stl10")
        for x, _ in parts:
            read_stl_images(directory / x)  # validate each part before concatenating
        x_path = _stl_concat([directory / x for x, _ in parts], cache)
    images = read_stl_images(x_path)
    y_name = parts[0][1] if len(parts) == 1 else None
    labels = None if y_name is None else _stl_labels(directory / y_name, len(images))
    names = directory / "class_names.txt"
    classes = names.read_text().split() if names.is_file() else list(info.classes)
    return _dataset(images, labels, classes, info, split)
