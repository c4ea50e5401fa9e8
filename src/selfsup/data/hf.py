"""Hugging Face datasets saved on disk (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``) as an
:class:`ImageDataset`: ``selfsup train simclr data=hf data.root=PATH [data.image_column=image data.label_column=label]``.

A ``DatasetDict``'s splits are the train and test splits (``data.train_split`` / ``data.test_split``); a single
``Dataset`` is the train split (a labelled one gets a held-out test split, as image folders do: ``data.holdout``).
The image column may hold images (the ``datasets.Image`` feature: PIL images) or arrays (``Array2D``/``Array3D`` or
nested lists: ``H x W``, ``H x W x C`` or ``C x H x W``, integers in 0..255 or floats in [0, 1]). Each image becomes 8-bit RGB,
or grayscale when every image is (the folder reader's rules, :func:`selfsup.data.folder.to_8bit`). Images of one
square size are kept as they are; otherwise, or when ``image_size`` is given, each is resized (short side) and
center-cropped to ``image_size`` or, unset, to the images' typical side (:func:`selfsup.data.folder.typical_side`).
Labels come from a ``ClassLabel`` column (with its class names) or a column of non-negative integers.

``datasets`` is an optional dependency: ``pip install 'selfsup[hf]'``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from selfsup.data.folder import GRAY_MODES, UnusableImage, resize_center_crop, to_8bit, typical_side
from selfsup.data.types import DataError, ImageDataset

_BATCH = 512  # rows read from the Arrow table at a time
_IMAGE_FEATURES = ("Image", "Array2D", "Array3D", "List", "LargeList", "Sequence", "list")  # datasets' feature types
_EXIF_ORIENTATION = 0x0112


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data=hf reads datasets saved by Hugging Face `datasets`, which is not installed: "
                        "pip install 'selfsup[hf]' (or pip install datasets)") from None
    return datasets


def open_saved(root: str | os.PathLike | None):
    """The ``Dataset`` or ``DatasetDict`` saved at ``root`` (memory-mapped, nothing decoded yet)."""
    datasets = _datasets()
    if root is None:
        raise DataError("data=hf needs data.root=PATH: a folder written by Dataset.save_to_disk(PATH) or "
                        "DatasetDict.save_to_disk(PATH)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root={root}: no such folder (data=hf reads a dataset written by save_to_disk)")
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is not a dataset saved with save_to_disk (it has no dataset_dict.json nor "
                        "state.json). Save one from Python with `ds.save_to_disk(PATH)` (a dataset of the Hub: "
                        "datasets.load_dataset(NAME).save_to_disk(PATH)); for a folder of image files use "
                        "data=folder") from None


def saved_splits(saved) -> list[str] | None:
    """The split names of a ``DatasetDict``; None for a single ``Dataset``."""
    return list(saved.keys()) if hasattr(saved, "keys") else None


def has_split(root: str | os.PathLike | None, split: str) -> bool:
    """Whether the dataset saved at ``root`` is a ``DatasetDict`` with ``split``."""
    return split in (saved_splits(open_saved(root)) or [])


def _split(saved, split: str, root) -> tuple[object, str]:
    splits = saved_splits(saved)
    if splits is None:
        if split not in ("train", "all"):  # a single Dataset is the train split
            raise DataError(f"{root} holds a single Dataset, not a DatasetDict with splits: it has no {split!r} "
                            "split (it is the train split; leave data.train_split=train)")
        return saved, Path(root).name
    if split not in splits:
        raise DataError(f"{root} has no split {split!r}; its splits: {', '.join(splits)} (set data.train_split / "
                        "data.test_split)")
    return saved[split], f"{Path(root).name}/{split}"


def _check_columns(ds, image_column: str, label_column: str | None, root) -> str | None:
    """The label column to use (None: no labels); raises DataError naming the columns for a wrong name."""
    datasets = _datasets()
    columns = ", ".join(ds.column_names)
    if image_column not in ds.column_names:
        raise DataError(f"{root} has no column {image_column!r}; its columns: {columns}. Set "
                        "data.image_column=NAME")
    feature = ds.features[image_column]
    if type(feature).__name__ not in _IMAGE_FEATURES:
        raise DataError(f"column {image_column!r} of {root} holds {feature}, not images or arrays; set "
                        f"data.image_column to the image column (columns: {columns})")
    if label_column is None:
        return None
    if label_column not in ds.column_names:
        if label_column == "label":  # the default: a dataset without labels trains as one (no label evaluation)
            return None
        raise DataError(f"{root} has no label column {label_column!r}; its columns: {columns}. Set "
                        "data.label_column=NAME, or data.label_column=null to train without labels")
    feature = ds.features[label_column]
    dtype = getattr(feature, "dtype", "")
    if not isinstance(feature, datasets.ClassLabel) and not str(dtype).startswith(("int", "uint")):
        raise DataError(f"column {label_column!r} of {root} holds {feature}, not integer labels; set "
                        f"data.label_column to a ClassLabel or integer column, or null (columns: {columns})")
    return label_column


def _as_pil(value, row: int, column: str) -> Image.Image:
    """One cell of the image column as a PIL image: a PIL image, image bytes, or an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:  # an undecoded datasets.Image cell
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    a = np.asarray(value)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # C x H x W -> H x W x C
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise DataError(f"row {row} of column {column!r} has shape {a.shape}: not an image (H x W, H x W x C or "
                        "C x H x W with C in 1, 3, 4)")
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8 and a.size and 0 <= a.min() and a.max() <= 255:
        a = a.astype(np.uint8)  # lists of ints are stored as int64
    elif np.issubdtype(a.dtype, np.floating) and a.size and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1:
        a = np.rint(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise DataError(f"row {row} of column {column!r} is a {a.dtype} array with values outside 0..255 (integers) "
                        "or [0, 1] (floats): convert the images to uint8 or floats in [0, 1]")
    return Image.fromarray(a)


def _rows(ds, column: str):
    """``(index, PIL image)`` for every row, read in batches."""
    for start in range(0, len(ds), _BATCH):
        for i, value in enumerate(ds[start:start + _BATCH][column]):
            yield start + i, _as_pil(value, start + i, column)


def _decide_side(sizes: list[tuple[int, int]], image_size: int | None, where: str) -> int | None:
    """The side to resize to, or None to keep images that all share one square size."""
    if image_size is not None:
        return int(image_size)
    distinct = sorted(set(sizes))
    if len(distinct) == 1 and distinct[0][0] == distinct[0][1]:
        return None
    side = typical_side(sizes)
    what = f"{len(distinct)} sizes (e.g. {distinct[0][0]}x{distinct[0][1]} and {distinct[-1][0]}x{distinct[-1][1]})" \
        if len(distinct) > 1 else f"{distinct[0][0]}x{distinct[0][1]} (not square)"
    print(f"selfsup: the images of {where} are {what}: each is resized (short side) and center-cropped to "
          f"{side}x{side}; set data.image_size=N to choose", flush=True)
    return side


def _pixels(im: Image.Image, mode: str, side: int | None, where: str) -> np.ndarray:
    """(C, H, W) uint8 in ``mode``, upright (EXIF), resized and center-cropped to ``side`` unless None."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)
        im = to_8bit(im, mode)
    except UnusableImage as e:
        raise DataError(f"{where}: {e}") from None
    a = np.asarray(resize_center_crop(im, side) if side is not None else im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _labels(ds, column: str | None, root) -> tuple[torch.Tensor | None, list[str] | None]:
    if column is None:
        return None, None
    feature = ds.features[column]
    y = torch.as_tensor(np.asarray(ds[column]), dtype=torch.int64)
    if len(y) and int(y.min()) < 0:
        raise DataError(f"column {column!r} of {root} has negative labels ({int((y < 0).sum())} rows; -1 marks a "
                        "missing label in Hugging Face datasets): drop those rows, or set data.label_column=null to "
                        "train without labels")
    names = getattr(feature, "names", None)
    return y, None if names is None else [str(n) for n in names]


def load_hf(root: str | os.PathLike | None, split: str = "train", *, image_column: str = "image",
            label_column: str | None = "label", image_size: int | None = None) -> ImageDataset:
    """``split`` of the dataset saved at ``root`` as uint8 (N, C, S, S) (module docstring for the rules).

    Raises :class:`DataError` naming the fix: ``datasets`` not installed, not a saved dataset, an unknown split or
    column (the existing ones are listed), a column that holds no images or integer labels.
    """
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    ds, name = _split(open_saved(root), split, root)
    label_column = _check_columns(ds, image_column, label_column, root)
    if len(ds) == 0:
        raise DataError(f"the {split!r} split of {root} has no rows")
    headers = ds.cast_column(image_column, _datasets().Image(decode=False)) \
        if isinstance(ds.features[image_column], _datasets().Image) else ds
    modes, sizes = [], []
    for _, im in _rows(headers, image_column):  # headers only for encoded images: nothing is decoded twice
        modes.append(im.mode)
        sizes.append(im.size)
    mode = "L" if all(m in GRAY_MODES for m in modes) else "RGB"
    side = _decide_side(sizes, image_size, f"{root} ({split})")
    h, w = (sizes[0][1], sizes[0][0]) if side is None else (side, side)
    out = np.empty((len(ds), 1 if mode == "L" else 3, h, w), dtype=np.uint8)
    for i, im in _rows(headers, image_column):
        out[i] = _pixels(im, mode, side, f"row {i} of column {image_column!r} of {root}")
    labels, classes = _labels(ds, label_column, root)
    # the fingerprint `datasets` saved with the data: a resumed run checks that it trains on the same rows
    return ImageDataset(torch.from_numpy(out), labels, classes, f"hf/{name}",
                        fingerprint=getattr(ds, "_fingerprint", None))
