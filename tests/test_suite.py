"""`selfsup eval` end to end and the protocols written for it: guillotine cuts, rotation proxy, view features,
the suite on known-answer data, exported-backbone evaluation and `selfsup compare`."""

import json

import pytest
import torch
from torch import nn

from selfsup.cli import main
from selfsup.config import EvalConfig
from selfsup.data.datasets import from_arrays
from selfsup.data.views import build_view_maker
from selfsup.evaluate.features import extract_view_features
from selfsup.evaluate.guillotine import projector_cuts, projector_features
from selfsup.evaluate.rotation import rotate_all, rotation_probe
from selfsup.evaluate.suite import evaluate_model
from selfsup.nn.heads import projector

# ------------------------------------------------------------------------------------------- guillotine


def test_projector_cuts_name_every_hidden_block_and_the_output():
    p = projector(8, 16, 4, num_layers=3, last_bn=True)
    cuts = projector_cuts(p)
    assert [name for name, _ in cuts] == ["projector.1 (Linear->BN->ReLU)", "projector.2 (Linear->BN->ReLU)",
                                          "projector.out (Linear->BN)"]
    assert [end for _, end in cuts] == [3, 6, 8]
    assert projector_cuts(nn.Sequential(nn.Linear(8, 4))) == [("projector.out (Linear)", 1)]


def test_projector_features_equal_applying_the_layers_by_hand_in_eval_mode():
    torch.manual_seed(0)
    p = projector(8, 16, 4, num_layers=2)
    p.train()
    p(torch.randn(64, 8))  # move the BN running statistics away from their init
    x = torch.randn(50, 8)
    reps = projector_features(x, p, batch_size=7)
    assert p.training  # the flag is restored
    p.eval()
    with torch.no_grad():
        hidden = p[2](p[1](p[0](x)))
        assert torch.allclose(reps["projector.1 (Linear->BN->ReLU)"], hidden, atol=1e-6)
        assert torch.allclose(reps["projector.out (Linear)"], p(x), atol=1e-6)
    assert reps["backbone"] is x and list(reps) == ["backbone", "projector.1 (Linear->BN->ReLU)",
                                                     "projector.out (Linear)"]


def test_projector_features_reject_a_projector_of_another_model():
    with pytest.raises(ValueError, match="expects 8-d inputs"):
        projector_features(torch.randn(4, 6), projector(8, 16, 4))
    with pytest.raises(ValueError, match="nn.Sequential"):
        projector_features(torch.randn(4, 8), nn.Linear(8, 4))


# ------------------------------------------------------------------------------------------- rotation


