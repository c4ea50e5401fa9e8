"""Inpainting: one random square hole per image from the step's generator, the encoder sees the image with the hole
blanked, the loss is the L2 of Pathak et al. eq. (1) on the hole only, training resumes exactly."""

import pytest
import torch
from test_train import _resumed_equals_uninterrupted

from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.pretext import square_holes
from selfsup.data.types import DataInfo
from selfsup.losses.pretext import inpainting_loss
from selfsup.methods import get_method
from selfsup.methods.pretext.inpainting import InpaintingParams
from selfsup.train import _step_seed

SMALL = ["model.backbone=resnet10", "model.width=8", "model.stem=small", "optim.name=adamw", "optim.lr_rule=none",
         "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false",
         "eval.rotation=false", "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false",
         "inpainting.decoder_channels=16"]


def test_holes_are_squares_of_the_given_side_anywhere_in_the_view():
    h = square_holes(2000, 10, 4, torch.Generator().manual_seed(0))
    assert h.shape == (2000, 10, 10) and h.flatten(1).sum(1).eq(16).all()
    rows, cols = h.any(2), h.any(1)
    assert rows.sum(1).eq(4).all() and cols.sum(1).eq(4).all()  # one 4x4 block: 4 rows x 4 cols
    assert h[:, 0, 0].any() and h[:, 9, 9].any() and h[:, 0, 9].any()  # every corner gets covered sometimes
    with pytest.raises(ValueError, match="hole side"):
        square_holes(2, 10, 10, torch.Generator())


def test_inpainting_loss_is_the_squared_error_on_the_hole_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    hole = torch.zeros(2, 5, 5, dtype=torch.bool)
    hole[0, 1:3, 1:3] = True
    hole[1, 0, 0] = True
    by_hand = sum(((pred[b, :, i, j] - target[b, :, i, j]) ** 2).sum() for b, i, j in hole.nonzero().tolist()) / (5 * 3)
    torch.testing.assert_close(inpainting_loss(pred, target, hole), by_hand)
    changed = target.clone()
    changed[~hole.unsqueeze(1).expand_as(target)] += 50.0  # the context's pixels
    torch.testing.assert_close(inpainting_loss(pred, changed, hole), by_hand)


def _inpainting():
    cfg = Config(method="inpainting", params=InpaintingParams(decoder_channels=16))
    for k, v in {"model.backbone": "resnet10", "model.width": 8, "model.stem": "small", "views.size": 28}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    return get_method("inpainting").build(cfg, DataInfo("image", (1, 28, 28), (0.5,), (0.25,)))


def test_the_encoder_never_sees_the_hole_and_the_decoder_paints_the_view():
    m = _inpainting()
    seen = []
    m.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, 0, 2)))
    hole = views.masks["hole"]
    assert hole.flatten(1).sum(1).eq(14 * 14).all()
    out = m(views, Progress(0, 10, 2))
    assert torch.all(seen[0][hole.unsqueeze(1)] == 0)  # blanked to the mean
    torch.testing.assert_close(seen[0][~hole.unsqueeze(1)], views.crops[0][~hole.unsqueeze(1)])
    assert m.decoder(out["features"]).shape == (3, 1, 28, 28)
    out["loss"].backward()
    assert m.decoder.fc.weight.grad.abs().sum() > 0

    def draw(rank, step):
        return m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step))).masks["hole"]

    assert torch.equal(draw(0, 5), draw(0, 5)) and not torch.equal(draw(0, 5), draw(1, 5))


def test_inpainting_trains_resumes_exactly_and_exports_the_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("inpainting", tiny_fmnist, tmp_path, *SMALL)
    assert any(k.startswith("decoder.") for k in state)
