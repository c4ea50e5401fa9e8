"""Image datasets as uint8 tensors: official-format readers, discovery, checksummed download, ``from_arrays``.

Every reader returns an :class:`ImageDataset` whose ``images`` are ``uint8 (N, C, H, W)``: in RAM for the small
datasets, a view on a ``np.memmap`` for the large ones (STL-10 unlabeled, image folders), because the view
pipeline converts and augments whole batches on the training device (DESIGN.md §2, "uint8 tensors in memory or
memmap; labels optional"). Self-supervised pre-training never needs labels (cookbook §1-2); they are kept when
the format has them, for the kNN and linear evaluations (cookbook §4.1, DESIGN.md §4 fmnist-knn/-linear).

Where the data of a named dataset is looked for (:func:`load_dataset`):

1. ``root`` when given, and only there (the dataset folder itself or a known sub-folder of it, e.g.
   ``root/cifar-10-batches-py``); a download then goes into ``root``;
2. otherwise ``$SELFSUP_DATA`` (``os.pathsep``-separated), standard system places (Debian's
   ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``), then ``~/.cache/selfsup/<name>``
   (``$XDG_CACHE_HOME`` is honoured), where a download goes.

Downloads are verified against the md5 of the official files and written to a temp file then renamed, so an
interrupted download never looks complete. The readers for image folders live in :mod:`selfsup.data.folder`.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data is missing, corrupt or unusable; the message names the path and says how to fix it."""


# ----------------------------------------------------------------------------------------------- dataset type


@dataclass
class ImageDataset:
    """Images as ``uint8 (N, C, H, W)`` with ``C`` in {1, 3}, plus optional integer labels.

    ``images`` may be a ``torch.from_numpy`` view on a ``np.memmap`` (never written to), so index it in batches
    (``images[idx]`` copies just those rows) rather than converting the whole tensor.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    name: str
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            raise ValueError(f"ImageDataset.images must be a uint8 tensor (N, C, H, W) with C in {{1, 3}}; got "
                             f"{got}. Build datasets from arrays with selfsup.data.datasets.from_arrays().")
        y = self.labels
        if y is not None and (y.dtype != torch.int64 or y.shape != (len(x),)):
            raise ValueError(f"ImageDataset.labels must be int64 of shape ({len(x)},); got {y.dtype} "
                             f"{tuple(y.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        """``len(classes)`` when the names are known, else ``max(label) + 1``, else ``None``."""
        if self.classes is not None:
            return len(self.classes)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def _numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without copying; read-only arrays are fine because datasets are never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        try:
            return torch.from_numpy(a)
        except TypeError as e:
            raise ValueError(f"cannot use a numpy array of dtype {a.dtype} as images or labels: {e}") from e


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    return _numpy_to_tensor(np.asarray(a))


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(N,H,W) -> C=1; (N,C,H,W) kept when C in {1,3}; else (N,H,W,C) with C in {1,3} is permuted (a view)."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.permute(0, 3, 1, 2)
    raise ValueError(f"images of shape {tuple(x.shape)} are not (N,H,W), (N,C,H,W) or (N,H,W,C) with C in "
                     "{1, 3}; convert other channel counts first (e.g. drop alpha with x[..., :3]).")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 passes through; floats in [0, 1] become ``round(255 x)``; any other dtype is refused."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images of dtype {x.dtype} are not supported: pass uint8 (0..255) or floats in [0, 1]. "
                         "If the values already lie in 0..255, convert with .astype(np.uint8) / .to(torch.uint8).")
    if x.numel() and (torch.isnan(x).any() or x.min() < 0 or x.max() > 1):
        lo, hi = float(torch.nan_to_num(x).min()), float(torch.nan_to_num(x).max())
        raise ValueError(f"float images must lie in [0, 1] without NaN; got values in [{lo:g}, {hi:g}]. Undo "
                         "any normalization (x * std + mean) or divide 0..255 data by 255.")
    return (x.double() * 255).round().to(torch.uint8)


def _to_labels(labels, n: int, classes: Sequence[str] | None) -> torch.Tensor:
    y = _as_tensor(labels)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integers; got dtype {y.dtype}. Convert with .astype(np.int64).")
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must have shape ({n},) to match the images; got {tuple(y.shape)}")
    y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0; got minimum {int(y.min())}. Remap them to 0..K-1.")
    if classes is not None and n and int(y.max()) >= len(classes):
        raise ValueError(f"label {int(y.max())} has no name: only {len(classes)} classes were given")
    return y


def from_arrays(images, labels=None, classes: Sequence[str] | None = None, name: str = "arrays") -> ImageDataset:
    """Wrap numpy arrays or tensors as an :class:`ImageDataset` without copying uint8 data.

    ``images``: (N,H,W) -> C=1, (N,C,H,W) or (N,H,W,C) with C in {1,3} (channel-first wins when both fit, e.g.
    (N,3,5,3)); uint8, or float in [0, 1] converted with rounding. ``labels``: optional non-negative integers (N,).
    """
    x = _to_uint8(_to_nchw(_as_tensor(images)))
    y = None if labels is None else _to_labels(labels, len(x), classes)
    return ImageDataset(x, y, None if classes is None else [str(c) for c in classes], name)


# ----------------------------------------------------------------------------------------------- catalogue

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision ImageNet models


@dataclass(frozen=True)
class Download:
    url: str
    md5: str  # of the official file, as published by its authors / torchvision
    extract: bool = False  # a .tar.gz to unpack in place (then deleted)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and where to find it. mean/std: per-channel statistics of the train split in [0, 1]."""

    name: str
    channels: int | None
    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...] = ("train", "test")
    dirnames: tuple[str, ...] = ()  # sub-folders searched under each base directory
    standard_dirs: tuple[str, ...] = ()
    downloads: tuple[Download, ...] = ()
    how_to: str = ""
    classes: tuple[str, ...] | None = None


