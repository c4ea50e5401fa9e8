"""Hugging Face datasets saved with save_to_disk as a data source (`data=hf data.root=PATH`): images of mixed sizes,
ClassLabel labels, a DatasetDict's test split or a held-out one, arrays as images, and the errors a user meets."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from selfsup.checks import check_extras  # noqa: E402
from selfsup.config import ConfigError, build_config  # noqa: E402
from selfsup.data.datasets import load_dataset  # noqa: E402
from selfsup.data.types import DataError  # noqa: E402
from selfsup.methods import get_method  # noqa: E402
from selfsup.runs import load_data  # noqa: E402

CLASSES = ["cat", "dog", "fox"]


def _cfg(*overrides: str):
    return build_config("simclr", list(overrides), params_cls=get_method("simclr").params_cls)


def _images(n: int, seed: int):
    """``n`` RGB images, every third one 20x16 (landscape), the others 16x16; labels cycle over 3 classes."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (16, 20 if i % 3 == 0 else 16, 3), dtype=np.uint8) for i in range(n)]
    return arrays, [i % 3 for i in range(n)]


def _dataset(arrays, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": labels,
                                       "caption": [f"photo {i}" for i in range(len(labels))]}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (30 train, 10 test) and a single Dataset (40 rows), written with save_to_disk."""
    root = tmp_path_factory.mktemp("hf")
    train, test = _images(30, 0), _images(10, 1)
    datasets.DatasetDict({"train": _dataset(*train), "test": _dataset(*test)}).save_to_disk(str(root / "dict"))
    _dataset(*_images(40, 2)).save_to_disk(str(root / "single"))
    return root


def test_a_dataset_dict_gives_train_and_test_resized_to_one_size(saved, capsys):
    train, test = load_data(_cfg("data=hf", f"data.root={saved / 'dict'}"))
    # two sizes (16x16, 20x16): each resized (short side 16) and center-cropped to 16x16, and said so
    assert train.image_shape == test.image_shape == (3, 16, 16) and (len(train), len(test)) == (30, 10)
    assert "resized (short side) and center-cropped to 16x16; set data.image_size=N" in capsys.readouterr().out
    assert train.classes == CLASSES and torch.equal(train.labels, torch.arange(30) % 3)
    assert train.name == "hf/dict/train" and train.images.dtype == torch.uint8 and train.fingerprint
    arrays, _ = _images(30, 0)
    assert torch.equal(train.images[1], torch.from_numpy(arrays[1]).permute(2, 0, 1))  # 16x16: pixels kept exactly


def test_a_single_labelled_dataset_holds_out_a_test_split(saved, capsys):
    train, test = load_data(_cfg("data=hf", f"data.root={saved / 'single'}", "data.holdout=0.25"))
    assert (len(train), len(test)) == (30, 10)  # a quarter of each class (14, 13, 13 images) held out
    assert sorted(test.labels.tolist()) == [0] * 4 + [1] * 3 + [2] * 3
    assert "has no 'test' split: 10 images (0.25 of each class" in capsys.readouterr().out


def test_image_size_and_no_labels(saved):
    cfg = _cfg("data=hf", f"data.root={saved / 'dict'}", "data.image_size=8", "data.label_column=null")
    train, test = load_data(cfg)
    assert train.image_shape == (3, 8, 8) and train.labels is None and test is None


def test_arrays_as_images(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (6, 12, 12), dtype=np.uint8)
    datasets.Dataset.from_dict({"pixels": gray.tolist(), "y": [0, 1, 2, 0, 1, 2]}).save_to_disk(str(tmp_path / "g"))
    d = load_dataset("hf", root=tmp_path / "g", image_column="pixels", label_column="y")
    assert d.image_shape == (1, 12, 12) and torch.equal(d.images[:, 0], torch.from_numpy(gray))
    assert d.labels.tolist() == [0, 1, 2, 0, 1, 2] and d.classes is None
    floats = rng.random((2, 3, 8, 8)).astype(np.float32)  # channel-first floats in [0, 1]
    datasets.Dataset.from_dict({"image": floats.tolist()}).save_to_disk(str(tmp_path / "f"))
    f = load_dataset("hf", root=tmp_path / "f")
    expected = torch.from_numpy(np.rint(floats * 255).astype(np.uint8))
    assert f.labels is None and (f.images.int() - expected.int()).abs().max() <= 1  # float32 rounding: 1 level


def test_errors_name_the_fix(saved, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no column 'img'; its columns: image, label, caption"):
        load_dataset("hf", root=saved / "dict", image_column="img")
    with pytest.raises(DataError, match=r"column 'caption' .* not images or arrays"):
        load_dataset("hf", root=saved / "dict", image_column="caption")
    with pytest.raises(DataError, match=r"no label column 'class'.*data.label_column=null"):
        load_dataset("hf", root=saved / "dict", label_column="class")
    with pytest.raises(DataError, match=r"no split 'validation'; its splits: train, test"):
        load_dataset("hf", "validation", root=saved / "dict")
    (tmp_path / "pngs").mkdir()
    with pytest.raises(DataError, match=r"not a dataset saved with save_to_disk.*data=folder"):
        load_dataset("hf", root=tmp_path / "pngs")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'selfsup\[hf\]'"):
        load_dataset("hf", root=saved / "dict")
    with pytest.raises(ConfigError, match=r"data=hf needs the datasets package.*pip install 'selfsup\[hf\]'"):
        check_extras(_cfg("data=hf"))
