"""Cache folders and checksummed downloads of the official dataset files.

Downloads are verified against the md5 of the official files and written to a temp file then renamed, so an
interrupted download never looks complete; archives are extracted with the PEP 706 "data" filter. Which files to
fetch, and where, is decided by :func:`selfsup.data.datasets.load_dataset` from its ``DATASET_INFO`` table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from selfsup.data.types import DataError
from selfsup.runtime import atomic_write

if TYPE_CHECKING:
    from selfsup.data.datasets import DatasetInfo

log = logging.getLogger(__name__)


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
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


# ----------------------------------------------------------------------------------------------- download


def _verify_md5(path: str | os.PathLike, md5: str, hint: str = "") -> str:
    """Return the md5 of ``path``; a mismatch with ``md5`` -> DataError naming both digests (then ``hint``)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != md5.lower():
        raise DataError(f"checksum mismatch for {path}: md5 {h.hexdigest()}, expected {md5}. The file is corrupt "
                        f"or not the official one; delete it and download again.{hint}")
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
