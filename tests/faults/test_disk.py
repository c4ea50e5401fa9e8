"""Full disk, and the other promises of the package's one file writer (selfsup.runtime.atomic_write).

A write that fails (ENOSPC, EDQUOT, EFBIG, EIO, EROFS, EACCES) raises a WriteError naming the file, the reason and
the fix; the previous file stays byte-identical; no truncated file and no temporary file is left. Faults are real
where that is possible without root: RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG, as a full disk
refuses them with ENOSPC), and SIGKILL interrupts a writer mid-file. Elsewhere an OSError is raised after part of the
data was written, which is what the kernel does on a full disk.
"""

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import selfsup.runtime as runtime
from selfsup.nn.backbones import build_backbone, export_backbone, load_backbone
from selfsup.runtime import WriteError, atomic_write, atomic_write_bytes, remove_stale_temp_files, save_json

MEAN, STD = [0.5], [0.25]
LIMIT = 256 << 10  # RLIMIT_FSIZE of the child process: writes past 256 KiB fail with EFBIG


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _small_backbone(seed: int = 0, width: int = 4):
    torch.manual_seed(seed)
    return build_backbone("resnet10", in_chans=1, stem="small", width=width).eval()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------------- kernel-level faults: RLIMIT_FSIZE

_RLIMIT_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from selfsup.nn.backbones import build_backbone, export_backbone
    from selfsup.runtime import atomic_write_bytes, save_json

    root, limit = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(1)
    big = build_backbone("resnet10", in_chans=1, stem="small", width=16).eval()   # 1.2 MB of weights
    small = build_backbone("resnet10", in_chans=1, stem="small", width=4).eval()  # 85 KB of weights
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def attempt(fn):
        try:
            fn()
        except BaseException as e:
            return {"type": type(e).__name__, "is_oserror": isinstance(e, OSError), "errno": getattr(e, "errno", None),
                    "filename": getattr(e, "filename", None), "message": str(e),
                    "cause": type(e.__cause__).__name__ if e.__cause__ is not None else None}
        return None

    print(json.dumps({
        "checkpoint": attempt(lambda: atomic_write_bytes(
            root / "ckpt" / "last.pt", lambda f: torch.save({"model": big.state_dict(), "step": 2}, f))),
        "json": attempt(lambda: save_json(root / "json" / "summary.json", {"values": list(range(limit))})),
        "exp_weights": attempt(lambda: export_backbone(big, root / "exp_weights", extra={"mean": [0.1], "std": [1]})),
        "exp_config": attempt(lambda: export_backbone(
            small, root / "exp_config", extra={"mean": [0.1], "std": [1], "notes": "x" * 2 * limit})),
    }))
""")


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """Previous versions of a checkpoint, a JSON file and two exports; then a child process limited to 256 KiB per
    file tries to replace each with a bigger one. Returns (root, previous bytes per folder, the child's errors)."""
    root = tmp_path_factory.mktemp("full_disk")
    atomic_write_bytes(root / "ckpt" / "last.pt", lambda f: torch.save({"model": {"w": torch.ones(3)}, "step": 1}, f))
    save_json(root / "json" / "summary.json", {"values": [1, 2, 3]})
    for folder in ("exp_weights", "exp_config"):
        export_backbone(_small_backbone(seed=0), root / folder, extra={"mean": MEAN, "std": STD})
    before = {folder: _snapshot(root / folder) for folder in ("ckpt", "json", "exp_weights", "exp_config")}
    proc = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(root), str(LIMIT)], capture_output=True,
                          text=True, timeout=300, env=_child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, before, json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_clear_efbig(error: dict, path: Path) -> None:
    assert error is not None, f"writing {path} past RLIMIT_FSIZE did not fail"
    assert error["type"] == "WriteError" and error["is_oserror"], error
    assert error["errno"] == errno.EFBIG and error["filename"] == str(path)
    assert str(path) in error["message"] and "File too large" in error["message"], error["message"]
    assert "ulimit -f" in error["message"] and "out=DIR" in error["message"], error["message"]


def test_a_checkpoint_too_big_for_the_disk_keeps_the_previous_one(full_disk):
    """torch.save reports a failed write as RuntimeError('unexpected pos'): it must still become a WriteError."""
    root, before, errors = full_disk
    _assert_clear_efbig(errors["checkpoint"], root / "ckpt" / "last.pt")
    assert errors["checkpoint"]["cause"] == "OSError"
    assert "the previous last.pt is intact" in errors["checkpoint"]["message"]
    assert _snapshot(root / "ckpt") == before["ckpt"]  # byte-identical, no temporary file
    assert torch.load(root / "ckpt" / "last.pt", weights_only=True)["step"] == 1


