"""Backbones, heads and backbone export (selfsup.nn): architecture checked against closed-form references."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.nn.backbones import (
    backbone_spec,
    build_backbone,
    export_backbone,
    load_backbone,
)
from selfsup.nn.heads import DINOHead, predictor, projector
from selfsup.nn.resnet import BasicBlock, Bottleneck
from selfsup.nn.vit import Block, interpolate_pos_embed


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("name, expected", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_resnet_param_count_matches_torchvision_without_fc(name, expected):
    # torchvision: resnet18 11,689,512 - fc (512*1000+1000); resnet50 25,557,032 - fc (2048*1000+1000)
    with torch.device("meta"):
        model = build_backbone(name, stem="imagenet", width=64)
    assert n_params(model) == expected


def test_resnet34_and_resnet10_param_counts():
    # ResNet-34 (torchvision 21,797,672 - fc 513,000); ResNet-10 = ResNet-18 minus one block per stage
    with torch.device("meta"):
        r34, r18, r10 = (build_backbone(n) for n in ("resnet34", "resnet18", "resnet10"))
    assert n_params(r34) == 21_797_672 - 513_000
    second_blocks = sum(n_params(getattr(r18, f"layer{i}")[1]) for i in range(1, 5))
    assert n_params(r10) == n_params(r18) - second_blocks


@pytest.mark.parametrize("stem, spatial28, spatial32", [("cifar", 4, 4), ("small", 2, 2), ("imagenet", 1, 1)])
@pytest.mark.parametrize("name, expansion", [("resnet10", 1), ("resnet18", 1), ("resnet50", 4)])
def test_resnet_output_shapes(stem, spatial28, spatial32, name, expansion):
    width = 8
    for in_chans, size, spatial in ((1, 28, spatial28), (3, 32, spatial32)):
        model = build_backbone(name, in_chans=in_chans, stem=stem, width=width)
        x = torch.randn(2, in_chans, size, size)
        assert model.num_features == width * 8 * expansion
        assert model(x).shape == (2, model.num_features)
        feats = model.forward_features(x)
        assert feats["map"].shape == (2, model.num_features, spatial, spatial)
        # forward is the global average pool of the last feature map
        torch.testing.assert_close(model(x), feats["map"].mean(dim=(2, 3)))
        torch.testing.assert_close(feats["pooled"], model(x))


@pytest.mark.parametrize("stem, size_into_stage1", [("cifar", 32), ("small", 16), ("imagenet", 8)])
def test_stem_resolution_into_stage1(stem, size_into_stage1):
    model = build_backbone("resnet18", stem=stem, width=8)
    seen = {}
    model.layer1.register_forward_hook(lambda m, inp, out: seen.update(shape=inp[0].shape))
    model(torch.randn(2, 3, 32, 32))
    assert seen["shape"] == (2, 8, size_into_stage1, size_into_stage1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_init_residual_makes_each_block_relu_of_shortcut(name, mode):
    torch.manual_seed(0)
    model = build_backbone(name, stem="cifar", width=4).train(mode == "train")
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    x = model.stem(torch.randn(4, 3, 16, 16))
    for block in blocks:  # walk the trunk so every block sees its real input shape
        torch.testing.assert_close(block(x), F.relu(block.shortcut(x)))
        x = block(x)
    # without the option the residual branch is live
    model = build_backbone(name, stem="cifar", width=4, zero_init_residual=False)
    block = model.layer1[0]
    x = torch.randn(4, block.conv1.in_channels, 16, 16)
    assert not torch.allclose(block(x), F.relu(block.shortcut(x)))


def test_resnet_kaiming_init_and_channels_last():
    model = build_backbone("resnet18", stem="cifar", width=16)
    conv = model.layer3[0].conv2  # fan_out = 64 * 3 * 3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- ViT


def test_vit_small_param_count_matches_timm():
    # timm vit_small_patch16_224, num_classes=0
    with torch.device("meta"):
        model = build_backbone("vit_small", img_size=224, patch_size=16)
    assert n_params(model) == 21_665_664
    assert model.num_features == 384


def test_vit_sizes_and_custom_depth():
    with torch.device("meta"):
        dims = {n: build_backbone(n).num_features for n in ("vit_tiny", "vit_small", "vit_base")}
        custom = build_backbone("vit_tiny", depth=4, embed_dim=96, num_heads=3)
    assert dims == {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
    assert len(custom.blocks) == 4 and custom.num_features == 96


def naive_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Reference pre-norm block with attention written as softmax(QK^T / sqrt(d)) V."""
    B, N, D = x.shape
    H = block.attn.num_heads
    d = D // H
    q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in block.attn.qkv(block.norm1(x)).split(D, dim=-1))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, D))
    h = block.norm2(x)
    return x + block.mlp[2](F.gelu(block.mlp[0](h)))


def test_vit_block_sdpa_equals_naive_attention():
    torch.manual_seed(0)
    block = Block(dim=48, num_heads=4).eval()
    x = torch.randn(3, 17, 48)
    torch.testing.assert_close(block(x), naive_block(block, x), rtol=1e-5, atol=1e-5)


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=4)
    return build_backbone("vit_tiny", in_chans=1, **{**args, **kw}).eval()


