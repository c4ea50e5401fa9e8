"""RotNet: the loss is the 4-way rotation cross-entropy of Gidaris et al. eq. (2), every image enters in its four
rotations with the right labels, training resumes exactly and exports the encoder alone."""

import math

import pytest
import torch
from test_train import _resumed_equals_uninterrupted

from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.pretext import rotate_all
from selfsup.data.types import DataInfo
from selfsup.losses.pretext import rotation_loss
from selfsup.methods import get_method
from selfsup.methods.pretext.rotnet import RotNetParams

SMALL = ["model.backbone=resnet10", "model.width=8", "model.stem=small", "optim.name=adamw", "optim.lr_rule=none",
         "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false",
         "eval.rotation=false", "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false"]


def test_rotation_loss_is_the_mean_negative_log_probability_of_the_true_rotation():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 5.0, 0.0]])
    rot = torch.tensor([0, 1, 2, 3])
    by_hand = -sum(math.log(math.exp(r[k]) / sum(math.exp(v) for v in r)) for r, k in zip(logits.tolist(), range(4))) / 4
    assert rotation_loss(logits, rot).item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="4 classes"):
        rotation_loss(torch.zeros(4, 3), rot)


def test_rotate_all_labels_follow_the_rotation_on_a_hand_case():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 2] = 1.0  # a dot in the top-right corner
    r, y = rotate_all(x)
    corners = [tuple((img[0] == 1).nonzero()[0].tolist()) for img in r]
    # counter-clockwise quarter turns move top-right -> top-left -> bottom-left -> bottom-right
    assert corners == [(0, 2), (0, 0), (2, 0), (2, 2)] and y.tolist() == [0, 1, 2, 3]


def test_the_encoder_sees_all_four_rotations_of_each_crop():
    cfg = Config(method="rotnet", params=RotNetParams())
    for k, v in {"model.backbone": "resnet10", "model.width": 8, "model.stem": "small", "views.size": 28}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("rotnet").build(cfg, DataInfo("image", (1, 28, 28), (0.5,), (0.25,)))
    seen = []
    m.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(1))
    out = m(views, Progress(0, 10, 5))
    torch.testing.assert_close(seen[0], rotate_all(views.crops[0])[0])
    rotated, labels = rotate_all(views.crops[0])
    with torch.no_grad():  # the logged accuracy is the head's on the 4 x 5 rotated copies (train-mode BN, same batch)
        acc = (m.head(m.encoder(rotated)).argmax(1) == labels).float().mean()
    assert out["features"].shape == (5, m.encoder.num_features)
    torch.testing.assert_close(out["rotation_acc"], acc)
    out["loss"].backward()
    assert m.head.weight.grad.abs().sum() > 0 and m.guillotine_head is None


def test_rotnet_trains_resumes_exactly_and_exports_the_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("rotnet", tiny_fmnist, tmp_path, *SMALL)
    assert any(k.startswith("head.") for k in state)
