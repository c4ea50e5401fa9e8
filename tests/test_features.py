"""One `forward_features(x, masks=None, keep=None)` for every backbone: named outputs, the ViT's mask token and
intermediate layers (masked modeling, cookbook §2.5), checked against closed-form expectations."""

import sys
import types

import pytest
import torch
from torch import nn

from selfsup.nn.backbones import build_backbone


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=4)
    return build_backbone("vit_tiny", in_chans=1, **{**args, **kw}).eval()


def test_resnet_forward_features_names_its_outputs_and_refuses_token_masks():
    model = build_backbone("resnet10", in_chans=1, stem="small", width=4).eval()
    x = torch.randn(2, 1, 28, 28)
    out = model.forward_features(x)
    assert set(out) == {"pooled", "map"} and out["map"].shape == (2, 32, 2, 2)
    torch.testing.assert_close(out["pooled"], model(x))
    with pytest.raises(ValueError, match="apply to ViT"):
        model.forward_features(x, masks=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_forward_features_matches_forward_and_tokens(pool):
    model = tiny_vit(pool=pool)
    x = torch.randn(2, 1, 28, 28)
    out = model.forward_features(x)
    full = model.forward_tokens(x)
    torch.testing.assert_close(out["pooled"], model(x))
    torch.testing.assert_close(out["cls"], full[:, 0])
    torch.testing.assert_close(out["tokens"], full[:, 1:])
    assert out["layers"] == [] and out["tokens"].shape == (2, 16, 32)
    keep = torch.tensor([[0, 3, 8, 15], [1, 2, 4, 5]])
    kept = model.forward_features(x, keep=keep)
    assert kept["tokens"].shape == (2, 4, 32)
    torch.testing.assert_close(kept["pooled"], model(x, keep=keep))


def test_vit_intermediate_layers_are_the_blocks_outputs():
    model = tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    out = model.forward_features(x, layers=(-1, 0))
    assert len(out["layers"]) == 2  # block order: block 0, then the last
    # the final normed tokens are the last block's output through the final LayerNorm
    torch.testing.assert_close(model.norm(out["layers"][1]), model.forward_tokens(x))
    # block 0's output by hand
    p = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    t = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), p], dim=1)
    torch.testing.assert_close(out["layers"][0], model.blocks[0](t))
    with pytest.raises(ValueError, match="does not exist"):
        model.forward_features(x, layers=(3,))


def test_vit_mask_token_hides_the_masked_patches():
    model = tiny_vit(mask_token=True)
    assert "mask_token" in model.no_weight_decay()
    x = torch.randn(2, 1, 28, 28)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(model.forward_features(x, masks=masks)["tokens"], model.forward_features(x)["tokens"])
    masks[0, 5] = masks[1, [0, 15]] = True
    hidden = model.forward_features(x, masks=masks)["tokens"]
    assert not torch.allclose(hidden, model.forward_features(x)["tokens"])
    # what was under a masked patch cannot reach the output: change the pixels of patch 5 (row 1, col 1) of image 0
    y = x.clone()
    y[0, :, 7:14, 7:14] += 5.0
    torch.testing.assert_close(model.forward_features(y, masks=masks)["tokens"], hidden)
    # closed form: a mask token equal to the patch's own embedding changes nothing
    with torch.no_grad():
        model.mask_token.copy_(model.patch_embed(x).flatten(2).transpose(1, 2)[0, 5])
    one = torch.zeros(2, 16, dtype=torch.bool)
    one[0, 5] = True
    torch.testing.assert_close(model.forward_features(x, masks=one)["tokens"][0], model.forward_features(x)["tokens"][0],
                               rtol=1e-5, atol=1e-5)


def test_vit_without_mask_token_refuses_masks_and_keeps_its_state_dict():
    model = tiny_vit()
    assert "mask_token" not in model.state_dict()  # exports of earlier runs still load strictly
    with pytest.raises(ValueError, match="mask_token=True"):
        model.forward_features(torch.randn(1, 1, 28, 28), masks=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool \(B, N\)"):
        tiny_vit(mask_token=True).forward_features(torch.randn(1, 1, 28, 28), masks=torch.zeros(1, 16))


class _FakeTimmModel(nn.Module):
    """timm's API: forward_features -> (B, prefix + N, D) tokens, forward_head(pre_logits=True) -> pooled."""

    num_prefix_tokens = 1
    num_features = 8

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, 4)

    def forward_features(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)

    def forward_head(self, feats, pre_logits=False):
        return feats[:, 0]

    def forward(self, x):
        return self.forward_head(self.forward_features(x), pre_logits=True)


def test_timm_backbone_forward_features_uses_timms_names(monkeypatch):
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, num_classes=0, in_chans=3, **kw: _FakeTimmModel()
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = build_backbone("timm:vit_fake", in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    out = model.forward_features(x)
    assert out["tokens"].shape == (2, 16, 8) and out["cls"].shape == (2, 8)
    torch.testing.assert_close(out["pooled"], model(x))
