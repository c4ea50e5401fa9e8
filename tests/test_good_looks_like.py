"""What good looks like (issue 13): pixel baselines, their cache, the below-baseline verdict, recipe references and
their place in eval.json, the headline and report.html."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.config import EvalConfig, build_config
from selfsup.data.datasets import from_arrays
from selfsup.evaluate import baselines as B
from selfsup.evaluate.run import headline, run_hyperparameters, run_reference
from selfsup.evaluate.suite import evaluate_model
from selfsup.methods import get_method


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _blobs(n: int, seed: int, size: int = 8, classes: int = 3):
    """uint8 (n, 1, size, size): class c lights the c-th horizontal band, on uniform noise; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 120, (n, 1, size, size), generator=g, dtype=torch.uint8)
    band = size // classes
    for c in range(classes):
        x[y == c, :, c * band:(c + 1) * band] += 100
    return x, y


# ----------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("shape, expected", [((1, 28, 28), (28, 28)), ((3, 32, 32), (32, 32)),
                                             ((3, 96, 96), (32, 32)), ((3, 64, 128), (16, 32)),
                                             ((1, 64, 64), (32, 32)), ((3, 20, 100), (6, 32))])
def test_pixel_shape_fits_32_px_and_4096_values_without_upsampling(shape, expected):
    assert B.pixel_shape(shape) == expected
    c, h, w = shape
    assert c * expected[0] * expected[1] <= 4096 or (h, w) == expected