def test_a_json_file_too_big_for_the_disk_keeps_the_previous_one(full_disk):
    root, before, errors = full_disk
    _assert_clear_efbig(errors["json"], root / "json" / "summary.json")
    assert _snapshot(root / "json") == before["json"]
    assert json.loads((root / "json" / "summary.json").read_text()) == {"values": [1, 2, 3]}


@pytest.mark.parametrize("folder, failing", [("exp_weights", "backbone.safetensors"), ("exp_config", "backbone.json")])
def test_an_export_that_fails_leaves_the_previous_pair_loadable(full_disk, folder, failing):
    """Whichever of the two files fails (the weights: safetensors' own error type; or the config, after the new
    weights were written completely), both files stay the previous export's, and it loads."""
    root, before, errors = full_disk
    _assert_clear_efbig(errors[folder], root / folder / failing)
    assert "the previous backbone.safetensors, backbone.json are intact" in errors[folder]["message"]
    assert _snapshot(root / folder) == before[folder]
    x = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    torch.testing.assert_close(load_backbone(root / folder)(x), load_backbone(root / "exp_weights")(x))


# ------------------------------------------------------------------------- injected write errors


def _fails_after_half(data: bytes, code: int):
    """A write callback that writes half of ``data``, then fails as the kernel does on a full disk."""

    def write(f):
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize("code, reason, fix", [
    (errno.ENOSPC, "No space left on device", "free space on the filesystem mounted at"),
    (errno.EDQUOT, "Disk quota exceeded", "disk quota"),
    (errno.EIO, "Input/output error", "I/O error"),
    (errno.EROFS, "Read-only file system", "mounted read-only"),
    (errno.EACCES, "Permission denied", "fix the permissions of"),
])
def test_a_failed_checkpoint_write_names_the_path_the_reason_and_the_fix(tmp_path, code, reason, fix):
    path = tmp_path / "run" / "last.pt"
    atomic_write_bytes(path, lambda f: torch.save({"step": 1, "w": torch.ones(4)}, f))
    previous = path.read_bytes()
    buf = io.BytesIO()
    torch.save({"step": 2, "w": torch.zeros(10_000)}, buf)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(path, _fails_after_half(buf.getvalue(), code))
    err = info.value
    assert isinstance(err, OSError) and err.errno == code and err.filename == str(path)
    message = str(err)
    assert message.startswith(f"could not write {path}: {reason}"), message
    assert fix in message and "out=DIR" in message and "the previous last.pt is intact" in message, message
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == code  # the original error, chained
    assert path.read_bytes() == previous and _temps(path.parent) == []


def test_a_full_disk_inside_torch_save_is_a_write_error(tmp_path):
    """torch.save to a file object turns the write's OSError into a RuntimeError; the cause is found anyway."""

    class FullDisk:
        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if n > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    path = tmp_path / "last.pt"
    with pytest.raises(WriteError, match=r"No space left on device.*no partial last.pt was left") as info:
        atomic_write_bytes(path, lambda f: torch.save({"w": torch.zeros(100_000)}, FullDisk(f, 50_000)))
    assert info.value.__cause__.errno == errno.ENOSPC
    assert not path.exists() and _temps(tmp_path) == []  # a new file that failed leaves nothing at all


def test_a_full_disk_reported_only_by_fsync_keeps_the_previous_json(tmp_path, monkeypatch):
    """Delayed allocation and NFS report ENOSPC when the data is flushed, after every write() succeeded."""
    path = tmp_path / "summary.json"
    save_json(path, {"epoch": 1})
    previous = path.read_bytes()

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runtime.os, "fsync", fsync)
    with pytest.raises(WriteError, match=r"summary.json: No space left on device"):
        save_json(path, {"epoch": 2})
    assert path.read_bytes() == previous and _temps(tmp_path) == []


def test_errors_that_are_not_about_the_disk_propagate_unchanged(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, lambda f: f.write(b"old"))

    def bug(f):
        f.write(b"partial")
        raise ValueError("a bug in the caller")

    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(ValueError, match="a bug in the caller"):
        atomic_write_bytes(path, bug)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, interrupted)
    with pytest.raises(TypeError):  # not JSON-serialisable: refused before anything is written
        save_json(path, {"x": object()})
    assert path.read_bytes() == b"old" and _temps(tmp_path) == []


def test_an_unwritable_folder_is_a_write_error_naming_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(WriteError, match=f"could not write {blocker}/out/last.pt") as info:
        atomic_write(blocker / "out" / "last.pt", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)


