"""`selfsup embed`: the file's rows are the encoder's output on those images, prepared as the evaluation prepares
them; names and labels line up with the rows; a query finds the image itself first (issue "A user's first hour")."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import selfsup
from selfsup.cli import main
from selfsup.embed import query, read_embeddings
from selfsup.nn.backbones import build_backbone, export_backbone

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
ATOL = 1e-5  # float32 features of the same pixels through the same network, batched differently
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only cost wake-ups


def _trained_looking(model, shape):
    """BN statistics and residual branches that are not the identity, so every image gets its own embedding."""
    with torch.no_grad():
        model.train()(torch.randn(16, *shape) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("resnet10", in_chans=3, stem="small", width=4, zero_init_residual=False)
    path = tmp_path_factory.mktemp("exp")
    export_backbone(_trained_looking(model, (3, 16, 16)), path, extra={"mean": MEAN, "std": STD})
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of 16x16 RGB images (their decoded pixels are the files' pixels) and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    return root


def _pixels(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_folder_embeddings_are_the_backbone_output_on_those_images(exported, folder, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    assert main(["embed", str(exported), str(folder), "--out", str(out), "--image-size", "16"]) == 0
    assert "skipped" in capsys.readouterr().err  # the corrupt file is named, not embedded
    emb, names, labels, meta = read_embeddings(out)
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and meta["classes"] == ["cat", "dog"]
    assert meta["source"] == str(exported.resolve()) and meta["mean"] == MEAN and meta["image_size"] == 16
    images = torch.stack([_pixels(folder / n) for n in names])
    with torch.no_grad():
        expected = selfsup.load_backbone(exported)(images)  # uint8 in, its own normalization
    np.testing.assert_allclose(emb, expected.numpy(), atol=ATOL, rtol=0)
    with np.load(out, allow_pickle=False) as f:  # plain NumPy reads it without pickle
        assert set(f.files) == {"embeddings", "names", "labels", "meta"} and f["embeddings"].dtype == np.float32


def test_a_query_finds_the_image_itself_first(exported, folder, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    assert main(["embed", str(exported), str(folder), "--out", str(out), "--image-size", "16"]) == 0
    hits = query(out, folder / "dog" / "1.png", k=6)
    assert hits[0]["name"] == "dog/1.png" and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["class"] == "dog" and len(hits) == 6
    assert hits[1]["similarity"] < 1 - 1e-3  # the other images are other points
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    capsys.readouterr()
    assert main(["embed", "--query", str(folder / "cat" / "2.png"), "--index", str(out), "-k", "2"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.split() == ["1", "1.0000", "cat/2.png", "[cat]"] and second.split()[0] == "2"


def test_named_dataset_from_a_run_directory(tiny_fmnist, tmp_path):
    """A finished run (config.yaml + its exported backbone): Fashion-MNIST rows named split/index, with labels."""
    from selfsup.config import build_config
    from selfsup.data.datasets import load_dataset
    from selfsup.methods import get_method

    run = tmp_path / "run"
    cfg = build_config("simclr", ["model.backbone=resnet10", "model.width=4", "model.stem=small"],
                       params_cls=get_method("simclr").params_cls)
    torch.manual_seed(0)
    model = _trained_looking(build_backbone("resnet10", in_chans=1, stem="small", width=4, zero_init_residual=False),
                             (1, 16, 16))
    export_backbone(model, run, extra={"mean": [0.2860], "std": [0.3530]})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "test.npz"
    assert main(["embed", str(run), "fashion_mnist", "--split", "test", "--root", str(tiny_fmnist),
                 "--out", str(out), "--batch-size", "50"]) == 0
    emb, names, labels, meta = read_embeddings(out)
    test = load_dataset("fashion_mnist", "test", root=tiny_fmnist)
    assert names[:2] == ["test/000000", "test/000001"] and names[-1] == "test/000127" and len(emb) == 128
    assert labels.tolist() == test.labels.tolist() and meta["image_size"] == 16
    with torch.no_grad():
        expected = model((test.images.float() / 255 - 0.2860) / 0.3530)
    np.testing.assert_allclose(emb, expected.numpy(), atol=ATOL, rtol=0)


def test_parquet_holds_the_same_rows(exported, folder, tmp_path):
    pytest.importorskip("pyarrow")
    for suffix in ("npz", "parquet"):
        assert main(["embed", str(exported), str(folder), "--out", str(tmp_path / f"e.{suffix}"),
                     "--image-size", "16"]) == 0
    a, b = read_embeddings(tmp_path / "e.npz"), read_embeddings(tmp_path / "e.parquet")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[2].tolist() == b[2].tolist() and a[3] == b[3]
    assert query(tmp_path / "e.parquet", folder / "cat" / "0.png", k=1)[0]["name"] == "cat/0.png"


def test_parquet_without_pyarrow_says_how_to_get_it(exported, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert main(["embed", str(exported), str(folder), "--out", str(tmp_path / "e.parquet")]) == 1
    assert "pip install pyarrow" in capsys.readouterr().err and not (tmp_path / "e.parquet").exists()


@pytest.mark.parametrize("args, message", [
    (["{exp}", "{folder}", "--out", "{tmp}/e.csv"], "use .npz"),
    (["{exp}", "fashion_mnits", "--out", "{tmp}/e.npz"], "neither an existing folder"),
    (["{tmp}/nothing", "{folder}", "--out", "{tmp}/e.npz"], "does not exist"),
    (["{exp}", "{folder}"], "usage: selfsup embed MODEL DATA --out"),
    (["--query", "{folder}/cat/0.png"], "--query IMAGE --index FILE"),
    (["--query", "{folder}/cat/0.png", "--index", "{tmp}/missing.npz"], "no embeddings file"),
])
def test_usage_mistakes_exit_2_with_the_fix(exported, folder, tmp_path, capsys, args, message):
    argv = [a.format(exp=exported, folder=folder, tmp=tmp_path) for a in args]
    assert main(["embed", *argv]) == 2
    assert message in capsys.readouterr().err
