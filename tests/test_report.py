"""The eval report (selfsup.report.report), its 2-D map and its retrieval grid."""

import base64
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.evaluate.retrieval import DIFFERENT_COLOR, SAME_COLOR, nearest_neighbors, retrieval_grid
from selfsup.report.compare import compare_summary, spearman, write_compare_report
from selfsup.report.embedding_map import embed_2d, plot_embedding_map, subset_indices
from selfsup.report.plots import plot_confusion
from selfsup.report.report import mlp_stopping, split_title, write_report

ALL_SECTIONS = ("headline", "baselines", "classes", "settings", "training", "guillotine", "spectra", "map",
                "retrieval", "details", "images", "raw")


# ----------------------------------------------------------------------------------------------- helpers


def _clusters(n_per: int, dim: int, seed: int, centers: int = 3, spread: float = 10.0):
    """``centers`` well-separated Gaussian blobs: features (n, dim) float32 and labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=torch.Generator().manual_seed(123)) * spread
    labels = torch.arange(centers).repeat_interleave(n_per)
    feats = means[labels] + torch.randn(len(labels), dim, generator=g)
    return feats, labels


def _images(labels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 8, 8) images whose brightness encodes the label."""
    return (40 + 60 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()


def _write_png(path, color):
    Image.new("RGB", (16, 12), color).save(path)
    return path


def _full_result(report_dir):
    """Every key of the eval.json schema; the decoder grid PNG is written into ``report_dir``, where it is read."""
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_png(report_dir / "decoder_backbone.png", (200, 10, 10))
    spectrum_with_zeros = [10.0, 5.0, 1.0, 0.1, 0.0, 0.0]
    return {
        "encoder": {"source": "backbone", "path": "runs/x", "name": "resnet10", "num_features": 16},
        "dataset": {"name": "fashion_mnist/train", "n_train": 90, "n_test": 60, "labels": True, "num_classes": 3,
                    "class_names": ["T-shirt/top", "Trouser", "Pullover"], "train_split": "fashion_mnist/train",
                    "test_split": "fashion_mnist/test"},
        "knn_top1": 85.18, "linear_top1": 87.44, "mlp_top1": 88.0,
        "run": {"method": "simclr", "epochs": 1, "batch_size": 256},
        "baselines": {"knn_top1": 86.2, "linear_top1": 84.5, "pixels": "1x28x28 = 784 values per image",
                      "preprocessing": "per-pixel standardization with the train split's mean and std",
                      "notes": ["a class-stratified subset of 9 of the 90 train images (seed 0)"]},
        "reference": {"recipe": "simclr:default", "knn_top1": 86.62, "linear_top1": 88.0, "mlp_top1": 90.0,
                      "epochs": 12.0, "batch_size": 256, "minutes": 9.5, "machine": "AMD EPYC", "commit": "abc1234",
                      "date": "2026-11-30", "differs": ["epochs 1 (reference 12)"]},
        "below_baseline": ["kNN 85.18% is below the pixel baseline 86.20%: this encoder has not yet learned more "
                           "than the pixels (train longer: the recipe's reference run reached kNN 86.62% after 12 "
                           "epochs)"],
        "hyperparameters": {"method": "simclr", "simclr.temperature": 0.1, "batch_size": 256, "optim.name": "adamw",
                            "views.scale": [0.4, 1.0], "model.backbone": "resnet10"},
        "seconds": {"total": 1.5},
        "knn": {"top1": {"10": 85.0, "20": 85.18, "100": 84.1}, "majority_top1": {"10": 84.0, "20": 84.9},
                "protocol": {"k": [10, 20, 100], "temperature": 0.07, "metric": "cosine", "weighting": "exp",
                             "n_train": 90}},
        "linear": {"top1": 87.444, "val_top1": 88.2, "lr": 0.3, "weight_decay": 0.0, "epochs": 30,
                   "confusion": [[18, 2, 0], [1, 19, 0], [4, 1, 15]], "per_class_top1": [90.0, 95.0, 75.0],
                   "edge_notes": ["the chosen lr 0.3 is the largest in the grid: a larger one may do better; set "
                                  "eval.linear_lrs=[0.1,0.3,0.9,3]"],
                   "grid": [{"lr": lr, "weight_decay": wd, "val_top1": 80 + 10 * lr - wd}
                            for lr in (0.1, 0.3) for wd in (0.0, 0.001)]},
        "mlp": {"top1": 88.0, "val_top1": 88.9, "best_epoch": 2, "epochs_run": 3, "max_epochs": 20,
                "stopped_early": True, "hidden": [64],
                "curve": [{"epoch": e, "train_loss": 1 / e, "val_top1": 80 + e} for e in (1, 2, 3)]},
        "online_probe_top1": 81.2,
        "label_free": {"rankme": {"value": 180.3, "eps": 1e-7, "n_samples": 60, "dim": 16, "split": "test",
                                  "how_to_read": "Effective rank of the embeddings"},
                       "alpha_req": {"alpha": 1.2, "r2": 0.99, "fit_range": [11, 100]},
                       "lidar": {"value": 40.1, "n_images": 500, "n_views": 8},
                       "rotation": {"top1": 91.0, "chance": 25.0}},
        "guillotine": [{"layer": "backbone", "dim": 16, "linear_top1": 87.4, "knn_top1": 85.2, "rankme": 12.0,
                        "alpha_req": 1.2},
                       {"layer": "projector.out", "dim": 8, "linear_top1": 80.1, "knn_top1": 86.0, "rankme": 5.0}],
        "spectra": {"backbone": [16.0 / (i + 1) for i in range(16)], "projector.out": spectrum_with_zeros},
        "decoder": {"grids": {"backbone": "decoder_backbone.png"}},
    }


def _data_uris(text: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', text)


def _section_ids(text: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', text))


# ----------------------------------------------------------------------------------------------- write_report


def test_full_report_is_self_contained_with_every_section(tmp_path):
    test_f, test_y = _clusters(20, 16, seed=1)
    train_f, train_y = _clusters(30, 16, seed=2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "epoch": s / 10, "loss": 5 / s, "lr": 0.1,
                                             "online_probe_acc": 50 + s}) for s in range(1, 21)) + "\n{trunc")
    jpeg = tmp_path / "extra.jpg"
    Image.new("RGB", (20, 20), (0, 90, 200)).save(jpeg)

    out = write_report(tmp_path / "report", _full_result(tmp_path / "report"), test_images=_images(test_y),
                       test_labels=test_y, test_features=test_f, train_images=_images(train_y).numpy(),
                       train_features=train_f, train_labels=train_y, metrics_path=metrics,
                       extra_images={"an extra JPEG": jpeg})
    text = out.read_text(encoding="utf-8")

    assert out.name == "report.html" and out.parent == tmp_path / "report"
    assert _section_ids(text) == set(ALL_SECTIONS)
    assert "Image not found" not in text
    # self-contained: no external reference in any src/href, no script, every image a decodable PNG data URI
    attrs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.IGNORECASE)
    assert not [a for a in attrs if re.match(r"\s*(https?:)?//", a, flags=re.IGNORECASE)]
    assert "<script" not in text.lower() and "url(" not in text.lower()
    uris = _data_uris(text)
    assert len(uris) == 10  # loss, lr, accuracy, confusion, spectra, map, retrieval, MLP curve, decoder, extra JPEG
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        png = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        Image.open(io.BytesIO(png)).verify()
    # the JPEG extra image was re-encoded, not referenced: its blue survives in one of the PNGs
    colors = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB").getpixel((10, 10))
              for u in uris]
    assert any(abs(c[0] - 0) < 8 and abs(c[1] - 90) < 8 and abs(c[2] - 200) < 8 for c in colors)
    # headline numbers, 2 decimals for percentages, the protocol next to them
    assert "85.18%" in text and "87.44%" in text and "k=20" in text and "T=0.07" in text
    assert "180.3" in text and "R² 0.990" in text


