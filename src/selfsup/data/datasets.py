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

Downloads (md5-checked, atomic) live in :mod:`selfsup.data.download`, the official-format readers in
:mod:`selfsup.data.formats`, the readers for image folders in :mod:`selfsup.data.folder`, and
:class:`ImageDataset` / :class:`DataError` in :mod:`selfsup.data.types` (re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The `name as name` imports re-export names that lived here before the split (folder.py and the tests use them).
from selfsup.data.download import _download_dataset, cache_home
from selfsup.data.download import _verify_md5 as _verify_md5
from selfsup.data.download import atomic_write_json as atomic_write_json
from selfsup.data.download import writable_cache_dir as writable_cache_dir
from selfsup.data.folder import load_folder
from selfsup.data.formats import _cifar_has, _cifar_read, _idx_has, _idx_read, _stl_has, _stl_read
from selfsup.data.formats import read_idx as read_idx
from selfsup.data.formats import read_stl_images as read_stl_images
from selfsup.data.types import DataError, DataInfo, ImageDataset, _numpy_to_tensor
from selfsup.names import did_you_mean

# ----------------------------------------------------------------------------------------------- from_arrays


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
    "hf": DatasetInfo("hf", None, None, _IMAGENET_MEAN, _IMAGENET_STD, splits=()),  # a save_to_disk folder
}
_USER_DATA = ("folder", "hf")  # datasets of any images: their size and statistics are not known in advance

_ALIASES = {"fmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10", "imagefolder": "folder",
            "image_folder": "folder", "huggingface": "hf", "hugging_face": "hf"}


def canonical_name(name: str) -> str:
    """Resolve aliases ("fmnist", "fashion-mnist", "cifar-10", ...); unknown names -> ValueError with a hint."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_INFO:
        known = sorted(DATASET_INFO) + sorted(_ALIASES)
        raise ValueError(f"unknown dataset {name!r}.{did_you_mean(key, known)} Known: "
                         f"{', '.join(sorted(DATASET_INFO))}")
    return key


def dataset_stats(name: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default per-channel ``(mean, std)`` for normalization; "folder", "hf": ImageNet for RGB, (0.5,), (0.5,) for
    gray."""
    info = DATASET_INFO[canonical_name(name)]
    if info.name in _USER_DATA and channels == 1:
        return (0.5,), (0.5,)
    return info.mean, info.std


def describe_data(data: ImageDataset, stats_name: str) -> DataInfo:
    """The :class:`DataInfo` a method is built from: sample shape, normalization (``dataset_stats(stats_name)``;
    ``stats_name`` is the config's ``data.name``) and number of classes."""
    C = data.image_shape[0]
    mean, std = dataset_stats(stats_name, channels=C)
    return DataInfo("image", data.image_shape, tuple(mean), tuple(std), data.num_classes, data.name, len(data))



# ----------------------------------------------------------------------------------------------- finding


@dataclass(frozen=True)
class _Format:
    has: Callable[[Path, str], bool]  # (directory, split) -> are all files of the split there?
    read: Callable[[Path, str, DatasetInfo, str | os.PathLike | None, bool], ImageDataset]


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
                 cache_dir: str | os.PathLike | None = None, verify: bool = True, image_column: str = "image",
                 label_column: str | None = "label") -> ImageDataset:
    """Load ``split`` of dataset ``name`` as uint8 (N, C, H, W) (see the module docstring for where it looks).

    ``name``: fashion_mnist (fmnist, fashion-mnist), mnist, cifar10, cifar100, stl10, folder, hf. Splits: train,
    test; stl10 also unlabeled and train+unlabeled (labels None); folder: ``root/split`` when it exists, else
    ``root``; hf (a dataset written by ``save_to_disk``, :mod:`selfsup.data.hf`): a DatasetDict's split, or the
    single Dataset as train, with its ``image_column`` and ``label_column``. ``image_size`` resizes folder and hf
    images only (None: the images decide); fixed-size datasets accept None or their own size, since resizing is the
    view pipeline's job. ``on_error`` ("skip" | "raise") applies to unreadable folder images;
    corrupt files of the official datasets always raise DataError.

    ``verify`` (CIFAR only for now) checks each file against the md5 of the official release (as torchvision
    publishes it) before reading it. CIFAR batches are pickles, and unpickling can run code: they are always read
    with an unpickler that admits only dicts, lists, strings, numbers and numpy arrays, and verification also
    refuses a file that differs from the release. Pass ``verify=False`` for your own files in the CIFAR format.
    """
    key = canonical_name(name)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if key == "folder":
        return load_folder(root, split, image_size=image_size, on_error=on_error, cache_dir=cache_dir)
    if key == "hf":
        from selfsup.data.hf import load_hf  # `datasets` is an optional extra, imported only when asked for

        return load_hf(root, split, image_column=image_column, label_column=label_column, image_size=image_size)
    info = DATASET_INFO[key]
    if split not in info.splits:
        raise ValueError(f"unknown split {split!r} for {key}; valid: {', '.join(info.splits)}")
    if image_size is not None and image_size != info.size:
        raise ValueError(f"{key} images are {info.size}x{info.size}; image_size={image_size} only applies to "
                         "folder datasets. Leave it unset and set the crop size of the view pipeline instead.")
    directory = _locate(info, split, root, download)
    return _FORMATS[key].read(directory, split, info, cache_dir, verify)
