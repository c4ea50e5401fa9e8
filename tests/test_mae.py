"""MAE: the encoder sees exactly (1 - ratio) N tokens, the loss ignores visible patches, masks come from the step's
generator (different per process, the same on resume), 1x28x28 and 3x32x32 both train."""

import json

import pytest
import torch
from test_train import _args, _resumed_equals_uninterrupted

from selfsup.cli import main
from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.masked_modeling import mae_loss, patchify, unpatchify
from selfsup.methods import get_method
from selfsup.methods.masked_modeling.mae import MAEParams, sincos_pos_embed
from selfsup.train import _step_seed

SMALL = ["model.backbone=vit_tiny", "model.patch_size=4", "mae.decoder_dim=16", "mae.decoder_depth=1",
         "mae.decoder_heads=2", "optim.name=adamw", "optim.lr_rule=none", "optim.base_lr=1e-3", "eval.linear=false",
         "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false"]


def _mae(size=28, channels=1, **params):
    cfg = Config(method="mae", params=MAEParams(decoder_dim=16, decoder_depth=1, decoder_heads=2, **params))
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "views.size": size}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("mae").build(cfg, DataInfo("image", (channels, size, size), (0.5,) * channels, (0.25,) * channels))
    m.encoder.blocks = m.encoder.blocks[:2]
    return m


def test_patchify_round_trip_and_raster_order():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(p[0, 4].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 4:8, 4:8])  # row 1, col 1
    torch.testing.assert_close(unpatchify(p, 4, 3, (2, 3)), x)


def test_mae_loss_ignores_visible_patches_and_normalizes_per_patch():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 12, generator=g), torch.randn(2, 6, 12, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    loss = mae_loss(pred, target, mask, norm_pix=False)
    by_hand = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, by_hand)
    changed = target.clone()
    changed[~mask] += 100.0  # visible patches' targets
    torch.testing.assert_close(mae_loss(pred, changed, mask, norm_pix=False), loss)
    changed[0, 0] += 1.0  # a masked one
    assert not torch.allclose(mae_loss(pred, changed, mask, norm_pix=False), loss)
    # norm_pix: a target patch shifted and scaled gives the same loss
    torch.testing.assert_close(mae_loss(pred, target * 3 + 7, mask), mae_loss(pred, target, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_encoder_sees_exactly_the_visible_tokens(size, channels):
    m = _mae(size, channels)
    n = (size // 4) ** 2
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    x = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(1))
    out = m(views, Progress(0, 10, 5))
    visible = n - round(0.75 * n)
    assert seen == [(4, 1 + visible, m.encoder.embed_dim)]  # [cls] + the visible patches, nothing else
    assert views.masks["mask"].sum(1).tolist() == [n - visible] * 4
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.decoder.mask_token.grad is not None
    assert set(m.exports()) == {"backbone"} and m.guillotine_head is None


def test_masks_differ_across_processes_and_steps_and_repeat_for_the_same_step():
    m = _mae()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)

    def mask(rank, step):
        return m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step))).masks["mask"]

    assert torch.equal(mask(0, 5), mask(0, 5))
    assert not torch.equal(mask(0, 5), mask(1, 5)) and not torch.equal(mask(0, 5), mask(0, 6))


def test_decoder_position_embedding_is_fixed_and_distinct():
    pos = sincos_pos_embed(16, (7, 7))
    assert pos.shape == (1, 49, 16) and torch.cdist(pos[0], pos[0]).fill_diagonal_(1).min() > 0.1


def test_mae_needs_a_vit(tiny_fmnist, tmp_path, capsys):
    assert main(_args("mae", tiny_fmnist, tmp_path / "r", *SMALL, "model.backbone=resnet10")) == 2  # config error
    assert "needs a ViT" in capsys.readouterr().err


def test_mae_trains_resumes_exactly_and_exports_the_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("mae", tiny_fmnist, tmp_path, *SMALL)  # the masks of steps 3-4 redrawn
    assert any(k.startswith("decoder.") for k in state)
    assert json.loads((tmp_path / "straight" / "backbone.json").read_text())["spec"]["name"] == "vit_tiny"