def test_an_export_interrupted_between_its_two_renames_is_refused_when_loaded(tmp_path, monkeypatch):
    """The one window a full disk cannot cause: both files were written, the weights renamed, then the config's
    rename failed. The mixed pair is refused with a clear error (export_id), never loaded with the wrong config."""
    export_backbone(_small_backbone(seed=0), tmp_path, extra={"mean": MEAN, "std": STD})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "backbone.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(runtime.os, "replace", replace)
    with pytest.raises(WriteError, match=r"backbone.json: Input/output error.*backbone.safetensors was already "
                                         r"replaced"):
        export_backbone(_small_backbone(seed=1), tmp_path, extra={"mean": MEAN, "std": STD})
    monkeypatch.undo()
    assert calls == ["backbone.safetensors", "backbone.json"] and _temps(tmp_path) == []
    with pytest.raises(ValueError, match=r"come from different exports.*Export the backbone again"):
        load_backbone(tmp_path)


def test_weights_copied_from_another_export_are_refused(tmp_path):
    export_backbone(_small_backbone(seed=0), tmp_path / "a", extra={"mean": MEAN, "std": STD})
    export_backbone(_small_backbone(seed=1), tmp_path / "b", extra={"mean": MEAN, "std": STD})
    shutil.copy(tmp_path / "a" / "backbone.safetensors", tmp_path / "b" / "backbone.safetensors")
    with pytest.raises(ValueError, match="different exports"):
        load_backbone(tmp_path / "b")
    assert load_backbone(tmp_path / "a").num_features == 32


# ------------------------------------------------------------------------- file permissions


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after it."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    """tempfile.mkstemp makes files 0600 whatever the umask; the writer must give 0o666 & ~umask, like open()."""
    umask(mask)
    with open(tmp_path / "reference", "w"):
        pass
    atomic_write_bytes(tmp_path / "last.pt", lambda f: torch.save({"w": torch.ones(2)}, f))
    save_json(tmp_path / "summary.json", {"a": 1})
    export_backbone(_small_backbone(), tmp_path / "export")
    written = [tmp_path / "last.pt", tmp_path / "summary.json", tmp_path / "export" / "backbone.safetensors",
               tmp_path / "export" / "backbone.json"]
    assert oct((tmp_path / "reference").stat().st_mode & 0o777) == oct(mode)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    """As rewriting it in place with open(path, "w") would: a file made private stays private."""
    path = tmp_path / "summary.json"
    save_json(path, {"a": 1})
    path.chmod(0o640)
    save_json(path, {"a": 2})
    assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text()) == {"a": 2}


# ------------------------------------------------------------------------- stale temporary files


def test_remove_stale_temp_files_removes_only_the_writers_leftovers(tmp_path):
    keep = [
        "last.pt",  # the destination itself
        ".last.pt.tmp", ".last.pt.abc.tmp", ".last.pt.ABCDEFGH.tmp", ".last.pt.abcdefghi.tmp",  # not the pattern
        "last.pt.abcd1234.tmp", ".last.pt.abcd1234.tmp.bak", ".last.pt.abcd1234.tmpx",
        ".best.pt.abcd1234.tmp", ".last.ptx.abcd1234.tmp",  # another destination's
        ".ckpt1.pt.abcd1234.tmp",  # would match if "ckpt[1].pt" were used as a regular expression
    ]
    stale = [".last.pt.abcd1234.tmp", ".last.pt.zz_9yy00.tmp", ".ckpt[1].pt.q1w2e3r4.tmp"]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"data")
    (tmp_path / ".last.pt.dir00000.tmp").mkdir()  # not a file
    (tmp_path / ".last.pt.link0000.tmp").symlink_to(tmp_path / "last.pt")  # not the writer's
    assert remove_stale_temp_files(tmp_path, "last.pt") == [tmp_path / ".last.pt.abcd1234.tmp",
                                                            tmp_path / ".last.pt.zz_9yy00.tmp"]
    assert remove_stale_temp_files(tmp_path, "ckpt[1].pt") == [tmp_path / ".ckpt[1].pt.q1w2e3r4.tmp"]
    assert remove_stale_temp_files(tmp_path, "last.pt") == []
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(keep + [".last.pt.dir00000.tmp", ".last.pt.link0000.tmp"])
    assert all((tmp_path / name).read_bytes() == b"data" for name in keep)
    assert remove_stale_temp_files(tmp_path / "missing", "last.pt") == []


def test_a_destination_named_like_a_temp_file_is_never_removed(tmp_path):
    name = ".last.pt.abcd1234.tmp"  # a real file whose own name has the temporary pattern
    atomic_write_bytes(tmp_path / name, lambda f: f.write(b"real"))
    assert remove_stale_temp_files(tmp_path, name) == []
    assert (tmp_path / name).read_bytes() == b"real"


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfsup.runtime import atomic_write_bytes

    path, size, chunk = Path(sys.argv[1]), int(sys.argv[2]), 1 << 16

    def write(f, version):
        for i in range(size // chunk):
            f.write(bytes([version]) * chunk)
            if version == 3 and i == size // chunk // 2:
                f.flush()
                time.sleep(600)  # mid-write of the third version: the parent kills us here

    for version in range(1, 10):
        atomic_write_bytes(path, lambda f: write(f, version))
""")


