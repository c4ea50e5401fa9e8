"""Image-folder reader: decode a tree of images once into a uint8 memmap cache, then re-use it.

Layout (as torchvision's ``ImageFolder``): ``root/[split/]class_x/**/img.png`` gives labels from the class
sub-folders (sorted names -> 0..K-1); images directly in the folder give an unlabeled dataset, which is all
self-supervised pre-training needs (cookbook §1). Each image is converted to RGB (or L when every image is
grayscale), resized so its short side is ``image_size`` (bilinear, antialiased), then center-cropped to a square:
torchvision's ``Resize(s)`` + ``CenterCrop(s)`` sizing and rounding.

The decoded images go to ``<cache>/<folder>-<hash>-<size>.u8`` (raw ``uint8 (N, C, S, S)``) next to a JSON index
(file list with sizes and mtimes, labels, skipped files with their errors, image size). A later load whose file
list, sizes, mtimes and image size all match maps that file without decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.data.download import atomic_write_json, cache_home, writable_cache_dir
from selfsup.data.types import DataError, ImageDataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_IMAGE_SIZE = 64
_CACHE_VERSION = 1
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 moved the constants
_WORKERS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding


def scan_images(directory: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``directory``, sorted; hidden files and folders skipped."""
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(current).relative_to(directory)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def labels_from_subfolders(files: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """Class = first path component, when every file sits in a sub-folder; otherwise no labels."""
    tops = [f.split("/", 1)[0] if "/" in f else None for f in files]
    if not files or None in tops:
        return None, None
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops], classes


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Short side -> ``size`` (long side ``int(size * long / short)``), then the centered ``size`` x ``size`` crop."""
    w, h = im.size
    if min(w, h) != size:
        if w <= h:
            im = im.resize((size, int(size * h / w)), _BILINEAR)
        else:
            im = im.resize((int(size * w / h), size), _BILINEAR)
    w, h = im.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return im.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else im


def _probe(path: Path) -> str | Exception:
    """The image mode from the header alone (no pixel decoding), or the error opening it."""
    try:
        with Image.open(path) as im:
            return im.mode
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        return e


def _decode(path: Path, size: int, mode: str) -> np.ndarray | Exception:
    """(C, size, size) uint8 in ``mode`` ("L" or "RGB"), or the error; gray -> RGB replicates the channel."""
    try:
        with Image.open(path) as im:
            a = np.asarray(resize_center_crop(im.convert(mode), size))
    except Exception as e:  # noqa: BLE001 - see _probe
        return e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _build_cache(directory: Path, files: list[str], size: int, data_path: Path) -> dict:
    """Decode every file into ``data_path`` (atomically) and return the index describing it."""
    paths = [directory / f for f in files]
    with ThreadPoolExecutor(_WORKERS) as pool:
        modes = list(pool.map(_probe, paths))
        readable = [i for i, m in enumerate(modes) if isinstance(m, str)]
        skipped = [[files[i], _error(m)] for i, m in enumerate(modes) if isinstance(m, Exception)]
        mode = "L" if readable and all(modes[i] in _GRAY_MODES for i in readable) else "RGB"
        channels = 1 if mode == "L" else 3
        kept: list[int] = []
        tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
        if readable:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(readable), channels, size, size))
            for i, result in zip(readable, pool.map(lambda i: _decode(paths[i], size, mode), readable)):
                if isinstance(result, Exception):  # e.g. a truncated file whose header was fine
                    skipped.append([files[i], _error(result)])
                else:
                    out[len(kept)] = result
                    kept.append(i)
            out.flush()
            del out
            os.truncate(tmp, len(kept) * channels * size * size)  # rows are contiguous: drop the unused tail
            os.replace(tmp, data_path)
    return {"version": _CACHE_VERSION, "directory": str(directory), "image_size": size, "channels": channels,
            "count": len(kept), "kept": kept, "skipped": sorted(skipped)}


def _cache_is_valid(index: dict, fingerprint: list, size: int, data_path: Path) -> bool:
    """Same format version, image size and files (names, sizes, mtimes), and a data file of the right length."""
    keys = ("count", "channels", "kept", "skipped", "labels", "classes")
    if index.get("version") != _CACHE_VERSION or index.get("image_size") != size or not all(k in index for k in keys):
        return False
    if index.get("files") != fingerprint:
        return False
    expected = index["count"] * index["channels"] * size * size
    return index["count"] == 0 or (data_path.is_file() and data_path.stat().st_size == expected)


def _fingerprint(directory: Path, files: list[str]) -> list:
    stats = [(directory / f).stat() for f in files]
    return [[f, s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)]


def load_folder(root: str | os.PathLike | None, split: str = "train", *, image_size: int | None = None,
                on_error: str = "skip", cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Images under ``root/split`` (when that folder exists) or ``root``, as a memmapped :class:`ImageDataset`.

    ``cache_dir`` defaults to ``root/.selfsup_cache`` and falls back to ``~/.cache/selfsup/folder`` when root is
    read-only. Unreadable files are listed in ``skipped`` (``on_error="skip"``) or raise DataError ("raise").
    """
    if root is None:
        raise DataError("the folder dataset needs a root: pass data.root=PATH (root=PATH in Python) pointing at a "
                        "folder of images, optionally in class sub-folders")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist or is not a directory; check data.root")
    directory = base / split if (base / split).is_dir() else base
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    files = scan_images(directory)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {directory}")
    labels, classes = labels_from_subfolders(files)

    cache = writable_cache_dir(cache_dir, base / ".selfsup_cache", cache_home() / "folder")
    key = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:12]
    stem = cache / f"{directory.name or 'root'}-{key}-{size}"
    data_path, index_path = stem.with_suffix(".u8"), stem.with_suffix(".json")
    fingerprint = _fingerprint(directory, files)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if not _cache_is_valid(index, fingerprint, size, data_path):
        index = _build_cache(directory, files, size, data_path)
        index.update(files=fingerprint, classes=classes,
                     labels=None if labels is None else [labels[i] for i in index["kept"]])
        atomic_write_json(index_path, index)

    if on_error == "raise" and index["skipped"]:
        path, err = index["skipped"][0]
        raise DataError(f"cannot read image {directory / path}: {err} ({len(index['skipped'])} unreadable file(s); "
                        "fix or delete them, or use on_error='skip')")
    if index["count"] == 0:
        first = "; ".join(f"{directory / p}: {e}" for p, e in index["skipped"][:3])
        raise DataError(f"none of the {len(files)} image files under {directory} could be read ({first})")
    shape = (index["count"], index["channels"], size, size)
    images = torch.from_numpy(np.memmap(data_path, dtype=np.uint8, mode="c", shape=shape))
    y = None if index["labels"] is None else torch.tensor(index["labels"], dtype=torch.int64)
    return ImageDataset(images, y, index["classes"], f"folder/{directory.name}",
                        skipped=[str(directory / p) for p, _ in index["skipped"]])