def test_rotate_all_matches_rot90_and_labels_each_block():
    x = torch.arange(2 * 9, dtype=torch.uint8).view(2, 1, 3, 3)
    r, y = rotate_all(x)
    assert r.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(r[2, 0], torch.tensor([[2, 5, 8], [1, 4, 7], [0, 3, 6]], dtype=torch.uint8))  # 90° CCW
    assert torch.equal(r[4], torch.flip(x[0], dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        rotate_all(torch.zeros(2, 1, 3, 4, dtype=torch.uint8))


def _corner_images(n, seed):
    """Images with one bright corner block at a random corner: the rotation is visible in the pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 30, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    x[:, :, :3, :3] = 250  # always top-left before rotation
    return x


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class _RotationInvariant(nn.Module):
    """Sum of the image over its four rotations: identical features for every rotation of an image."""

    def forward(self, x):
        return sum(torch.rot90(x, k, dims=(2, 3)) for k in range(4)).flatten(1)


def test_rotation_probe_reads_rotation_from_pixels_and_is_chance_for_an_invariant_encoder():
    tr, te = _corner_images(200, 0), _corner_images(100, 1)
    seen = rotation_probe(_Flatten(), tr, te, [0.5], [0.25], n_train=200, n_test=100, epochs=10)
    assert seen["top1"] == pytest.approx(100.0) and seen["chance"] == 25.0
    blind = rotation_probe(_RotationInvariant(), tr, te, [0.5], [0.25], n_train=200, n_test=100, epochs=10)
    assert blind["top1"] == pytest.approx(25.0, abs=1e-6)  # identical features: one prediction for all four


# ------------------------------------------------------------------------------------------- view features


def test_extract_view_features_is_seeded_and_views_differ():
    x = torch.randint(0, 255, (10, 1, 12, 12), dtype=torch.uint8)
    vm = build_view_maker("simclr", 12, [0.5], [0.25], 1)
    a = extract_view_features(_Flatten(), x, vm, n_views=3, seed=1, batch_size=4)
    b = extract_view_features(_Flatten(), x, vm, n_views=3, seed=1, batch_size=4)
    assert a.shape == (10, 3, 144) and torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])
    assert not torch.equal(a, extract_view_features(_Flatten(), x, vm, n_views=3, seed=2, batch_size=4))
    with pytest.raises(ValueError, match="n_views"):
        extract_view_features(_Flatten(), x, vm, n_views=1)


# ------------------------------------------------------------------------------------------- the suite


def _blob_data(n, seed, shuffle_labels=False):
    """4 classes: a bright 4x4 blob in one quadrant on dim noise; easy for pixels, 12x12 grayscale."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 40, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        r, col = 6 * (c // 2) + 1, 6 * (c % 2) + 1
        x[i, 0, r:r + 4, col:col + 4] = 230
    if shuffle_labels:
        y = y[torch.randperm(n, generator=g)]
    return from_arrays(x.numpy(), y.numpy(), name="blobs/train")


FAST = dict(knn_ks=[5, 10], linear_epochs=10, lidar_images=40, lidar_views=4, tsne_points=60)


def test_suite_known_answers_on_separable_and_shuffled_labels(tmp_path):
    train, test = _blob_data(240, 0), _blob_data(120, 1)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(144, 32))
    torch.manual_seed(0)
    head = projector(32, 24, 8, num_layers=2)
    res = evaluate_model(enc, train, test, [0.1], [0.2], EvalConfig(**FAST, knn_k=10), projector=head,
                         out_dir=tmp_path, verbose=False)
    assert res["knn"]["top1"]["10"] == 100.0 and res["linear_top1"] == 100.0 and res["mlp_top1"] == 100.0
    assert set(res["knn"]["majority_top1"]) == {"5", "10"}
    assert [r["layer"].split(" ")[0] for r in res["guillotine"]] == ["backbone", "projector.1", "projector.out"]
    assert all(r["linear_top1"] is not None and r["rankme"] > 1 for r in res["guillotine"])
    # a linear encoder of a 144-pixel image has rank <= 32 and the spectra are descending
    assert res["label_free"]["rankme"]["value"] <= 32 and res["label_free"]["rankme"]["n_samples"] == 120
    assert set(res["spectra"]) == {"backbone", "projector.1", "projector.out"}
    assert all(a >= b for a, b in zip(res["spectra"]["backbone"], res["spectra"]["backbone"][1:]))
    # a rotated quadrant-blob image is an image of another class: the data set is rotation invariant, so no
    # encoder can tell the rotation (the corner-image test above has the opposite case)
    assert res["label_free"]["rotation"]["top1"] < 40
    assert res["label_free"]["lidar"]["n_images"] == 40 and res["label_free"]["lidar"]["n_views"] == 4
    assert res["label_free"]["lidar"]["views"].startswith("selfsup's SimCLR views at 12 px")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["knn_top1"] == res["knn_top1"] and (tmp_path / "report.html").exists()
    assert {"features", "knn", "linear", "mlp", "label_free", "lidar", "rotation", "total"} <= set(res["seconds"])

    shuffled = evaluate_model(enc, _blob_data(240, 0, True), _blob_data(120, 1, True), [0.1], [0.2],
                              EvalConfig(**FAST, knn_k=10, rotation=False, label_free=False, mlp=False),
                              verbose=False)
    assert shuffled["linear_top1"] < 45 and shuffled["knn"]["top1"]["10"] < 45  # chance is 25 (n=120)


def test_suite_without_labels_runs_label_free_protocols_only():
    x = _blob_data(120, 0).images
    unlabeled = from_arrays(x.numpy(), None, name="blobs/train")
    res = evaluate_model(nn.Sequential(nn.Flatten(), nn.Linear(144, 16)), unlabeled, None, [0.1], [0.2],
                         EvalConfig(**FAST), verbose=False)
    assert "knn" not in res and "linear" not in res and res["dataset"]["labels"] is False
    assert res["label_free"]["rankme"]["split"] == "train" and "lidar" in res["label_free"]


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import synthetic_classes, write_idx
    root = tmp_path_factory.mktemp("data") / "fmnist"
    for split, n, seed in (("train", 256, 0), ("t10k", 128, 1)):
        write_idx(root, split, *synthetic_classes(n, seed))
    runs = []
    for t in (0.1, 0.5):
        out = root.parent / f"run-t{t}"
        assert main(["train", "simclr", f"data.root={root}", f"out={out}", "epochs=1", "batch_size=64",
                     "model.backbone=resnet10", "model.width=4", "model.projector_hidden=32",
                     "model.projector_out=16", "views.size=16", "train.knn_every=0", f"simclr.temperature={t}",
                     "eval.mlp=false", "eval.rotation=false", "eval.report=false", "eval.linear_epochs=3",
                     "eval.lidar_images=0", "eval.knn_ks=[5,20]"]) == 0
        runs.append(out)
    return root, runs


def test_eval_run_writes_report_and_summary(tiny_run, capsys):
    root, (run, _) = tiny_run
    # the run was trained with eval.report/mlp/rotation off (its config.yaml says so): overrides turn them on
    assert main(["eval", str(run), "eval.report=true", "eval.mlp=true", "eval.rotation=true",
                 "eval.lidar_images=16", "eval.tsne_points=64"]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "RankMe" in out and "report.html" in out
    res = json.loads((run / "eval.json").read_text())
    assert res["encoder"]["source"] == "run" and res["guillotine"][0]["layer"] == "backbone"
    assert "rotation" in res["label_free"] and "mlp" in res
    assert res["label_free"]["lidar"]["views"].startswith("the run's training views")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn_top1"] == res["knn_top1"] and summary["rankme"] == res["label_free"]["rankme"]["value"]
    assert "<html" in (run / "report.html").read_text()[:200].lower()


def test_eval_exported_backbone_needs_a_dataset_and_then_works(tiny_run, tmp_path, capsys):
    root, (run, _) = tiny_run
    assert main(["eval", str(run / "init")]) == 2
    assert "data=NAME" in capsys.readouterr().err
    assert main(["eval", str(run / "init"), "model.width=8"]) == 2
    out = tmp_path / "ev"
    assert main(["eval", str(run / "init" / "backbone.safetensors"), "data=fashion_mnist",
                 f"data.root={root}", f"out={out}", "eval.report=false", "eval.mlp=false",
                 "eval.linear_epochs=3", "eval.knn_ks=[5]", "eval.knn_k=5", "eval.lidar_images=0"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["encoder"]["source"] == "backbone" and res["encoder"]["name"] == "resnet10"
    assert "guillotine" not in res and res["knn_top1"] > 0


def test_compare_ranks_runs_and_evaluates_those_without_eval_json(tiny_run, tmp_path, capsys):
    root, runs = tiny_run
    (runs[1] / "eval.json").unlink(missing_ok=True)
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    html = (out / "compare.html").read_text()
    assert "simclr.temperature" in html and runs[0].name in html and runs[1].name in html
    assert json.loads((runs[1] / "eval.json").read_text())["label_free"]["rankme"]["value"] > 1
    assert main(["compare", str(tmp_path / "nope")]) == 2


def test_suite_decoder_option_writes_one_grid_per_representation_into_the_report(tmp_path):
    train, test = _blob_data(64, 0), _blob_data(32, 1)
    torch.manual_seed(0)
    enc, head = nn.Sequential(nn.Flatten(), nn.Linear(144, 16)), projector(16, 16, 8)
    opts = EvalConfig(**FAST, knn_k=10, mlp=False, rotation=False, decoder=True, decoder_steps=5)
    res = evaluate_model(enc, train, test, [0.1], [0.2], opts, projector=head, out_dir=tmp_path, verbose=False)
    dec = res["decoder"]
    assert dec["grids"] == {"backbone": "decoder_backbone.png", "projector.out": "decoder_projector_out.png"}
    assert all((tmp_path / f).stat().st_size > 0 for f in dec["grids"].values())
    assert dec["protocol"]["n_images"] == 4  # the first image of each of the 4 classes
    assert all(0 <= dec["diversity"][k] <= 1 for k in dec["grids"])
    assert "Conditioned on projector.out: sample diversity" in (tmp_path / "report.html").read_text()


def test_evaluate_any_module_from_python(tmp_path):
    from selfsup.evaluate.run import evaluate

    train, test = _blob_data(120, 0), _blob_data(60, 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 16))
    res = evaluate(model, (train, test), out_dir=tmp_path, mean=[0.1], std=[0.2], device="cpu", mlp=False,
                   rotation=False, knn_ks=[5], knn_k=5, lidar_images=20, tsne_points=40, linear_epochs=5)
    assert res["encoder"] == {"source": "module", "name": "Sequential", "num_features": 16}
    assert res["knn_top1"] == 100.0 and (tmp_path / "report.html").exists()
    with pytest.raises(TypeError, match="Did you mean 'mlp'"):
        evaluate(model, (train, test), mpl=False)


def test_eval_of_an_interrupted_run_uses_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    import shutil

    _, (run, _) = tiny_run
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    for name in ("backbone.safetensors", "backbone.json", "eval.json"):
        (cut / name).unlink(missing_ok=True)
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (reads.append(str(f)) if str(f).endswith("last.pt")
                                                            else None) or real_load(f, *a, **k))
    assert main(["eval", str(cut), "eval.report=false", "eval.lidar_images=0"]) == 0
    assert reads == [str(cut / "checkpoints/last.pt")]  # the method and its encoder come from one read
    res = json.loads((cut / "eval.json").read_text())
    assert res["knn_top1"] == json.loads((run / "summary.json").read_text())["knn_top1"]  # same weights
