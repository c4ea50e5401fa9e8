"""Bad data: every odd file is converted correctly, skipped with a reason, or refused with a message naming it.

Each test writes the files it needs in tmp_path (images with PIL/numpy, official formats by hand) and checks the
decoded pixels, labels and counts, or the DataError's message.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import folder as fd
from selfsup.data.datasets import DataError, from_arrays, load_dataset
from selfsup.data.imbalance import power_law_subset
from selfsup.data.types import ImageDataset


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's $SELFSUP_DATA or ~/.cache/selfsup."""
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **kwargs)
    return path


def load(root: Path, size: int = 4, **kwargs):
    return load_dataset("folder", root=root, image_size=size, **kwargs)


def reasons(d) -> dict[str, str]:
    """file name -> skip reason."""
    assert len(d.skipped) == len(d.skip_reasons)
    return {Path(p).name: r for p, r in zip(d.skipped, d.skip_reasons)}


# ----------------------------------------------------------------------------------------------- bit depths


def test_16bit_gray_png_and_tiff_scaled_not_clipped(tmp_path):
    """16-bit gray -> round(v / 257); Pillow's convert("L") would turn everything above 255 white."""
    values = np.array([[0, 257 * 100, 32768, 65535]] * 4, np.uint16)
    save(tmp_path / "a.png", values)
    save(tmp_path / "b.tif", values)
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    d = load(tmp_path)
    assert d.image_shape == (1, 4, 4) and d.skipped == []
    for k in range(2):
        assert d.images[k, 0, 2].tolist() == [0, 100, 128, 255]


def test_32bit_int_image_read_as_16bit_or_skipped(tmp_path):
    save(tmp_path / "in_range.tif", np.array([[0, 25700, 32768, 65535]] * 4, np.int32))
    save(tmp_path / "too_big.tif", np.full((4, 4), 70000, np.int32))
    save(tmp_path / "negative.tif", np.full((4, 4), -5, np.int32))
    assert Image.open(tmp_path / "in_range.tif").mode == "I"
    d = load(tmp_path)
    assert len(d) == 1 and d.images[0, 0, 1].tolist() == [0, 100, 128, 255]
    r = reasons(d)
    assert sorted(r) == ["negative.tif", "too_big.tif"]
    assert "70000..70000" in r["too_big.tif"] and "0..65535" in r["too_big.tif"]
    assert "-5..-5" in r["negative.tif"]


def test_float_tiff_in_unit_range_scaled_others_skipped(tmp_path):
    save(tmp_path / "unit.tif", np.array([[0.0, 0.2, 0.5, 1.0]] * 4, np.float32))
    save(tmp_path / "bytes.tif", np.full((4, 4), 200.0, np.float32))
    save(tmp_path / "nan.tif", np.array([[np.nan, 0.5, 0.5, 0.5]] * 4, np.float32))
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    d = load(tmp_path)
    assert len(d) == 1 and d.image_shape == (1, 4, 4)
    assert d.images[0, 0, 3].tolist() == [0, 51, 128, 255]  # round(255 x); the old code read 0 everywhere
    r = reasons(d)
    assert "[200, 200]" in r["bytes.tif"] and "[0, 1]" in r["bytes.tif"]
    assert "NaN" in r["nan.tif"]
    with pytest.raises(DataError, match=r"(?s)bytes\.tif: 32-bit float image .*rescale it to \[0, 1\]"):
        load(tmp_path, on_error="raise")


def test_16bit_gray_mixed_with_color_is_replicated_correctly(tmp_path):
    save(tmp_path / "gray16.png", np.full((4, 4), 32768, np.uint16))
    save(tmp_path / "rgb.png", np.full((4, 4, 3), (1, 2, 3), np.uint8))
    d = load(tmp_path)
    assert d.image_shape == (3, 4, 4) and d.images[0, :, 0, 0].tolist() == [128] * 3


# ----------------------------------------------------------------------------------------------- symbolic links