def test_report_says_what_good_looks_like_first(tmp_path):
    """The title names the split, the below-baseline verdict comes before any number, the baselines and the
    recipe reference (with what differs), settings, per-class accuracy, grid-edge and early-stopping notes."""
    text = write_report(tmp_path, _full_result(tmp_path)).read_text(encoding="utf-8")
    assert "<title>selfsup eval: resnet10 on fashion_mnist test split (60 images)</title>" in text
    alert = text.index("Below the pixel baseline")
    assert alert < text.index('<section id="headline">')
    assert "reached kNN 86.62% after 12" in text[alert:alert + 600]
    baselines = text[text.index('<section id="baselines">'):text.index('<section id="classes">')]
    for needle in ("86.20%", "84.50%", "Recipe reference (simclr:default)", "86.62%", "12 epochs", "commit abc1234",
                   "epochs 1 (reference 12)", "subset of 9 of the 90"):
        assert needle in baselines, needle
    classes = text[text.index('<section id="classes">'):text.index('<section id="settings">')]
    # Pullover (75%) is the worst class and is most often confused with T-shirt/top (4 of 20)
    assert '<td class="num worst">75.00%</td>' in classes and "T-shirt/top (4)" in classes
    assert "simclr.temperature" in text and "0.4, 1" in text  # settings table
    assert "The chosen lr 0.3 is the largest in the grid" in text and "eval.linear_lrs=[0.1,0.3,0.9,3]" in text
    assert "Stopped early at epoch 3 of 20 (best epoch 2)" in text
    assert "How to read: Effective rank of the embeddings" in text


