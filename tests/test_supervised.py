"""The supervised ceiling (`selfsup train supervised`): its loss is the cross-entropy of a linear classifier on the
backbone features averaged over the views, written out by hand here; it refuses unlabelled data; trained through
the CLI it learns the labels (far above chance on held-out images) and exports the backbone without the
classifier."""

import json
import math

import pytest
import torch
from test_train import tiny

from selfsup.cli import main
from selfsup.config import build_config
from selfsup.contract import Progress, Views
from selfsup.data.types import DataInfo
from selfsup.methods import get_method

INFO = DataInfo("image", (1, 16, 16), (0.5,), (0.25,), 4, "tiny", 64)
SMALL = ["model.backbone=resnet10", "model.width=4", "views.size=16"]


def _build(info=INFO, *extra):
    cfg = build_config("supervised", [*SMALL, *extra], params_cls=get_method("supervised").params_cls)
    torch.manual_seed(0)
    return get_method("supervised").build(cfg, info)


def _hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        total += -(1 - smoothing) * log_p[y] - smoothing * sum(log_p) / len(row)
    return total / len(labels)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_the_views_mean_cross_entropy_of_a_linear_classifier(smoothing):
    m = _build(INFO, f"supervised.label_smoothing={smoothing}").eval()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(6, 1, 16, 16, generator=g) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    out = m(Views(crops=crops, n_global=2, labels=labels), Progress(0, 10, 5))
    with torch.no_grad():
        expected = sum(_hand_cross_entropy(m.classifier(m.encoder(c)), labels, smoothing) for c in crops) / 2
        first_features = m.encoder(crops[0])
    assert abs(out["loss"].item() - expected) < 1e-5
    assert torch.allclose(out["features"], first_features, atol=1e-6)
    assert 0 <= out["train_top1"] <= 100


def test_labels_are_required():
    with pytest.raises(ValueError, match="needs labels"):
        _build(DataInfo("image", (1, 16, 16), (0.5,), (0.25,), None, "unlabelled", 64))
    m = _build()
    with pytest.raises(ValueError, match="needs the labels"):
        m(Views(crops=[torch.zeros(2, 1, 16, 16)] * 2, n_global=2), Progress(0, 1, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        _build(INFO, "supervised.label_smoothing=1.0")


def test_trains_on_the_labels_and_exports_only_the_backbone(tiny_fmnist, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sup"
    args = [a for a in tiny(tiny_fmnist, out, "epochs=3", "optim.name=adamw", "optim.base_lr=3e-3",
                            "optim.lr_rule=none", "eval.mlp=false", "eval.report=false", "eval.lidar_images=0",
                            "eval.rotation=false", "eval.guillotine=false")
            if not a.startswith("byol.")]
    assert main(["train", "supervised", *args]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["linear_top1"] > 60 and s["knn_top1"] > 60  # 4 classes: chance is 25%
    exported = load_file(str(out / "backbone.safetensors"))
    assert exported and not any(k.startswith("classifier") for k in exported)
    assert any("train_top1" in line for line in (out / "metrics.jsonl").read_text().splitlines())