def test_kill_9_mid_write_leaves_the_previous_file_and_a_temp_file_that_is_removed(tmp_path):
    path, size = tmp_path / "last.pt", 4 << 20
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(path), str(size)], env=_child_env(),
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_bytes()[:1] == b"\x02" and _temps(tmp_path)
                   and (tmp_path / _temps(tmp_path)[0]).stat().st_size > size // 2):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached the middle of its third file"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert path.read_bytes() == b"\x02" * size  # the complete previous version, never a truncated one
    temps = _temps(tmp_path)
    assert len(temps) == 1 and 0 < (tmp_path / temps[0]).stat().st_size < size
    assert remove_stale_temp_files(tmp_path, "last.pt") == [tmp_path / temps[0]]
    assert _temps(tmp_path) == [] and path.read_bytes() == b"\x02" * size


# ------------------------------------------------------------------------- load_backbone validates backbone.json


@pytest.fixture
def export(tmp_path):
    export_backbone(_small_backbone(), tmp_path, extra={"mean": MEAN, "std": STD})
    return tmp_path


def _edit(folder: Path, change) -> Path:
    path = folder / "backbone.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return path


_WRONG_FIELDS = {  # id: (edit of backbone.json, what the error must say)
    "num_features-string": (lambda c: c.update(num_features="32"), "'num_features' must be a positive integer"),
    "num_features-bool": (lambda c: c.update(num_features=True), "'num_features' must be a positive integer"),
    "num_features-negative": (lambda c: c.update(num_features=-1), "'num_features' must be a positive integer"),
    "num_features-mismatch": (lambda c: c.update(num_features=64), "'num_features' is 64 but its spec builds .* 32"),
    "format_version-missing": (lambda c: c.pop("format_version"), "'format_version' is missing"),
    "format_version-bool": (lambda c: c.update(format_version=True), "'format_version' is True"),
    "format_version-string": (lambda c: c.update(format_version="1"), "'format_version' is '1'"),
    "format_version-newer": (lambda c: c.update(format_version=2), "'format_version' is 2"),
    "export_id-list": (lambda c: c.update(export_id=[1]), "'export_id' must be a short string"),
    "spec-missing": (lambda c: c.pop("spec"), "'spec' object"),
    "name-missing": (lambda c: c["spec"].pop("name"), "spec.name must be a backbone name"),
    "name-unknown": (lambda c: c["spec"].update(name="resnet11"), "unknown backbone .*'resnet11'.*did you mean"),
    "mean-length": (lambda c: c.update(mean=[0.5, 0.5]), "mean and std must be lists of 1 finite numbers"),
    "std-string": (lambda c: c.update(std="0.25"), "mean and std must be lists of 1 finite numbers"),
    "std-missing": (lambda c: c.pop("std"), "mean and std must be lists of 1 finite numbers"),
}


@pytest.mark.parametrize("change, field", list(_WRONG_FIELDS.values()), ids=list(_WRONG_FIELDS))
def test_a_wrong_field_in_backbone_json_is_a_clear_error_naming_file_and_field(export, change, field):
    path = _edit(export, change)
    with pytest.raises(ValueError) as info:
        load_backbone(export)
    message = str(info.value)
    assert str(path) in message and re.search(field, message, flags=re.IGNORECASE), message


@pytest.mark.parametrize("text", ["", "[1, 2, 3]", '"a string"', "null", "{not json"])
def test_a_backbone_json_that_is_not_an_object_is_a_clear_error(export, text):
    (export / "backbone.json").write_text(text)
    with pytest.raises(ValueError, match="not a valid backbone config"):
        load_backbone(export)


def test_a_truncated_backbone_json_is_a_clear_error(export):
    """What a full disk leaves with a non-atomic writer: the first half of the file."""
    path = export / "backbone.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path} is not a valid backbone config .*re-export"):
        load_backbone(export)
