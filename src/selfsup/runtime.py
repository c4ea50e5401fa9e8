"""Device, precision and file-writing choices shared by training and evaluation."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use train.device=auto or cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose matrix units compute bf16 natively (Intel AMX, ``amx_bf16``); AVX2 CPUs only emulate it.

    ``torch.backends.cpu.get_cpu_capability()`` names the vector instruction set PyTorch's own kernels dispatch to,
    which is "AVX512" on AMX parts too, so ask for the tiles themselves: PyTorch's probe, else the CPU flags."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:
            pass
    return "amx_bf16" in cpu_flags()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA GPUs that support it, fp32 on CPUs.

    On an AMX CPU (Intel Xeon, "Sapphire Rapids" and later) bf16 trains SimCLR's default 1.45x faster with the
    same accuracy (docs/scale.md), but it is not reproducible: oneDNN's bf16 convolutions return slightly different
    weight gradients on a kernel's first call than on later ones, so two identical runs differ and a resumed run
    does not equal the uninterrupted one bit for bit. CPU runs keep that guarantee by default; ``train.precision=
    bf16`` is the opt-in (the trainer says so on AMX CPUs, :func:`bf16_hint`)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def bf16_hint(precision: str, device: torch.device) -> str | None:
    """A line for the log when ``precision=auto`` left a CPU that computes bf16 natively in fp32; else None."""
    if precision != "auto" or device.type != "cpu" or not cpu_has_native_bf16():
        return None
    return ("selfsup: this CPU computes bf16 natively (Intel AMX): train.precision=bf16 trains about 1.45x faster "
            "here with the same accuracy, but runs are then not bit-reproducible (kept fp32: docs/scale.md)")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only filesystem, no permission, I/O error, ...).

    An ``OSError`` (``.errno``, ``.filename`` as usual), so existing ``except OSError`` handlers still catch it; its
    message names the file, what went wrong and how to fix it. The ``OSError`` that caused it is chained as
    ``__cause__``. Raised by :func:`atomic_write` and everything built on it, which guarantee that the previous file
    at that path, if any, is left untouched and no temporary file is left behind.
    """

    def __str__(self) -> str:
        return str(self.strerror)


_TEMP_SUFFIX = ".tmp"
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile.mkstemp's alphabet, so its leftovers match too
_TEMP_RANDOM = 8


def _temp_name(name: str) -> str:
    """Name of a temporary file of the atomic writer for destination ``name``: ``.{name}.XXXXXXXX.tmp``."""
    rng = secrets.SystemRandom()
    return f".{name}.{''.join(rng.choice(_TEMP_CHARS) for _ in range(_TEMP_RANDOM))}{_TEMP_SUFFIX}"


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a new, empty temporary file ``.{name}.XXXXXXXX.tmp`` next to ``path``; return it and its mode.

    Created with ``O_EXCL`` and mode 0o666, so the kernel applies the umask (and any default ACL) itself, exactly as
    for ``open(path, "w")``: no umask to read, no race. (``tempfile.mkstemp`` makes every file 0600.)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / _temp_name(path.name)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, f"could not create a unique temporary file next to {path}")


def _set_mode(tmp: Path, path: Path, created_mode: int) -> None:
    """Give ``tmp`` the permissions ``open(path, "w")`` would leave: those of the file it replaces (rewriting a file
    keeps them), else those it was created with (0o666 minus the umask), in case ``write_to`` replaced it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        mode = created_mode
    if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
        os.chmod(tmp, mode)


def _remove_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; a failure to remove must never hide the error being handled."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the device: delayed-allocation filesystems and NFS report ENOSPC/EDQUOT/EIO only
    here. A filesystem that cannot fsync at all (some FUSE mounts: EINVAL, ENOTSUP) is not an error."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX); best effort, a rename already done cannot be undone."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def write_error(path: Path, err: OSError, note: str | None = None) -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path``: what went wrong, where, and what to do."""
    code = err.errno
    reason = err.strerror or str(err) or type(err).__name__
    name = errno.errorcode.get(code, "") if code is not None else ""
    fs = _mount_point(path.parent)
    free = ""
    with contextlib.suppress(OSError):
        free = f" ({shutil.disk_usage(fs).free / 2**20:.0f} MiB free now)"
    elsewhere = "choose another output folder (e.g. out=DIR)"
    fixes = {
        errno.ENOSPC: f"free space on the filesystem mounted at {fs}{free} or {elsewhere}",
        errno.EFBIG: f"the file is larger than this process may write (`ulimit -f`) or than the filesystem at {fs} "
                     f"allows: raise the limit or {elsewhere}",
        errno.EROFS: f"the filesystem at {fs} is mounted read-only: {elsewhere}",
        errno.EACCES: f"fix the permissions of {path.parent} or {elsewhere}",
        errno.EPERM: f"fix the permissions of {path.parent} or {elsewhere}",
        errno.EIO: f"the storage under {fs} reported an I/O error: check the device (dmesg) or {elsewhere}",
    }
    if hasattr(errno, "EDQUOT"):
        fixes[errno.EDQUOT] = f"free space within your disk quota on the filesystem at {fs} or {elsewhere}"
    fix = fixes.get(code, f"check {path.parent} or {elsewhere}")
    if note is None:
        note = (f"the previous {path.name} is intact" if path.exists()
                else f"no partial {path.name} was left")
    tag = f" [{name}]" if name else ""
    message = f"could not write {path}: {reason}{tag}. Fix: {fix}; {note}."
    return WriteError(code, message, str(path))