def test_dangling_symlink_skipped_with_reason_or_named_in_error(tmp_path):
    root = tmp_path / "data"
    save(root / "cat" / "a.png", np.full((4, 4, 3), 9, np.uint8))
    save(root / "dog" / "b.png", np.full((4, 4, 3), 99, np.uint8))
    os.symlink(tmp_path / "gone.png", root / "dog" / "link.png")
    d = load(root)
    assert len(d) == 2 and d.labels.tolist() == [0, 1] and d.images[1, :, 0, 0].tolist() == [99] * 3
    assert d.skipped == [str(root / "dog" / "link.png")]
    assert "broken symbolic link" in d.skip_reasons[0] and "gone.png" in d.skip_reasons[0]
    with pytest.raises(DataError, match="broken symbolic link") as err:
        load(root, on_error="raise")
    assert str(root / "dog" / "link.png") in str(err.value) and "on_error='skip'" in str(err.value)


def test_symlink_to_parent_folder_is_a_loop_not_followed(tmp_path):
    root = tmp_path / "data"
    save(root / "cat" / "a.png", np.full((4, 4, 3), 10, np.uint8))
    save(root / "dog" / "b.png", np.full((4, 4, 3), 20, np.uint8))
    os.symlink(root, root / "dog" / "up")  # dog/up/dog/up/... and dog/up/cat/a.png (a cat labelled dog)
    os.symlink(root / "cat", root / "cat" / "self")
    d = load(root)
    assert len(d) == 2 and d.labels.tolist() == [0, 1] and d.classes == ["cat", "dog"]
    assert d.skipped == [str(root / "cat" / "self"), str(root / "dog" / "up")]
    assert all("loop" in r for r in d.skip_reasons) and str(root) in d.skip_reasons[1]
    again = load(root)  # from the cache: same images, same reasons
    assert again.skipped == d.skipped and again.skip_reasons == d.skip_reasons and len(again) == 2


def test_symlink_to_outside_folder_is_followed(tmp_path):
    root = tmp_path / "data"
    save(root / "cat" / "a.png", np.full((4, 4, 3), 10, np.uint8))
    save(tmp_path / "elsewhere" / "x.png", np.full((4, 4, 3), 30, np.uint8))
    save(tmp_path / "elsewhere" / "deep" / "y.png", np.full((4, 4, 3), 40, np.uint8))
    os.symlink(tmp_path / "elsewhere", root / "dog")
    d = load(root)
    assert d.skipped == [] and d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 1, 1]
    assert [int(d.images[i, 0, 0, 0]) for i in range(3)] == [10, 40, 30]  # dog/deep/y.png sorts before dog/x.png


def test_fifo_with_image_name_is_never_opened(tmp_path):
    """A FIFO named x.png would block the reader forever; it is skipped from its file type alone."""
    save(tmp_path / "ok.png", np.zeros((4, 4), np.uint8))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = threading.Event()

    def release_a_blocked_reader():  # so that code which opens the FIFO fails this test instead of hanging
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            except OSError:
                done.wait(0.05)

    thread = threading.Thread(target=release_a_blocked_reader, daemon=True)
    thread.start()
    try:
        d = load(tmp_path)
    finally:
        done.set()
        thread.join()
    assert len(d) == 1 and reasons(d) == {"pipe.png": "not a regular file (a device, FIFO or socket); delete it"}


# ----------------------------------------------------------------------------------------------- broken files


def jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_broken_files_each_skipped_with_its_reason(tmp_path):
    rng = np.random.default_rng(0)
    save(tmp_path / "good.png", np.full((4, 4, 3), 7, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:400])
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "x.jpg").write_text("just some text, not a JPEG\n")
    (tmp_path / "archive.png").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip with an image extension
    d = load(tmp_path)
    assert len(d) == 1 and d.images[0, :, 0, 0].tolist() == [7, 7, 7]
    assert d.skipped == [str(tmp_path / n) for n in ("archive.png", "cut.jpg", "cut.png", "empty.png", "x.jpg")]
    r = reasons(d)
    assert r["empty.png"] == "empty file (0 bytes); delete it or copy it again"
    for name in ("x.jpg", "archive.png"):
        assert r[name].startswith("not an image Pillow can read (cannot identify image file")
    for name in ("cut.jpg", "cut.png"):
        assert r[name].startswith("cannot decode it (") and "truncated" in r[name] and "re-save" in r[name]
    with pytest.raises(DataError) as err:
        load(tmp_path, on_error="raise")
    assert str(tmp_path / "archive.png") in str(err.value) and "5 unusable file(s)" in str(err.value)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    save(tmp_path / "a.png", np.full((4, 4), 5, np.uint8))
    secret = save(tmp_path / "secret.png", np.full((4, 4), 6, np.uint8))
    real_open = Image.open

    def open_denied(path, *args, **kwargs):
        if Path(path) == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_denied)
    d = load(tmp_path)
    assert len(d) == 1 and int(d.images[0, 0, 0, 0]) == 5
    assert reasons(d) == {"secret.png": "permission denied (Permission denied); make it readable (chmod a+r) or "
                                        "delete it"}


