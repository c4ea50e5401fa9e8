"""Image-folder reader: decode a tree of images once into a uint8 memmap cache, then re-use it.

Layout (as torchvision's ``ImageFolder``): ``root/[split/]class_x/**/img.png`` gives labels from the class
sub-folders (sorted names -> 0..K-1); images directly in the folder give an unlabeled dataset, which is all
self-supervised pre-training needs (cookbook §1). Each image is converted to RGB (or L when every image is
grayscale), resized so its short side is ``image_size`` (bilinear, antialiased), then center-cropped to a square:
torchvision's ``Resize(s)`` + ``CenterCrop(s)`` sizing and rounding.

What each kind of file becomes (:func:`to_8bit`), so that no file turns silently into wrong pixels:

- the EXIF orientation is applied first (a phone photo tagged "rotate 90°" comes out upright);
- 16-bit grayscale ("I;16*": 16-bit PNG and TIFF) is scaled to 8 bit by ``round(v / 257)``, the exact linear
  map of 0..65535 onto 0..255 (Pillow's own ``convert("L")`` clips everything above 255 to white);
- 32-bit integer ("I") images are read as 16-bit when their values lie in 0..65535, and skipped otherwise;
- 32-bit float ("F", float TIFF) images are read as ``round(255 x)`` when their values lie in [0, 1], and skipped
  otherwise (no guessing between [0, 1], [0, 255] or a min-max stretch that would differ image to image);
- transparency (RGBA, LA, palette or RGB/L with a transparent color) is composited onto black, i.e. the color
  is multiplied by its alpha: a fully transparent pixel is black whatever color it hides. Dropping the alpha,
  as ``convert("RGB")`` does, would show the hidden colors and turn a white logo on a transparent background
  into a white square;
- CMYK (e.g. Photoshop JPEGs) and palette images go through Pillow's conversion to RGB (ICC profiles ignored);
- an image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's decompression-bomb limit, 89.5 M by
  default) is skipped, with a reason saying how to raise the limit: decoding it would take gigabytes of memory
  per worker thread.

Files that cannot be used are skipped and listed with a reason (``ImageDataset.skipped`` / ``skip_reasons``), or
raise :class:`DataError` with ``on_error="raise"``: empty, truncated or non-image files, unreadable ones, broken
symbolic links, and symbolic links to a folder that contains them (a loop, which ``os.walk(followlinks=True)``
would follow over and over). Symbolic links to other folders are followed.

The decoded images go to ``<cache>/<folder>-<hash>-<size>.u8`` (raw ``uint8 (N, C, S, S)``) next to a JSON index
(file list with sizes, mtimes and permission bits, labels, skipped files with their reasons, image size). A later
load whose file list, sizes, mtimes, permissions and image size all match maps that file without decoding
anything. ``ImageDataset.fingerprint`` (:func:`folder_fingerprint`) identifies the kept files, so that a resumed
run can tell whether it trains on the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from selfsup.data.download import atomic_write_json, cache_home, writable_cache_dir
from selfsup.data.types import DataError, ImageDataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_IMAGE_SIZE = 64  # when no image header can be read to decide one (every file is then skipped anyway)
AUTO_SIZE_LIMIT = 224  # the most the images decide on their own: the standard ImageNet crop. Bigger photos would
                       # make large caches and slow views for a first run; data.image_size=N chooses any size
_SIZE_SAMPLE = 256     # image headers read (evenly spaced over the sorted files) to decide the size
_CACHE_VERSION = 2  # 2: file entries carry the permission bits; skip reasons reworded
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_EXIF_ORIENTATION = 0x0112
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 moved the constants
_WORKERS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding


class UnusableImage(Exception):
    """A file this reader refuses on purpose; the message is the reason recorded for it."""


# ----------------------------------------------------------------------------------------------- finding files


def scan_images(directory: Path) -> tuple[list[str], list[list[str]]]:
    """The image files under ``directory`` and the entries that had to be left out.

    Returns ``(files, problems)``: ``files`` are relative POSIX paths, sorted; ``problems`` are ``[path, reason]``
    pairs for broken symbolic links, special files (a FIFO named ``x.png`` would block the reader), folders that
    cannot be listed, and symbolic links to a folder already on the current path (a loop: not followed). Other
    symbolic links to folders are followed. Hidden files and folders are ignored.
    """
    found: list[str] = []
    problems: list[list[str]] = []
    top = directory.stat()
    stack = [(directory, "", frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:
            problems.append([rel.rstrip("/") or ".", f"cannot list this folder: {e.strerror}; make it readable "
                             "(chmod a+rx) or remove it"])
            continue
        for entry in entries:
            path = rel + entry.name
            try:
                st = os.stat(entry.path)  # follows symbolic links
            except OSError as e:
                if _has_image_extension(entry.name):
                    problems.append([path, _stat_problem(entry, e)])
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    problems.append([path, f"symbolic link to {os.path.realpath(entry.path)}, a folder that "
                                           "contains it: a loop, not followed; delete the link"])
                else:
                    stack.append((Path(entry.path), path + "/", ancestors | {key}))
            elif _has_image_extension(entry.name):
                if stat.S_ISREG(st.st_mode):
                    found.append(path)
                else:
                    problems.append([path, "not a regular file (a device, FIFO or socket); delete it"])
    return sorted(found), problems


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _stat_problem(entry: os.DirEntry, e: OSError) -> str:
    """The reason for an entry whose ``os.stat`` failed: mostly a symbolic link whose target is gone."""
    if entry.is_symlink():
        try:
            target = repr(os.readlink(entry.path))
        except OSError:
            target = "a missing target"
        return f"broken symbolic link to {target} ({e.strerror}); restore its target or delete the link"
    return f"cannot read its status ({e.strerror}); check the file system"


def labels_from_subfolders(files: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """Class = first path component, when every file sits in a sub-folder; otherwise no labels."""
    tops = [f.split("/", 1)[0] if "/" in f else None for f in files]
    if not files or None in tops:
        return None, None
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops], classes


def _stat_files(directory: Path, files: list[str]) -> tuple[list[str], list[list], list[list[str]]]:
    """``(files still there, [[file, size, mtime_ns, mode], ...], problems)``: a file may vanish after the scan."""
    kept, entries, problems = [], [], []
    for f in files:
        try:
            s = (directory / f).stat()
        except OSError as e:
            problems.append([f, f"cannot stat it: {e.strerror}"])
            continue
        kept.append(f)
        entries.append([f, s.st_size, s.st_mtime_ns, stat.S_IMODE(s.st_mode)])
    return kept, entries, problems


def folder_fingerprint(entries: list[list]) -> str:
    """A short sha1 over ``[relative path, size, mtime_ns]`` of the kept files, in order.

    It changes when an image is added, removed, renamed (or moved to another class folder) or rewritten, and stays
    the same for an identical reload, wherever the folder is mounted. Copying the folder without preserving
    mtimes (``cp`` without ``-p``) changes it too.
    """
    payload = json.dumps([[f, size, mtime] for f, size, mtime, *_ in entries], separators=(",", ":"))
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- sizing


def typical_side(sizes: list[tuple[int, int]]) -> int:
    """The square side images of these ``(width, height)`` sizes are resized to when nobody chose one: their
    median short side (so one odd thumbnail or panorama does not decide), at most :data:`AUTO_SIZE_LIMIT`."""
    if not sizes:
        raise ValueError("typical_side needs at least one image size")
    shorts = sorted(min(w, h) for w, h in sizes)
    return min(shorts[len(shorts) // 2], AUTO_SIZE_LIMIT)


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception:  # noqa: BLE001 - an unreadable file is skipped (with its reason) by the decoding pass
        return None


def folder_side(directory: Path, files: list[str]) -> int:
    """:func:`typical_side` of up to :data:`_SIZE_SAMPLE` files (evenly spaced), from their headers alone."""
    step = max(1, len(files) // _SIZE_SAMPLE)
    with ThreadPoolExecutor(_WORKERS) as pool:
        sizes = [s for s in pool.map(_header_size, (directory / f for f in files[::step])) if s is not None]
    return typical_side(sizes) if sizes else DEFAULT_IMAGE_SIZE


# ----------------------------------------------------------------------------------------------- decoding


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


def _has_alpha(im: Image.Image) -> bool:
    return (im.mode in _ALPHA_MODES or "transparency" in im.info
            or (im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")))


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as an 8-bit ``mode`` ("L" or "RGB") image, by the rules of the module docstring.

    Raises :class:`UnusableImage` for integer images outside 0..65535 and float images outside [0, 1].
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UnusableImage(f"32-bit integer image with values in {a.min()}..{a.max()}: only 0..65535 (16 bit) "
                                "is read; save it as an 8- or 16-bit image")
        im = Image.fromarray(((a + 128) // 257).astype(np.uint8))  # round(v / 257): 0..65535 -> 0..255
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            lo, hi = np.nanmin(a), np.nanmax(a)
            nan = ", with NaN or infinite values" if not np.isfinite(a).all() else ""
            raise UnusableImage(f"32-bit float image with values in [{lo:g}, {hi:g}]{nan}: only floats in [0, 1] "
                                "are read (as round(255 x)); rescale it to [0, 1] or save it as an 8- or 16-bit image")
        im = Image.fromarray(np.rint(a * 255).astype(np.uint8))
    elif _has_alpha(im):  # composite onto black: color * alpha / 255, rounded
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        im = Image.fromarray(((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8))
    return im.convert(mode)


def _decompression_bomb(w: int, h: int) -> UnusableImage | None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or w * h <= limit:
        return None
    return UnusableImage(f"{w}x{h} = {w * h:,} pixels, over Pillow's decompression-bomb limit "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,}; downscale the image, or if you trust it raise that "
                         "limit (or set it to None) before loading")


def _probe(path: Path) -> str | Exception:
    """The image mode from the header alone (no pixel decoding), or why the file cannot be used."""
    try:
        if path.stat().st_size == 0:
            raise UnusableImage("empty file (0 bytes); delete it or copy it again")
        with Image.open(path) as im:
            bomb = _decompression_bomb(*im.size)
            if bomb is not None:
                raise bomb
            return im.mode
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        return e


def decode_image(path: Path, size: int, mode: str) -> np.ndarray | Exception:
    """(C, size, size) uint8 in ``mode`` ("L" or "RGB"), upright, or the error; gray -> RGB replicates the channel.
    The one decoder of image files: the folder cache and `selfsup embed` use it."""
    try:
        with Image.open(path) as im:
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            a = np.asarray(resize_center_crop(to_8bit(im, mode), size))
    except Exception as e:  # noqa: BLE001 - see _probe
        return e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def skip_reason(e: Exception) -> str:
    """Why a file was skipped, and what to do about it, in one line."""
    if isinstance(e, UnusableImage):
        return str(e)
    if isinstance(e, PermissionError):
        return f"permission denied ({e.strerror}); make it readable (chmod a+r) or delete it"
    if isinstance(e, FileNotFoundError):
        return "the file disappeared while the folder was being read; load it again"
    if isinstance(e, Image.DecompressionBombError):
        return (f"{e}; downscale the image, or if you trust it raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) "
                "before loading")
    if isinstance(e, UnidentifiedImageError):
        return (f"not an image Pillow can read ({e}): another kind of file with an image extension, or a corrupt "
                "header; convert it or delete it")
    return (f"cannot decode it ({type(e).__name__}: {e}): the file is truncated, corrupt or in a mode this reader "
            "does not convert; re-save it as an 8-bit RGB or grayscale image, or delete it")


def _build_cache(directory: Path, files: list[str], size: int, data_path: Path) -> dict:
    """Decode every file into ``data_path`` (atomically) and return the index describing it."""
    paths = [directory / f for f in files]
    with ThreadPoolExecutor(_WORKERS) as pool:
        modes = list(pool.map(_probe, paths))
        readable = [i for i, m in enumerate(modes) if isinstance(m, str)]
        skipped = [[files[i], skip_reason(m)] for i, m in enumerate(modes) if isinstance(m, Exception)]
        mode = "L" if readable and all(modes[i] in GRAY_MODES for i in readable) else "RGB"
        channels = 1 if mode == "L" else 3
        kept: list[int] = []
        tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
        if readable:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(readable), channels, size, size))
            for i, result in zip(readable, pool.map(lambda i: decode_image(paths[i], size, mode), readable)):
                if isinstance(result, Exception):  # e.g. a truncated file whose header was fine
                    skipped.append([files[i], skip_reason(result)])
                else:
                    out[len(kept)] = result
                    kept.append(i)
            out.flush()
            del out
            os.truncate(tmp, len(kept) * channels * size * size)  # rows are contiguous: drop the unused tail
            os.replace(tmp, data_path)
    return {"version": _CACHE_VERSION, "directory": str(directory), "image_size": size, "channels": channels,
            "count": len(kept), "kept": kept, "skipped": sorted(skipped)}


def _cache_is_valid(index: dict, entries: list, size: int, data_path: Path) -> bool:
    """Same format version, image size and files (names, sizes, mtimes, modes), and a data file of the right length."""
    keys = ("count", "channels", "kept", "skipped", "labels", "classes")
    if index.get("version") != _CACHE_VERSION or index.get("image_size") != size or not all(k in index for k in keys):
        return False
    if index.get("files") != entries:
        return False
    expected = index["count"] * index["channels"] * size * size
    return index["count"] == 0 or (data_path.is_file() and data_path.stat().st_size == expected)


def _read_index(index_path: Path) -> dict:
    try:
        return json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (``flock``): the processes of a multi-process run on one machine
    (torchrun, srun) load the same folder at once, and without it each decoded every image into the same cache. The
    first takes the lock and decodes; the others wait, then map what it wrote. Where locks are not supported (no
    fcntl, or a file system that refuses them) every process decodes, as before: correct, only slower."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        f = open(lock_path, "a+")
    except OSError:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- loading


def load_folder(root: str | os.PathLike | None, split: str = "train", *, image_size: int | None = None,
                on_error: str = "skip", cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Images under ``root/split`` (when that folder exists) or ``root``, as a memmapped :class:`ImageDataset`.

    Each image is resized (short side) and center-cropped to ``image_size``; None: the images decide
    (:func:`folder_side`: their median short side, at most :data:`AUTO_SIZE_LIMIT`).

    ``cache_dir`` defaults to ``$XDG_CACHE_HOME/selfsup/folder`` (``~/.cache/selfsup/folder``), keyed by the folder's
    absolute path, and falls back to ``root/.selfsup_cache`` when that cannot be written. Files that cannot be used (module docstring) are listed in ``skipped`` with the matching
    ``skip_reasons`` (``on_error="skip"``), or raise DataError naming the first of them (``"raise"``).
    ``fingerprint`` identifies the kept files (:func:`folder_fingerprint`).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if root is None:
        raise DataError("the folder dataset needs a root: pass data.root=PATH (root=PATH in Python) pointing at a "
                        "folder of images, optionally in class sub-folders")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist or is not a directory; check data.root")
    directory = base / split if (base / split).is_dir() else base
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    files, problems = scan_images(directory)
    files, entries, vanished = _stat_files(directory, files)
    problems += vanished
    if not files and not problems:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {directory}")
    size = folder_side(directory, files) if image_size is None else int(image_size)
    labels, classes = labels_from_subfolders(files)

    cache = writable_cache_dir(cache_dir, cache_home() / "folder", base / ".selfsup_cache")  # not in the user's
    # image folder (shared, synced or read-only), unless the user's cache directory cannot be written
    key = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:12]
    stem = cache / f"{directory.name or 'root'}-{key}-{size}"
    data_path, index_path = stem.with_suffix(".u8"), stem.with_suffix(".json")
    index = _read_index(index_path)
    if not _cache_is_valid(index, entries, size, data_path):
        with _exclusive(stem.with_suffix(".lock")):  # the processes of a node: one decodes, the others wait for it
            index = _read_index(index_path)
            if not _cache_is_valid(index, entries, size, data_path):
                index = _build_cache(directory, files, size, data_path)
                index.update(files=entries, classes=classes,
                             labels=None if labels is None else [labels[i] for i in index["kept"]])
                atomic_write_json(index_path, index)

    skipped = sorted(problems + index["skipped"])
    if on_error == "raise" and skipped:
        path, reason = skipped[0]
        raise DataError(f"cannot read image {directory / path}: {reason} ({len(skipped)} unusable file(s); fix or "
                        "delete them, or use on_error='skip' (data.on_error=skip) to train without them)")
    if index["count"] == 0:
        first = "; ".join(f"{directory / p}: {r}" for p, r in skipped[:3])
        raise DataError(f"none of the {len(skipped)} image files under {directory} could be read ({first})")
    shape = (index["count"], index["channels"], size, size)
    images = torch.from_numpy(np.memmap(data_path, dtype=np.uint8, mode="c", shape=shape))
    y = None if index["labels"] is None else torch.tensor(index["labels"], dtype=torch.int64)
    return ImageDataset(images, y, index["classes"], f"folder/{directory.name}",
                        skipped=[str(directory / p) for p, _ in skipped], skip_reasons=[r for _, r in skipped],
                        fingerprint=folder_fingerprint([index["files"][i] for i in index["kept"]]))