def _idx_downloads(base: str, md5s: Sequence[str]) -> tuple[Download, ...]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    return tuple(Download(base + n, m) for n, m in zip(names, md5s))


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"


def _how_to_archive(url: str, folder: str) -> str:
    return (f"download {url}, extract it (it contains {folder}/) into DIR, then pass data.root=DIR "
            f"(root=DIR in Python) or set SELFSUP_DATA=DIR")


# Statistics: Fashion-MNIST/MNIST/CIFAR as commonly quoted from the train splits (Fashion-MNIST is re-checked
# against the real files in tests/test_datasets.py); STL-10 from the train+unlabeled images; folders: ImageNet.
DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 1, 28, (0.2860,), (0.3530,),
        dirnames=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        standard_dirs=("/usr/share/datasets/fashion-mnist",),
        downloads=_idx_downloads(_FMNIST_URL, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                               "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
        how_to=("`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs "
                "/usr/share/datasets/fashion-mnist), or download train-images-idx3-ubyte.gz, "
                f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
                f"{_FMNIST_URL} into DIR and pass data.root=DIR (or put them in $SELFSUP_DATA/fashion-mnist)"),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    ),
    "mnist": DatasetInfo(
        "mnist", 1, 28, (0.1307,), (0.3081,),
        dirnames=("mnist", "MNIST/raw"),
        standard_dirs=("/usr/share/datasets/mnist",),
        downloads=_idx_downloads(_MNIST_URL, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
        how_to=("download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                f"t10k-labels-idx1-ubyte.gz from {_MNIST_URL} into DIR and pass data.root=DIR (or put them in "
                "$SELFSUP_DATA/mnist)"),
        classes=tuple(str(i) for i in range(10)),
    ),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        dirnames=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
        downloads=(Download(_CIFAR10_URL, "c58f30108f718f92721af3b95e74349a", extract=True),),
        how_to=_how_to_archive(_CIFAR10_URL, "cifar-10-batches-py"),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "cifar100": DatasetInfo(
        "cifar100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        dirnames=("cifar-100-python", "cifar100/cifar-100-python"),
        downloads=(Download(_CIFAR100_URL, "eb9058c3a382ffc7106e4002c42a8d85", extract=True),),
        how_to=_how_to_archive(_CIFAR100_URL, "cifar-100-python"),
    ),
    "stl10": DatasetInfo(
        "stl10", 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
        splits=("train", "test", "unlabeled", "train+unlabeled"),
        dirnames=("stl10_binary", "stl10/stl10_binary"),
        downloads=(Download(_STL10_URL, "91f7769df0f17e558f3565bffb0c7dfb", extract=True),),
        how_to=_how_to_archive(_STL10_URL, "stl10_binary") + " (2.6 GB)",
        classes=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    ),
    "folder": DatasetInfo("folder", None, None, _IMAGENET_MEAN, _IMAGENET_STD, splits=()),
}

_ALIASES = {"fmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10", "imagefolder": "folder",
            "image_folder": "folder"}


def canonical_name(name: str) -> str:
    """Resolve aliases ("fmnist", "fashion-mnist", "cifar-10", ...); unknown names -> ValueError with a hint."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_INFO:
        known = sorted(DATASET_INFO) + sorted(_ALIASES)
        hint = difflib.get_close_matches(key, known, n=1)
        raise ValueError(f"unknown dataset {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; known: {', '.join(sorted(DATASET_INFO))}")
    return key


def dataset_stats(name: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default per-channel ``(mean, std)`` for normalization; "folder": ImageNet for RGB, (0.5,), (0.5,) for gray."""
    info = DATASET_INFO[canonical_name(name)]
    if info.name == "folder" and channels == 1:
        return (0.5,), (0.5,)
    return info.mean, info.std


# ----------------------------------------------------------------------------------------------- caches


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/selfsup`` or ``~/.cache/selfsup``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfsup"


def _is_writable_dir(path: Path) -> bool:
    """Create ``path`` if needed and prove it is writable (os.access lies for root and read-only mounts)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def writable_cache_dir(explicit: str | os.PathLike | None, preferred: Path, fallback: Path) -> Path:
    """``explicit`` (must be writable), else ``preferred``, else ``fallback`` (e.g. when the data is read-only)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not _is_writable_dir(path):
            raise DataError(f"cache_dir {path} cannot be created or written; pass a writable directory")
        return path
    for path in (preferred, fallback):
        if _is_writable_dir(path):
            return path
    raise DataError(f"neither {preferred} nor {fallback} is writable for the dataset cache; pass cache_dir=DIR")


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- download


def _verify_md5(path: str | os.PathLike, md5: str) -> str:
    """Return the md5 of ``path``; a mismatch with ``md5`` -> DataError naming both digests."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != md5.lower():
        raise DataError(f"checksum mismatch for {path}: md5 {h.hexdigest()}, expected {md5}. The file is corrupt "
                        "or not the official one; delete it and download again.")
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` through a temp file in the same folder; rename only once the md5 matches."""
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        _verify_md5(tmp, md5)
    except (OSError, ValueError) as e:  # URLError and socket errors are OSErrors; ValueError: malformed URL
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {e}") from e
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def _extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths, "..", devices (PEP 706)
                tar.extractall(dest, filter="data")
            else:  # Python < 3.10.12: same guard by hand
                root = dest.resolve()
                for member in tar.getmembers():
                    if not (dest / member.name).resolve().is_relative_to(root) or member.isdev():
                        raise DataError(f"{archive}: refusing to extract unsafe member {member.name!r}")
                tar.extractall(dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"could not extract {archive}: {e}; delete it and download again") from e


def _download_dataset(info: DatasetInfo, dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create download folder {dest}: {e}") from e
    for item in info.downloads:
        target = dest / item.filename
        if target.exists():
            try:
                _verify_md5(target, item.md5)
            except DataError:
                target.unlink()
        if not target.exists():
            _download(item.url, target, item.md5)
        if item.extract:
            _extract(target, dest)
            target.unlink()


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


def _idx_read(directory: Path, split: str, info: DatasetInfo, cache_dir) -> ImageDataset:
    images_path, labels_path = (_idx_file(directory, split, kind) for kind in ("images", "labels"))
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                        "the two files come from different releases or one is corrupt")
    if len(labels) and labels.max() >= len(info.classes):
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{len(info.classes) - 1}")
    return _dataset(images[:, None], labels, list(info.classes), info, split)


def _dataset(images: np.ndarray, labels: np.ndarray | None, classes, info: DatasetInfo, split: str) -> ImageDataset:
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(_numpy_to_tensor(images), y, classes, f"{info.name}/{split}")


# ----------------------------------------------------------------------------------------------- CIFAR

_CIFAR = {  # split -> batch files, label key, (meta file, names key)
    "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels",
                ("batches.meta", b"label_names")),
    "cifar100": ({"train": ["train"], "test": ["test"]}, b"fine_labels", ("meta", b"fine_label_names")),
}