def test_unreadable_file_chmod_000_and_fixed(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files of mode 000; test_unreadable_file_simulated covers the reason")
    save(tmp_path / "a.png", np.full((4, 4), 5, np.uint8))
    secret = save(tmp_path / "secret.png", np.full((4, 4), 6, np.uint8))
    secret.chmod(0)
    try:
        d = load(tmp_path)
        assert len(d) == 1 and reasons(d)["secret.png"].startswith("permission denied")
    finally:
        secret.chmod(0o644)
    fixed = load(tmp_path)  # the permission bits are part of the cache key: the fixed file is now read
    assert len(fixed) == 2 and fixed.skipped == [] and int(fixed.images[1, 0, 0, 0]) == 6


def test_chmod_changes_the_cache_key(tmp_path):
    """Fixing a file's permissions must re-read it even though its size and mtime did not change."""
    save(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    files, _ = fd.scan_images(tmp_path)
    before = fd._stat_files(tmp_path, files)[1]
    (tmp_path / "a.png").chmod(0o600)
    after = fd._stat_files(tmp_path, files)[1]
    assert before != after and [e[:3] for e in before] == [e[:3] for e in after]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_images_skipped_naming_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save(tmp_path / "small.png", np.full((16, 16), 3, np.uint8))
    save(tmp_path / "over.png", np.zeros((40, 40), np.uint8))  # 1600 px: Pillow only warns
    save(tmp_path / "bomb.png", np.zeros((64, 64), np.uint8))  # 4096 px > 2 x limit: Pillow refuses
    d = load(tmp_path)
    assert len(d) == 1 and int(d.images[0, 0, 0, 0]) == 3
    r = reasons(d)
    assert sorted(r) == ["bomb.png", "over.png"]
    assert r["over.png"].startswith("40x40 = 1,600 pixels, over Pillow's decompression-bomb limit "
                                    "PIL.Image.MAX_IMAGE_PIXELS = 1,000")
    assert all("MAX_IMAGE_PIXELS" in v and "raise" in v for v in r.values())


# ----------------------------------------------------------------------------------------------- color modes


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    for name, cmyk in (("red.jpg", (0, 255, 255, 0)), ("gray.jpg", (0, 0, 0, 128)), ("blue.jpg", (255, 255, 0, 0))):
        save(tmp_path / name, Image.new("CMYK", (8, 8), cmyk))
    assert Image.open(tmp_path / "red.jpg").mode == "CMYK"
    d = load(tmp_path, size=8)
    expected = {"blue.jpg": (0, 0, 255), "gray.jpg": (127, 127, 127), "red.jpg": (255, 0, 0)}
    for k, name in enumerate(sorted(expected)):
        got = d.images[k, :, 4, 4].int()
        assert (got - torch.tensor(expected[name])).abs().max() <= 2, (name, got.tolist())


def test_palette_png_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255, 0, 200, 0] + [0] * (256 * 3 - 9)
    for name, transparency in (("opaque.png", None), ("transparent.png", 0)):
        im = Image.new("P", (4, 4), 0)
        im.putpalette(palette)
        im.putpixel((1, 1), 1)
        im.putpixel((2, 2), 2)
        save(tmp_path / name, im, **({} if transparency is None else {"transparency": transparency}))
    d = load(tmp_path)
    assert d.image_shape == (3, 4, 4) and d.skipped == []
    opaque, transparent = d.images[0], d.images[1]
    assert opaque[:, 0, 0].tolist() == [255, 0, 0] and opaque[:, 1, 1].tolist() == [0, 0, 255]
    assert transparent[:, 0, 0].tolist() == [0, 0, 0]  # index 0 is transparent: black, not the red it hides
    assert transparent[:, 1, 1].tolist() == [0, 0, 255] and transparent[:, 2, 2].tolist() == [0, 200, 0]


def test_alpha_composited_onto_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (255, 255, 255)  # a white "logo" whose shape is only in the alpha channel
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 128
    save(tmp_path / "color" / "logo.png", rgba)
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 200
    la[:, :2, 1] = 255
    save(tmp_path / "gray" / "la.png", Image.fromarray(la, "LA"))
    logo = load(tmp_path / "color").images[0]
    assert logo[:, 0, 0].tolist() == [255] * 3 and logo[:, 1, 0].tolist() == [128] * 3  # round(255 * 128 / 255)
    assert logo[:, 2:].sum() == 0  # convert("RGB") would give an all-white square
    gray = load(tmp_path / "gray")
    assert gray.image_shape == (1, 4, 4) and gray.images[0, 0, 1].tolist() == [200, 200, 0, 0]


@pytest.mark.parametrize("orientation, red_side", [(6, "right"), (8, "left"), (3, "bottom")])
def test_exif_orientation_applied(tmp_path, orientation, red_side):
    """Stored: top half red, bottom half blue. Displayed (EXIF applied): 6 turns the top to the right, 8 to the
    left, 3 to the bottom."""
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:8] = (255, 0, 0)
    stored[8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(stored, exif=exif.tobytes(), quality=95))
    x = load(tmp_path, size=16).images[0].int()
    where = {"right": x[:, 8, 12], "left": x[:, 8, 3], "bottom": x[:, 12, 8]}[red_side]
    opposite = {"right": x[:, 8, 3], "left": x[:, 8, 12], "bottom": x[:, 3, 8]}[red_side]
    assert where[0] > 200 and where[2] < 50, where.tolist()
    assert opposite[2] > 200 and opposite[0] < 50, opposite.tolist()