@pytest.mark.parametrize("dataset, title", [
    ({"name": "fashion_mnist/train", "test_split": "fashion_mnist/test", "n_test": 10000, "labels": True},
     "fashion_mnist test split (10,000 images)"),
    ({"name": "folder/photos (train, 10% held out)", "test_split": "folder/photos (held-out 10%)", "n_test": 123,
      "labels": True}, "folder/photos: held-out 10% of train (123 images)"),
    ({"name": "folder/train", "test_split": "folder/val", "n_test": 5, "labels": True}, "folder val split (5 images)"),
    ({"name": "fashion_mnist/train", "n_test": 60, "labels": True}, "fashion_mnist test split (60 images)"),
    ({"name": "blobs/train", "labels": False, "n_test": 0},
     "blobs/train (no labelled test split: label-free metrics on the train split)"),
])
def test_split_title_names_where_the_accuracies_come_from(dataset, title):
    assert split_title(dataset) == title


def test_mlp_stopping_sentence():
    assert mlp_stopping({"best_epoch": 4, "epochs_run": 9, "max_epochs": 20, "stopped_early": True}) == \
        "stopped early at epoch 9 of 20 (best epoch 4)"
    assert mlp_stopping({"best_epoch": 20, "epochs_run": 20, "max_epochs": 20, "stopped_early": False}) == \
        "ran all 20 epochs (best epoch 20); the best was the last: more epochs may help"
    assert mlp_stopping({"best_epoch": 5, "epochs_run": 7}) == "best epoch 5 of 7"  # an older eval.json
    assert mlp_stopping({}) == ""


def test_plot_confusion_writes_a_png_and_rejects_mismatched_labels(tmp_path):
    path = plot_confusion([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png")
    assert Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="one label per row"):
        plot_confusion([[3, 1], [0, 4]], ["a"], tmp_path / "bad.png")


def test_decoder_grid_and_missing_extra_image(tmp_path):
    result = _full_result(tmp_path)
    out = write_report(tmp_path, result, extra_images={"missing one": tmp_path / "nope.png"})
    text = out.read_text(encoding="utf-8")
    assert "images" in _section_ids(text)
    assert "Image not found" in text and "nope.png" in text
    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in _data_uris(text)]
    assert any(im.size == (16, 12) and im.getpixel((0, 0)) == (200, 10, 10) for im in decoded)


def test_minimal_result_shows_only_sections_with_data(tmp_path):
    result = {"encoder": {"source": "module", "name": "mlp"}, "dataset": {"name": "custom", "labels": False},
              "seconds": {"total": 0.1}, "label_free": {"rankme": {"value": 3.2, "n_samples": 10, "dim": 4}}}
    text = write_report(tmp_path, result).read_text(encoding="utf-8")
    assert _section_ids(text) == {"headline", "raw"}
    assert "<img" not in text and "Guillotine" not in text
    assert "3.2" in text and "kNN top-1" not in text
    # nothing at all to headline: only the raw block
    bare = {"encoder": {"source": "module"}, "dataset": {"name": "custom"}, "seconds": {}}
    assert _section_ids(write_report(tmp_path / "bare", bare).read_text(encoding="utf-8")) == {"raw"}