_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
                 getattr(errno, "EDQUOT", errno.ENOSPC)}


def _os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write, also when a library reports it as another error type.

    ``exc`` itself when it is an ``OSError``. Else one of the write errors (disk full, quota, file too large, I/O,
    read-only, permission) that caused it: ``torch.save`` to a file object turns a failed ``write`` into
    ``RuntimeError("... unexpected pos ...")`` with the ``OSError`` as its ``__context__``, and Rust writers
    (safetensors) raise their own type with ``"(os error 28)"`` in the message. None for anything else (a bug, a bad
    value, Ctrl-C), which then propagates unchanged.
    """
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, Exception):
        return None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e if e.errno in _WRITE_ERRNOS else None
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    match = _RUST_IO_ERROR.search(str(exc))
    if match and int(match.group(1)) in _WRITE_ERRNOS:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def _untouched(paths: list[Path]) -> str:
    """The end of an error message for a group of files of which none was replaced."""
    existing = [p.name for p in paths if p.exists()]
    if not existing:
        return "no partial file was left"
    return f"the previous {', '.join(existing)} {'is' if len(existing) == 1 else 'are'} intact"


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[str], object]]]) -> None:
    """Write several files so that each one is either its previous version or its new one, never a partial file.

    For each ``(path, write_to)``: ``write_to(tmp)`` writes the whole new content to ``tmp``, a new temporary file
    ``.{name}.XXXXXXXX.tmp`` in the same folder, which is then flushed to disk. Only once *every* file is written
    are they renamed over their paths, in order; so a failure while writing (full disk, quota, I/O error, a crash,
    ``kill -9``) leaves all the previous files as they were. The one remaining window, a failure between two
    renames (the renames take no space, so a full disk does not cause it), can mix versions: a set of files that
    must match carries its own check (see ``selfsup.nn.backbones.export_backbone``).

    Files get the permissions ``open(path, "w")`` would give them (0o666 minus the umask, or those of the file
    being replaced). Any ``OSError`` (also one that ``torch.save`` or safetensors report as another error type)
    becomes a :class:`WriteError` naming the path; every temporary file is removed on any failure. A ``kill -9`` cannot clean up: :func:`remove_stale_temp_files` removes what it leaves.
    """
    items = [(Path(p), fn) for p, fn in writes]
    staged: list[tuple[Path, Path]] = []
    current = items[0][0] if items else Path()
    try:
        for path, write_to in items:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, created_mode = _create_temp(path)
            staged.append((tmp, path))
            write_to(str(tmp))
            _fsync_file(tmp)
            _set_mode(tmp, path, created_mode)
    except BaseException as e:
        for tmp, _ in staged:
            _remove_quietly(tmp)
        cause = _os_error_in(e)
        if cause is None or isinstance(cause, WriteError):
            raise
        note = _untouched([p for p, _ in items]) if len(items) > 1 else None
        raise write_error(current, cause, note) from (cause if cause.__traceback__ is not None else e)
    done: list[Path] = []
    for i, (tmp, path) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except BaseException as e:
            for later, _ in staged[i:]:
                _remove_quietly(later)
            if isinstance(e, OSError):
                note = (f"{', '.join(p.name for p in done)} {'was' if len(done) == 1 else 'were'} already replaced, "
                        f"so these files now come from different writes: write them again" if done else None)
                raise write_error(path, e, note) from e
            raise
        done.append(path)
    for folder in dict.fromkeys(path.parent for _, path in staged):
        _fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write_to: Callable[[str], object]) -> None:
    """Call ``write_to(tmp_path)`` on a temporary file in the same folder, then rename it over ``path``: a crash or
    a full disk never leaves a half-written file, and the previous file stays intact. The one atomic writer of the
    package (checkpoints, exports, caches, JSON); see :func:`atomic_write_all` for the details and guarantees.
    Raises :class:`WriteError` (an ``OSError``) naming the path when the file cannot be written."""
    atomic_write_all([(path, write_to)])


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` on a binary file object, atomically (see :func:`atomic_write`), e.g.
    ``atomic_write_bytes(path, lambda f: torch.save(state, f))``."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def save_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON, atomically (see :func:`atomic_write`). A value JSON cannot hold raises before
    anything is written."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporary files that an interrupted atomic write of ``folder/name`` left; return them, sorted.

    A process killed while writing (``kill -9``, out of memory, power loss) leaves ``.{name}.XXXXXXXX.tmp`` next to
    ``name``. Only regular files matching exactly that pattern (8 characters from ``[a-z0-9_]``) are removed:
    never ``name`` itself, nor any other file. Call it when no other process is writing ``folder/name`` (e.g. at
    the start or resume of the run that owns ``folder``): it cannot tell a stale temporary file from one in use.
    A missing folder is not an error.
    """
    folder = Path(folder)
    pattern = re.compile(re.escape(f".{name}.") + f"[{re.escape(_TEMP_CHARS)}]{{{_TEMP_RANDOM}}}"
                         + re.escape(_TEMP_SUFFIX))
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # removed meanwhile by someone else: fine
                continue
            removed.append(folder / entry.name)
    return sorted(removed)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap (mmap threshold 32 MiB, no trimming).

    By default glibc returns every large freed tensor to the OS, so the next batch page-faults its memory back in;
    measured 1.4-2.3x faster augmentation on CPU with this set (benchmarks/bench_views.py --tune-malloc). A process
    setting, so the CLI calls it at start; library code never does. Returns False where glibc is absent.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