def test_mixed_sizes_all_resized_and_cropped(tmp_path):
    sizes = {"tall.png": (30, 10), "wide.png": (10, 30), "big.png": (48, 64), "tiny.png": (5, 5), "same.png": (8, 8)}
    for k, (name, (h, w)) in enumerate(sorted(sizes.items())):
        save(tmp_path / name, np.full((h, w, 3), (k * 40, 255 - k * 40, 7), np.uint8))
    ramp = np.tile(np.arange(16, dtype=np.uint8) * 10, (32, 1))  # 32 x 16, value = 10 * column: crop rows only
    save(tmp_path / "zramp.png", np.stack([ramp] * 3, -1))
    d = load(tmp_path, size=8)
    assert d.image_shape == (3, 8, 8) and len(d) == 6 and d.skipped == []
    for k in range(5):  # a constant image stays that constant at any size
        assert (d.images[k] == torch.tensor([k * 40, 255 - k * 40, 7], dtype=torch.uint8)[:, None, None]).all()
    # 32 x 16 -> 16 x 8, crop rows 4..12: each column averages two source columns (borders aside)
    assert d.images[5, 0, 4, 1:7].tolist() == (np.arange(1, 7) * 20 + 5).tolist()


# ----------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_the_kept_files(tmp_path):
    root = tmp_path / "data"
    save(root / "cat" / "a.png", np.full((4, 4, 3), 1, np.uint8))
    save(root / "dog" / "b.png", np.full((4, 4, 3), 2, np.uint8))
    first = load(root)
    assert isinstance(first.fingerprint, str) and len(first.fingerprint) == 16
    assert load(root).fingerprint == first.fingerprint  # identical reload (from the cache)
    assert load(root, size=8).fingerprint == first.fingerprint  # same files, other decoded size
    (root / "dog" / "junk.png").write_bytes(b"not an image")  # skipped: the training set is unchanged
    assert load(root).fingerprint == first.fingerprint
    extra = save(root / "dog" / "c.png", np.full((4, 4, 3), 3, np.uint8))
    added = load(root)
    assert len(added) == 3 and added.fingerprint != first.fingerprint
    extra.unlink()
    assert load(root).fingerprint == first.fingerprint
    (root / "cat" / "a.png").unlink()
    assert load(root).fingerprint not in (first.fingerprint, added.fingerprint)
    assert from_arrays(np.zeros((1, 4, 4), np.uint8)).fingerprint is None