def test_strings_from_data_are_html_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">&'
    result = {"encoder": {"source": "run", "path": evil, "name": evil}, "dataset": {"name": evil,
              "class_names": [evil, "b", "c"]}, "seconds": {},
              "guillotine": [{"layer": evil, "dim": 8, "linear_top1": 50.0}],
              "knn": {"top1": {"20": 50.0}, "protocol": {"metric": evil}}}
    text = write_report(tmp_path, result, extra_images={evil: tmp_path / "missing.png"}).read_text(encoding="utf-8")
    assert evil not in text and "<img src=x" not in text
    assert html_escaped(evil) in text
    rows = [{"name": "<script>alert(1)</script>", "hparams": {"lr": "<b>"}, "rankme": 2.0, "linear_top1": 50.0}]
    compare = write_compare_report(tmp_path / "cmp", rows).read_text(encoding="utf-8")
    assert "<script>" not in compare and "&lt;script&gt;alert(1)&lt;/script&gt;" in compare
    assert "<b>" not in compare and "lr=&lt;b&gt;" in compare


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_write_report_rejects_misaligned_arrays(tmp_path):
    feats, labels = _clusters(10, 4, seed=0)
    with pytest.raises(ValueError, match="test_labels has 29 rows"):
        write_report(tmp_path, {"encoder": {}, "dataset": {}, "seconds": {}}, test_features=feats,
                     test_labels=labels[:29])


# ----------------------------------------------------------------------------------------------- retrieval


def _brute_force(q: np.ndarray, m: np.ndarray, k: int, exclude_self: bool):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    mn = m / np.linalg.norm(m, axis=1, keepdims=True)
    sims = qn @ mn.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_nearest_neighbors_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    q, m = rng.normal(size=(30, 5)), rng.normal(size=(50, 5)) * 3.0
    sims, idx = nearest_neighbors(torch.tensor(q), torch.tensor(m), k=6, chunk_size=chunk_size)
    ref_sims, ref_idx = _brute_force(q, m, 6, exclude_self=False)
    assert torch.equal(idx, torch.from_numpy(ref_idx))
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_nearest_neighbors_exclude_self(chunk_size):
    x = np.random.default_rng(1).normal(size=(40, 5))
    sims, idx = nearest_neighbors(torch.tensor(x), torch.tensor(x), k=4, chunk_size=chunk_size)
    assert torch.equal(idx[:, 0], torch.arange(40))  # without exclusion each point is its own nearest neighbour
    np.testing.assert_allclose(sims[:, 0].numpy(), 1.0, atol=1e-5)
    sims, idx = nearest_neighbors(torch.tensor(x), torch.tensor(x), k=4, exclude_self=True, chunk_size=chunk_size)
    ref_sims, ref_idx = _brute_force(x, x, 4, exclude_self=True)
    assert torch.equal(idx, torch.from_numpy(ref_idx))
    assert not (idx == torch.arange(40)[:, None]).any()
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-5)


def test_nearest_neighbors_rejects_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        nearest_neighbors(torch.randn(3, 4), torch.randn(5, 4), 2, exclude_self=True)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        nearest_neighbors(torch.randn(5, 4), torch.randn(5, 4), 5, exclude_self=True)
    with pytest.raises(ValueError, match="same dim"):
        nearest_neighbors(torch.randn(3, 4), torch.randn(5, 3), 2)


def _has_color(path, hex_color: str, tol: int = 12) -> bool:
    target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - target).max(axis=1) <= tol).any())


