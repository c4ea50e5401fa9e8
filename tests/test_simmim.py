"""SimMIM: random masks of whole patch groups at the paper's ratio, an l1 loss on the masked patches only, an encoder
that sees every token (masked ones as the mask token), exact resume, the encoder alone exported."""

import pytest
import torch
from test_train import _args, _resumed_equals_uninterrupted

from selfsup.cli import main
from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.masking import group_mask
from selfsup.data.types import DataInfo
from selfsup.losses.masked_modeling import patchify, simmim_loss
from selfsup.methods import get_method
from selfsup.methods.masked_modeling.simmim import SimMIMParams
from selfsup.train import _step_seed

SMALL = ["model.backbone=vit_tiny", "model.patch_size=4", "optim.name=adamw", "optim.lr_rule=none",
         "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false",
         "eval.rotation=false", "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false"]


def _simmim(size=28, channels=1, **params):
    cfg = Config(method="simmim", params=SimMIMParams(**params))
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "views.size": size}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("simmim").build(cfg, DataInfo("image", (channels, size, size), (0.5,) * channels,
                                                 (0.25,) * channels))
    m.encoder.blocks = m.encoder.blocks[:2]
    return m


def test_group_mask_draws_whole_units_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    m = group_mask(64, (8, 8), group=2, ratio=0.6, generator=g)  # 16 units of 2x2, ceil(9.6) = 10 drawn
    assert m.shape == (64, 64) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [40] * 64
    units = m.view(64, 4, 2, 4, 2)  # every 2x2 unit is all masked or all visible
    assert torch.all(units.all(dim=(2, 4)) == units.any(dim=(2, 4)))
    # uniform over units: each unit is masked in about 10/16 of many samples
    freq = group_mask(4000, (8, 8), 2, 0.6, g).view(4000, 4, 2, 4, 2)[:, :, 0, :, 0].float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 10 / 16), atol=0.04)


def test_group_mask_on_a_grid_that_is_not_a_multiple_cuts_the_edge_units():
    g = torch.Generator().manual_seed(1)
    m = group_mask(500, (7, 7), 2, 0.6, g).view(500, 7, 7)  # 4x4 units cut to 7x7: 10 units drawn
    counts = m.flatten(1).sum(1)
    assert counts.min() >= 10 * 1 and counts.max() <= 10 * 4 and 0.5 < counts.float().mean() / 49 < 0.7
    assert torch.equal(m[:, :6, :6].reshape(500, 3, 2, 3, 2).all(dim=(2, 4)),
                       m[:, :6, :6].reshape(500, 3, 2, 3, 2).any(dim=(2, 4)))  # inner units stay whole


def test_group_mask_is_seeded_and_validates():
    a = group_mask(4, 8, 2, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(a, group_mask(4, 8, 2, 0.6, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, group_mask(4, 8, 2, 0.6, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="masks all"):
        group_mask(2, 4, 2, 0.9, torch.Generator())  # ceil(0.9 * 4) = 4 of 4 units
    with pytest.raises(TypeError, match="Generator"):
        group_mask(2, 4, 2, 0.5)


def test_simmim_loss_is_l1_on_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    by_hand = sum((pred[b, i] - target[b, i]).abs().sum() for b in range(2) for i in range(6) if mask[b, i]) / (5 * 16)
    torch.testing.assert_close(simmim_loss(pred, target, mask), by_hand)
    changed = target.clone()
    changed[~mask] += 100.0  # visible patches' targets
    torch.testing.assert_close(simmim_loss(pred, changed, mask), by_hand)
    assert simmim_loss(target, target, mask) == 0 and simmim_loss(pred, target, torch.zeros_like(mask)) == 0
    # no per-patch normalization (unlike MAE's norm_pix): a shifted target changes the loss
    assert not torch.allclose(simmim_loss(pred, target + 1.0, mask), by_hand)


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_encoder_sees_every_token_with_mask_tokens_on_the_masked_ones(size, channels):
    m = _simmim(size, channels)
    n = (size // 4) ** 2
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(1))
    mask = views.masks["mask"]
    out = m(views, Progress(0, 10, 5))
    assert seen[0].shape == (4, 1 + n, m.encoder.embed_dim)  # no token dropping
    # the masked tokens entering block 0 are the mask token + position: equal for two samples at one position
    both_masked = (mask[0] & mask[1]).nonzero()[0].item()
    torch.testing.assert_close(seen[0][0, 1 + both_masked], seen[0][1, 1 + both_masked])
    both_visible = (~mask[0] & ~mask[1]).nonzero()[0].item()  # two different images' patches differ there
    assert not torch.allclose(seen[0][0, 1 + both_visible], seen[0][1, 1 + both_visible])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.encoder.mask_token.grad.abs().sum() > 0
    assert m.head.out_features == 16 * channels and set(m.exports()) == {"backbone"}
    with torch.no_grad():  # the loss is the l1 of the head's pixels against the crop's own patches, masked ones only
        tokens = m.encoder.forward_features(views.crops[0], masks=mask)["tokens"]
        direct = simmim_loss(m.head(tokens), patchify(views.crops[0], 4), mask)
    torch.testing.assert_close(out["loss"].detach(), direct, rtol=1e-5, atol=1e-6)


def test_masks_differ_across_processes_and_steps_and_repeat_for_the_same_step():
    m = _simmim()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)

    def mask(rank, step):
        return m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step))).masks["mask"]

    assert torch.equal(mask(0, 5), mask(0, 5))
    assert not torch.equal(mask(0, 5), mask(1, 5)) and not torch.equal(mask(0, 5), mask(0, 6))


def test_simmim_needs_a_vit(tiny_fmnist, tmp_path, capsys):
    assert main(_args("simmim", tiny_fmnist, tmp_path / "r", *SMALL, "model.backbone=resnet10")) == 2
    assert "needs a ViT" in capsys.readouterr().err


def test_simmim_trains_resumes_exactly_and_exports_the_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("simmim", tiny_fmnist, tmp_path, *SMALL)
    assert any(k.startswith("head.") for k in state)  # the pixel head is trained, not exported