def test_skip_reasons_field_and_subsets_keep_them(tmp_path):
    x = torch.zeros(20, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0] * 10 + [1] * 10)
    d = ImageDataset(x, y, ["a", "b"], "d", skipped=["/p/bad.png"], skip_reasons=["empty file"], fingerprint="ab")
    sub = power_law_subset(d, 2.0)
    assert sub.skipped == ["/p/bad.png"] and sub.skip_reasons == ["empty file"] and sub.fingerprint == "ab"
    assert ImageDataset(x, y, None, "d", skipped=["/p/q.png"]).skip_reasons == ["reason not recorded"]
    with pytest.raises(ValueError, match="one reason per skipped file"):
        ImageDataset(x, y, None, "d", skipped=["/p/q.png"], skip_reasons=["a", "b"])


# ----------------------------------------------------------------------------------------------- formats


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """LeCun's idx format, gzipped: magic 0x0000 08 ndim, big-endian uint32 dims, raw uint8."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, a, magic in (("images", images, 2051), ("labels", labels, 2049)):
        path = directory / f"{prefix}-{kind}-idx{a.ndim}-ubyte.gz"
        path.write_bytes(gzip.compress(struct.pack(f">I{a.ndim}I", magic, *a.shape) + a.astype(np.uint8).tobytes()))
        paths.append(path)
    return paths[0], paths[1]


def test_idx_with_another_image_shape_refused(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    images_path, _ = write_idx(tmp_path, "train", images.reshape(3, 14, 56), np.array([1, 2, 3]))
    with pytest.raises(DataError, match="3 images of 14x56 pixels, but fashion_mnist images are 28x28") as err:
        load_dataset("fmnist", root=tmp_path, download=False)
    assert str(images_path) in str(err.value) and "download it again" in str(err.value)
    write_idx(tmp_path, "train", images, np.array([1, 2]))  # right shape, one label short
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset("fmnist", root=tmp_path, download=False)
    write_idx(tmp_path, "train", images, np.array([1, 2, 3]))
    assert load_dataset("fmnist", root=tmp_path, download=False).labels.tolist() == [1, 2, 3]
    write_idx(tmp_path, "train", images[:, :16, :16], np.array([1, 2, 3]))  # own square data: accepted
    assert load_dataset("fmnist", root=tmp_path, download=False).image_shape == (1, 16, 16)


def write_cifar10_test(directory: Path, labels: list, n: int = 4) -> Path:
    """A CIFAR-10 test batch in the release's dict layout (protocol 4: only the numpy globals the reader admits)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8)
    path = directory / "test_batch"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol=4))
    return path


@pytest.mark.parametrize("labels, message", [
    ([0, -1, 3, 9], r"1 label\(s\) outside 0..9, the first -1 at index 1"),
    ([0, 1, 10, 10], r"2 label\(s\) outside 0..9, the first 10 at index 2"),
    ([0.0, 3.5, 1.0, 2.0], r"label 3.5 \(index 1\) is not an integer"),
    ([0, 1, float("nan"), 2], r"label nan \(index 2\) is not an integer"),
    (["a", "b", "c", "d"], r"must be a list of integer labels; got <U1"),
])
def test_cifar_bad_labels_refused_naming_the_file(tmp_path, labels, message):
    path = write_cifar10_test(tmp_path / "cifar-10-batches-py", labels)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("cifar10", "test", root=tmp_path, download=False, verify=False)
    assert str(err.value).startswith(f"{path}: ") and "download it again" in str(err.value)


def test_cifar_integral_float_labels_accepted(tmp_path):
    write_cifar10_test(tmp_path / "cifar-10-batches-py", [3.0, 0.0, 9.0, 1.0])
    d = load_dataset("cifar10", "test", root=tmp_path, download=False, verify=False)
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == [3, 0, 9, 1]


def test_stl10_bad_files_refused_naming_them(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "test_X.bin").write_bytes(bytes(2 * 27648))
    (folder / "test_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(DataError, match="labels must lie in 1..10, found 1..11") as err:
        load_dataset("stl10", "test", root=tmp_path, download=False)
    assert str(folder / "test_y.bin") in str(err.value)
    (folder / "train_X.bin").write_bytes(bytes(27648))
    (folder / "train_y.bin").write_bytes(bytes([1]))
    (folder / "unlabeled_X.bin").write_bytes(bytes(27648 - 1))
    with pytest.raises(DataError, match="not a positive multiple of 3\\*96\\*96") as err:
        load_dataset("stl10", "train+unlabeled", root=tmp_path, download=False, cache_dir=tmp_path / "c")
    assert str(folder / "unlabeled_X.bin") in str(err.value)