def test_retrieval_grid_frames_same_and_different_labels(tmp_path):
    queries = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8)
    neighbors = torch.full((2, 3, 1, 8, 8), 200, dtype=torch.uint8)
    all_same = retrieval_grid(queries, neighbors, tmp_path / "same.png", [0, 1], [[0, 0, 0], [1, 1, 1]], ["a", "b"])
    assert _has_color(all_same, SAME_COLOR) and not _has_color(all_same, DIFFERENT_COLOR)
    mixed = retrieval_grid(queries, neighbors, tmp_path / "mixed.png", [0, 1], [[0, 1, 0], [1, 1, 1]], ["a", "b"])
    assert _has_color(mixed, SAME_COLOR) and _has_color(mixed, DIFFERENT_COLOR)
    unlabeled = retrieval_grid(queries, neighbors, tmp_path / "none.png")
    assert not _has_color(unlabeled, SAME_COLOR) and not _has_color(unlabeled, DIFFERENT_COLOR)
    with pytest.raises(ValueError, match="uint8"):
        retrieval_grid(queries.float(), neighbors, tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------- embedding map


def _knn_accuracy_2d(coords: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    votes = np.array([np.bincount(labels[row], minlength=labels.max() + 1).argmax() for row in nn])
    return float((votes == labels).mean())


def test_embed_2d_keeps_separated_clusters_apart(tmp_path):
    feats, labels = _clusters(60, 20, seed=0)
    coords, index = embed_2d(feats, n=2000, seed=0, labels=labels)
    assert coords.shape == (180, 2) and np.array_equal(index, np.arange(180))
    assert _knn_accuracy_2d(coords, labels.numpy()) == 1.0
    again, _ = embed_2d(feats, n=2000, seed=0, labels=labels)
    np.testing.assert_allclose(coords, again)  # deterministic for a seed
    path = plot_embedding_map(coords, labels, ["x", "y", "z"], tmp_path / "map.png", "three blobs")
    assert Image.open(path).size[0] > 300


def test_subset_is_seeded_and_stratified():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 50)
    index = subset_indices(200, 40, seed=3, labels=labels)
    assert np.bincount(labels[index]).tolist() == [20, 10, 10]  # each class keeps its share
    assert len(np.unique(index)) == 40 and np.array_equal(index, np.sort(index))
    assert np.array_equal(index, subset_indices(200, 40, seed=3, labels=labels))
    assert not np.array_equal(index, subset_indices(200, 40, seed=4, labels=labels))


def test_embed_2d_errors():
    with pytest.raises(ValueError, match="perplexity"):
        embed_2d(torch.randn(20, 4), perplexity=30)
    with pytest.raises(ValueError, match="method"):
        embed_2d(torch.randn(50, 4), method="pca")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="umap-learn"):
            embed_2d(torch.randn(50, 4), method="umap")


# ----------------------------------------------------------------------------------------------- compare


def test_spearman_matches_hand_computation():
    # ranks x = [1, 3, 4, 5, 2], y = [2, 4, 5, 3, 1]; sum d^2 = 8; rho = 1 - 6 * 8 / (5 * (25 - 1)) = 0.6
    assert spearman([62.1, 80.4, 87.1, 91.3, 70.2], [85.7, 87.1, 87.44, 86.9, 84.8]) == pytest.approx(0.6)
    # ties get average ranks: x -> [1, 2.5, 2.5, 4], y -> [1, 3, 2, 4]; Pearson of the ranks = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_compare_report_picks_and_accuracy_lost(tmp_path):
    rows = [
        {"name": "t0.05", "hparams": {"temperature": 0.05}, "rankme": 62.1, "alpha_req": 2.4, "linear_top1": 85.7},
        {"name": "t0.1", "hparams": {"temperature": 0.1}, "rankme": 80.4, "alpha_req": 2.0, "linear_top1": 87.1},
        {"name": "t0.2", "hparams": {"temperature": 0.2}, "rankme": 87.1, "alpha_req": 1.92, "linear_top1": 87.44},
        {"name": "t0.5", "hparams": {"temperature": 0.5}, "rankme": 91.3, "alpha_req": 1.6, "linear_top1": 86.9},
        {"name": "t1.0", "hparams": {"temperature": 1.0}, "rankme": 70.2, "alpha_req": 1.1, "linear_top1": 84.8},
        {"name": "no-numbers", "hparams": "lr=0.004"},
    ]
    summary = compare_summary(rows)
    assert summary["accuracy_key"] == "linear_top1" and summary["n_rankme"] == 5
    assert summary["spearman_rankme"] == pytest.approx(0.6)
    assert summary["picks"] == {"oracle": "t0.2", "rankme": "t0.5", "alpha_req": "t1.0"}
    assert summary["accuracy_lost"]["rankme"] == pytest.approx(87.44 - 86.9)
    assert summary["accuracy_lost"]["oracle"] == 0.0
    text = write_compare_report(tmp_path, rows).read_text(encoding="utf-8")
    assert "0.60 over 5 runs" in text and "not evidence" not in text and "0.54 pts" in text and "2.64 pts" in text
    assert all(u.startswith("data:image/png;base64,") for u in _data_uris(text)) and _data_uris(text)
    with pytest.raises(ValueError, match="at least one run"):
        write_compare_report(tmp_path, [])