def _unpickle(path: Path) -> dict:
    """The official CIFAR python pickles (trusted content: only load files whose checksum you know)."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"cannot unpickle {path}: {e!r}. The file is truncated or corrupt; download it again.") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dict (got {type(obj).__name__})")
    return obj


def _cifar_has(name: str) -> Callable[[Path, str], bool]:
    return lambda directory, split: all((directory / f).is_file() for f in _CIFAR[name][0][split])


def _cifar_read(directory: Path, split: str, info: DatasetInfo, cache_dir) -> ImageDataset:
    files, label_key, (meta_file, names_key) = _CIFAR[info.name]
    images, labels = [], []
    for path in (directory / f for f in files[split]):
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{path} lacks b'data' or {label_key!r} (keys: {sorted(batch)}); wrong file?")
        data, y = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(y):
            raise DataError(f"{path}: expected uint8 data (N, 3072) with N labels; got {data.dtype} {data.shape} "
                            f"and {len(y)} labels")
        images.append(data.reshape(-1, 3, 32, 32))  # each row: 1024 R, 1024 G, 1024 B, each row-major 32x32
        labels.append(y)
    meta = directory / meta_file
    classes = ([c.decode() for c in _unpickle(meta)[names_key]] if meta.is_file()
               else list(info.classes) if info.classes else None)
    y = np.concatenate(labels)
    if classes is not None and len(y) and y.max() >= len(classes):
        raise DataError(f"{directory}: label {y.max()} outside 0..{len(classes) - 1}")
    return _dataset(np.concatenate(images), y, classes, info, split)


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


def _stl_read(directory: Path, split: str, info: DatasetInfo, cache_dir) -> ImageDataset:
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


# ----------------------------------------------------------------------------------------------- finding


@dataclass(frozen=True)
class _Format:
    has: Callable[[Path, str], bool]  # (directory, split) -> are all files of the split there?
    read: Callable[[Path, str, DatasetInfo, str | os.PathLike | None], ImageDataset]


_FORMATS = {
    "fashion_mnist": _Format(_idx_has, _idx_read),
    "mnist": _Format(_idx_has, _idx_read),
    "cifar10": _Format(_cifar_has("cifar10"), _cifar_read),
    "cifar100": _Format(_cifar_has("cifar100"), _cifar_read),
    "stl10": _Format(_stl_has, _stl_read),
}


def _search_bases(info: DatasetInfo, root) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    env = [Path(p).expanduser() for p in os.environ.get("SELFSUP_DATA", "").split(os.pathsep) if p]
    return env + [Path(d) for d in info.standard_dirs] + [cache_home() / info.name]


def _find(info: DatasetInfo, split: str, bases: list[Path]) -> Path | None:
    has = _FORMATS[info.name].has
    for base in bases:
        for directory in (base, *(base / d for d in info.dirnames)):
            if directory.is_dir() and has(directory, split):
                return directory
    return None


def _locate(info: DatasetInfo, split: str, root, download: bool) -> Path:
    bases = _search_bases(info, root)
    found = _find(info, split, bases)
    if found is not None:
        return found
    subs = f" (and their sub-folders {', '.join(info.dirnames)})" if info.dirnames else ""
    missing = (f"{info.name} ({split} split) not found in {', '.join(map(str, bases))}{subs}. "
               f"To get it: {info.how_to}.")
    if not download:
        raise DataError(missing + " (download=False; pass download=True to fetch it.)")
    dest = bases[0] if root is not None else cache_home() / info.name
    try:
        _download_dataset(info, dest)
    except DataError as e:
        raise DataError(f"{e}\n{missing}") from e
    found = _find(info, split, [dest])
    if found is None:
        raise DataError(f"downloaded {info.name} into {dest} but the {split} files are still missing. {missing}")
    return found


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, *, download: bool = True,
                 image_size: int | None = None, on_error: str = "skip",
                 cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load ``split`` of dataset ``name`` as uint8 (N, C, H, W) (see the module docstring for where it looks).

    ``name``: fashion_mnist (fmnist, fashion-mnist), mnist, cifar10, cifar100, stl10, folder. Splits: train, test;
    stl10 also unlabeled and train+unlabeled (labels None); folder: ``root/split`` when it exists, else ``root``.
    ``image_size`` resizes folder images only (default 64); fixed-size datasets accept None or their own size,
    since resizing is the view pipeline's job. ``on_error`` ("skip" | "raise") applies to unreadable folder images;
    corrupt files of the official datasets always raise DataError.
    """
    key = canonical_name(name)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if key == "folder":
        from selfsup.data.folder import load_folder  # here, not at the top: folder.py imports this module

        return load_folder(root, split, image_size=image_size, on_error=on_error, cache_dir=cache_dir)
    info = DATASET_INFO[key]
    if split not in info.splits:
        raise ValueError(f"unknown split {split!r} for {key}; valid: {', '.join(info.splits)}")
    if image_size is not None and image_size != info.size:
        raise ValueError(f"{key} images are {info.size}x{info.size}; image_size={image_size} only applies to "
                         "folder datasets. Leave it unset and set the crop size of the view pipeline instead.")
    directory = _locate(info, split, root, download)
    return _FORMATS[key].read(directory, split, info, cache_dir)