def test_vit_shapes_and_pooling():
    model = tiny_vit(pool="cls")
    x = torch.randn(2, 1, 28, 28)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(model(x), tokens[:, 0])
    mean_model = tiny_vit(pool="mean")  # same seed -> same weights
    torch.testing.assert_close(mean_model(x), tokens[:, 1:].mean(dim=1))


def test_vit_pos_embed_interpolation():
    model = tiny_vit()
    grid_pos = model.pos_embed[:, 1:]
    # same size: untouched
    assert interpolate_pos_embed(grid_pos, (4, 4), (4, 4)) is grid_pos
    # a constant field stays constant under bicubic interpolation
    const = torch.full((1, 16, 5), 0.3)
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4), (7, 3)), torch.full((1, 21, 5), 0.3))
    # a 56x56 input (8x8 grid) equals a 56-px model whose pos-embed is the bicubic resize of the 28-px one
    x = torch.randn(2, 1, 56, 56)
    big = tiny_vit(img_size=56)
    big.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, strict=False)
    ref = F.interpolate(grid_pos.reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic")
    with torch.no_grad():
        big.pos_embed[:, :1] = model.pos_embed[:, :1]
        big.pos_embed[:, 1:] = ref.permute(0, 2, 3, 1).reshape(1, 64, 32)
    torch.testing.assert_close(model(x), big(x))
    assert model.forward_tokens(torch.randn(2, 1, 14, 21)).shape == (2, 1 + 6, 32)  # non-square local crop
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 1, 30, 28))


def test_vit_token_dropping_keeps_selected_patches():
    model = tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    all_idx = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(model.forward_tokens(x, keep=all_idx), model.forward_tokens(x))
    keep = torch.tensor([[0, 5, 9], [15, 2, 3]])
    assert model.forward_tokens(x, keep=keep).shape == (2, 4, 32)
    # position is added before dropping, and attention is permutation-equivariant: shuffling the kept
    # patches permutes the patch tokens and leaves [cls] unchanged
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    shuffled = model.forward_tokens(x, keep=perm)
    full = model.forward_tokens(x)
    torch.testing.assert_close(shuffled[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled[:, 1:], torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 32)),
                               rtol=1e-5, atol=1e-5)


def test_vit_drop_path_and_frozen_patch_embed():
    model = tiny_vit(drop_path=0.2, depth=3, freeze_patch_embed=True)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])  # linear in depth
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


# ---------------------------------------------------------------- heads


def test_projector_structure():
    p = projector(8, 16, 4, num_layers=3)
    assert [type(m) for m in p] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [m.bias is not None for m in p if isinstance(m, nn.Linear)] == [False, False, True]
    assert (p.in_dim, p.out_dim) == (8, 4) and p(torch.randn(5, 8)).shape == (5, 4)
    p = projector(8, 16, 4, num_layers=2, last_bn=True)
    assert [type(m) for m in p] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert not p[-1].affine and p[-2].bias is None
    z = p.train()(torch.randn(64, 8))  # last BN without affine: standardized output in train mode
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    p = projector(8, 16, 4, num_layers=1)
    assert [type(m) for m in p] == [nn.Linear] and p[0].in_features == 8
    with pytest.raises(ValueError, match="num_layers"):
        projector(8, 16, 4, num_layers=0)


def test_projector_without_bn_is_the_mlp_formula():
    torch.manual_seed(0)
    p = projector(6, 10, 3, num_layers=2, bn=False)
    assert [type(m) for m in p] == [nn.Linear, nn.ReLU, nn.Linear]
    x = torch.randn(4, 6)
    W1, b1, W2, b2 = p[0].weight, p[0].bias, p[2].weight, p[2].bias
    torch.testing.assert_close(p(x), torch.relu(x @ W1.T + b1) @ W2.T + b2)


def test_predictor_is_byol_mlp():
    q = predictor(256, 4096, 256)
    assert [type(m) for m in q] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (q[0].in_features, q[0].out_features, q[3].out_features) == (256, 4096, 256)


def test_dino_head_is_cosine_to_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    ref = z @ F.normalize(head.prototypes, dim=-1).T
    torch.testing.assert_close(head(x), ref)
    assert head(x).abs().max() <= 1 + 1e-6
    assert DINOHead(16, out_dim=10, norm_last_layer=False).gain.shape == (10,)


# ---------------------------------------------------------------- registry, export, load


def test_unknown_names_suggest_closest():
    with pytest.raises(ValueError, match="Did you mean 'resnet18'") as e:
        build_backbone("resnet81")
    assert "vit_small" in str(e.value)
    with pytest.raises(ValueError, match="Did you mean 'stem'"):
        build_backbone("resnet18", stme="cifar")
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="tiny")


def test_backbone_spec_roundtrips_through_json():
    model = build_backbone("resnet10", in_chans=1, stem="small", width=8)
    spec = backbone_spec(model)
    assert spec == {"name": "resnet10", "in_chans": 1, "stem": "small", "width": 8}
    assert json.loads(json.dumps(spec)) == spec
    with pytest.raises(ValueError, match="build_backbone"):
        backbone_spec(nn.Linear(2, 2))