def test_pixel_features_downsample_by_block_means():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4) * 10
    got = B.pixel_features(x, (2, 2))
    blocks = x.float().view(1, 1, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(1, 1, 2, 2, 4).mean(-1) / 255
    assert torch.allclose(got, blocks.flatten(1), atol=1e-6)
    assert torch.equal(B.pixel_features(x), x.float().flatten(1) / 255)  # no size: no resampling


def _reference_knn(xtr, ytr, xte, yte, k, t):
    """NumPy fmnist-knn on per-pixel standardized pixels: cosine, top-k, exp(s/T) votes (DINO)."""
    xtr, xte = xtr.reshape(len(xtr), -1) / 255.0, xte.reshape(len(xte), -1) / 255.0
    mean, std = xtr.mean(0), xtr.std(0, ddof=1)
    a, b = (xtr - mean) / (std + 1e-6), (xte - mean) / (std + 1e-6)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T
    correct = 0
    for i in range(len(b)):
        nn_idx = np.argsort(-sims[i])[:k]
        votes = np.zeros(ytr.max() + 1)
        np.add.at(votes, ytr[nn_idx], np.exp(sims[i, nn_idx] / t))
        correct += votes.argmax() == yte[i]
    return 100.0 * correct / len(b)


def test_pixel_baselines_follow_the_run_protocols():
    xtr, ytr = _blobs(240, 0)
    xte, yte = _blobs(90, 1)
    res = B.pixel_baselines(xtr, ytr, xte, yte, knn_k=7, knn_temperature=0.1, linear_epochs=5, lrs=(0.01, 0.1))
    want = _reference_knn(xtr.numpy().astype(np.float64), ytr.numpy(), xte.numpy().astype(np.float64), yte.numpy(),
                          7, 0.1)
    assert res["knn_top1"] == pytest.approx(want, abs=0.006)  # rounded to 2 decimals
    assert res["protocol"]["knn"] == {"k": 7, "temperature": 0.1, "metric": "cosine", "n_train": 240}
    assert res["linear"]["lr"] in (0.01, 0.1) and res["linear_top1"] > 90  # bands are linearly separable
    assert res["pixels"].startswith("1x8x8 = 64") and res["notes"] == []


def test_pixel_baselines_state_downsampling_and_subsets():
    xtr, ytr = _blobs(60, 0, size=48)
    xte, yte = _blobs(30, 1, size=48)
    res = B.pixel_baselines(xtr, ytr, xte, yte, knn_k=5, linear_epochs=2, lrs=(0.1,), max_train=30)
    assert res["pixels"].startswith("1x32x32")
    assert any("48x48 to 32x32" in n for n in res["notes"]) and any("30 of the 60" in n for n in res["notes"])
    with pytest.raises(ValueError, match="differ in shape"):
        B.pixel_baselines(xtr, ytr, xte[:, :, :40], yte)


def test_the_second_evaluation_reads_the_cache(tmp_path, monkeypatch):
    xtr, ytr = _blobs(90, 0)
    xte, yte = _blobs(30, 1)
    kw = dict(knn_k=5, linear_epochs=2, lrs=(0.1,))
    first = B.cached_pixel_baselines(xtr, ytr, xte, yte, **kw)
    files = list((tmp_path / "xdg" / "selfsup" / "baselines").glob("*.json"))
    assert first["cache"].startswith("computed, saved to") and len(files) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(B, "pixel_baselines", fail)
    second = B.cached_pixel_baselines(xtr, ytr, xte, yte, **kw)
    assert second["cache"] == f"read from {files[0]}"
    assert {k: v for k, v in second.items() if k != "cache"} == {k: v for k, v in first.items() if k != "cache"}
    # another protocol or other pixels: another key
    assert B.baseline_key(xtr, ytr, xte, yte, {**kw, "knn_k": 6}) != B.baseline_key(xtr, ytr, xte, yte, kw)
    xte2 = xte.clone()
    xte2[0, 0, 0, 0] += 1
    assert B.baseline_key(xtr, ytr, xte2, yte, kw) != B.baseline_key(xtr, ytr, xte, yte, kw)


# ----------------------------------------------------------------------------------------------- verdicts, references


def test_below_baseline_names_each_accuracy_under_its_floor():
    result = {"knn_top1": 84.1, "linear_top1": 85.0, "baselines": {"knn_top1": 86.2, "linear_top1": 84.5}}
    assert B.below_baseline(result) == [
        "kNN 84.10% is below the pixel baseline 86.20%: this encoder has not yet learned more than the pixels "
        "(train longer or see the recipe's reference)"]
    result["reference"] = {"knn_top1": 86.84, "epochs": 10.0}
    assert B.below_baseline(result)[0].endswith("(train longer: the recipe's reference run reached kNN 86.84% "
                                                "after 10 epochs)")
    assert B.below_baseline({**result, "knn_top1": 86.2}) == []  # equal is not below
    assert B.below_baseline({"knn_top1": 10.0}) == []  # no baselines measured


def test_recipe_reference_only_for_its_dataset_and_recipe():
    refs = {"fashion_mnist": {"vicreg:default": {"knn_top1": 86.84, "epochs": 10.0, "batch_size": 256}}}
    hit = B.recipe_reference("fashion_mnist", "vicreg", "default", run={"epochs": 10, "batch_size": 256},
                             references=refs)
    assert hit["knn_top1"] == 86.84 and hit["differs"] == [] and hit["recipe"] == "vicreg:default"
    other = B.recipe_reference("fashion_mnist", "vicreg", "default", references=refs,
                               run={"epochs": 1, "batch_size": 128, "imbalance_ratio": 10.0, "max_steps": 0})
    assert other["differs"] == ["epochs 1 (reference 10)", "batch size 128 (reference 256)",
                                "data.imbalance_ratio 10 (reference 1)"]
    assert B.recipe_reference("cifar10", "vicreg", "default", references=refs) is None
    assert B.recipe_reference("fashion_mnist", "vicreg", "long", references=refs) is None


def test_a_run_of_a_shipped_recipe_gets_the_shipped_reference():
    params = get_method("vicreg").params_cls
    cfg = build_config("vicreg", ["epochs=1"], params_cls=params)
    ref = run_reference(cfg)
    shipped = B.load_references()["fashion_mnist"]["vicreg:default"]
    assert ref["knn_top1"] == shipped["knn_top1"] and ref["differs"][0].startswith("epochs 1 (reference ")
    assert run_reference(build_config("vicreg", ["data=cifar10"], params_cls=params)) is None
    hp = run_hyperparameters(cfg, {"lr": 0.01})
    assert hp["epochs"] == 1 and hp["batch_size"] == cfg.batch_size and hp["optim.lr (used)"] == 0.01
    assert hp["optim.name"] == cfg.optim.name and hp["model.backbone"] == cfg.model.backbone
    assert any(k.startswith("vicreg.") for k in hp)


def test_headline_says_when_the_run_is_below_the_pixels():
    line = headline({"knn_top1": 84.1, "pixel_knn_top1": 86.2, "pixel_linear_top1": 84.5,
                     "below_baseline": ["kNN 84.10% is below the pixel baseline 86.20%: ..."]})
    first, warning = line.split("\n")
    assert first == "kNN top-1 84.10%, (pixel baseline: kNN 86.20%, linear 84.50%)"
    assert warning == "  WARNING: kNN 84.10% is below the pixel baseline 86.20%: ..."


# ----------------------------------------------------------------------------------------------- end to end


def test_eval_json_holds_what_the_report_shows(tmp_path):
    """A random 2-d linear encoder of 8x8 band images (worse than the pixels): eval.json carries the baselines, the
    verdict, the per-class numbers and confusion matrix, the edge flags, the split and how to read RankMe.
    (The report's rendering of these keys: tests/test_report.py; the MLP's stopping: tests/test_probes_more.py.)"""
    xtr, ytr = _blobs(240, 0)
    xte, yte = _blobs(90, 1)
    names = ["top", "middle", "bottom"]
    train = from_arrays(xtr.numpy(), ytr.numpy(), names, name="bands/train")
    test = from_arrays(xte.numpy(), yte.numpy(), names, name="bands/test")
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    opts = EvalConfig(knn_k=5, knn_ks=[5], linear_epochs=3, mlp=False, rotation=False, lidar_images=0,
                      guillotine=False, report=False, init_baseline=False)
    res = evaluate_model(enc, train, test, [0.5], [0.25], opts, out_dir=tmp_path, verbose=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["baselines"]["knn_top1"] > saved["knn_top1"]
    assert saved["below_baseline"] == res["below_baseline"] == B.below_baseline(saved) != []
    lin = saved["linear"]
    cm = np.asarray(lin["confusion"])
    assert cm.shape == (3, 3) and cm.sum(1).tolist() == [30, 30, 30]
    assert lin["top1"] == pytest.approx(100 * np.trace(cm) / 90, abs=0.006)
    assert lin["per_class_top1"] == [round(100 * cm[i, i] / 30, 2) for i in range(3)]
    assert {"lr_edge", "weight_decay_edge", "edge_notes"} <= set(lin)
    assert saved["dataset"]["test_split"] == "bands/test" and saved["dataset"]["class_names"] == names
    assert "how_to_read" in saved["label_free"]["rankme"]
    # eval.baselines=false (an EvalConfig attribute once config.py has it) skips them
    opts.baselines = False
    assert "baselines" not in evaluate_model(enc, train, test, [0.5], [0.25], opts, verbose=False)