def _trained_like(model: nn.Module) -> nn.Module:
    """Perturb all weights and BN statistics so a round trip cannot pass by re-initialisation."""
    torch.manual_seed(3)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model(torch.randn(8, *model.example_shape))
    return model.eval()


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet18", dict(stem="small", width=8), (1, 28, 28)),
    ("vit_tiny", dict(img_size=28, patch_size=7, depth=2, embed_dim=32, num_heads=4, pool="mean"), (1, 28, 28)),
])
def test_export_load_round_trip(tmp_path, name, kwargs, shape):
    model = build_backbone(name, in_chans=shape[0], **kwargs)
    model.example_shape = shape
    model = _trained_like(model)
    x = torch.randn(4, *shape)
    ref = model(x)
    out_dir = export_backbone(model, tmp_path / "export", extra={"method": "simclr", "epochs": 3})
    config = json.loads((out_dir / "backbone.json").read_text())
    assert config["spec"] == backbone_spec(model) and config["num_features"] == model.num_features
    assert config["format_version"] == 1 and config["method"] == "simclr" and "load_backbone" in config["how_to_load"]
    for path in (out_dir, out_dir / "backbone.safetensors", out_dir / "backbone.json", str(out_dir)):
        loaded = load_backbone(path, raw=True)
        assert not loaded.training
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    assert not list(out_dir.glob("*.tmp"))  # atomic writes leave no temporaries


def test_export_channels_last_and_shared_tensors(tmp_path):
    model = build_backbone("resnet10", stem="cifar", width=4).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 16, 16)
    export_backbone(model, tmp_path)
    torch.testing.assert_close(load_backbone(tmp_path, raw=True)(x), model(x))
    from selfsup.nn.backbones import _tensors_for_safetensors

    w = torch.randn(3, 3)
    tensors = _tensors_for_safetensors({"a": w, "b": w, "c": w.t()})
    assert tensors["b"].untyped_storage().data_ptr() != tensors["a"].untyped_storage().data_ptr()
    assert all(t.is_contiguous() for t in tensors.values())
    torch.testing.assert_close(tensors["c"], w.t())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_backbone"):
        load_backbone(tmp_path / "nothing_here")
    model = build_backbone("resnet10", width=4)
    export_backbone(model, tmp_path)
    (tmp_path / "backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*backbone.safetensors"):
        load_backbone(tmp_path, raw=True)
    export_backbone(model, tmp_path)
    (tmp_path / "backbone.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid backbone config"):
        load_backbone(tmp_path / "backbone.safetensors", raw=True)
    export_backbone(model, tmp_path)
    (tmp_path / "backbone.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt"):
        load_backbone(tmp_path, raw=True)
    other = build_backbone("resnet10", width=8)
    export_backbone(other, tmp_path)
    (tmp_path / "backbone.json").write_text(json.dumps({"spec": backbone_spec(model), "format_version": 1}))
    with pytest.raises(ValueError, match="do not match"):
        load_backbone(tmp_path, raw=True)


def test_timm_backbone(tmp_path):
    pytest.importorskip("timm")
    model = build_backbone("timm:resnet18", in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 512) and model.num_features == 512
    export_backbone(model, tmp_path)
    torch.testing.assert_close(load_backbone(tmp_path, raw=True)(x), model(x))


def test_model_keys_size_a_vit_and_its_spec_rebuilds_it_and_a_resnet_refuses_them():
    import selfsup.methods.self_distillation  # noqa: F401  (registers dino)
    from selfsup.config import ConfigError, build_config
    from selfsup.data.types import DataInfo
    from selfsup.methods import get_method
    from selfsup.methods.common import make_backbone
    from selfsup.nn.backbones import backbone_spec, build_backbone

    def cfg(overrides):
        return build_config("dino", overrides, params_cls=get_method("dino").params_cls)

    info = DataInfo("image", (1, 28, 28), (0.5,), (0.5,), 10, "fashion_mnist", 60000)
    keys = ["model.backbone=vit_tiny", "model.patch_size=7", "views.size=28"]
    named = make_backbone(cfg(keys), info)
    assert (named.embed_dim, len(named.blocks), named.blocks[0].attn.num_heads) == (192, 12, 3)  # vit_tiny's
    small = make_backbone(cfg([*keys, "model.embed_dim=64", "model.depth=2", "model.num_heads=4"]),
                          info)
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (64, 2, 4)
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 64)
    rebuilt = build_backbone(**backbone_spec(small))  # what export / eval of a run rebuild
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    with pytest.raises(ConfigError, match="model.depth set for model.backbone='resnet10'"):
        make_backbone(cfg(["model.depth=2"]), info)
    with pytest.raises(ValueError, match="embed_dim=64 must be divisible by num_heads=3"):
        make_backbone(cfg([*keys, "model.embed_dim=64"]), info)  # vit_tiny's 3 heads
    with pytest.raises(ConfigError, match="model.depth"):
        cfg([*keys, "model.depth=-1"])
