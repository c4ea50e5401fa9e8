"""Exports beyond safetensors: ONNX (run with onnxruntime against PyTorch) and timm weights (loaded by timm where it
is installed; the key mapping checked against timm's key names everywhere)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import selfsup
from selfsup.cli import main
from selfsup.export_formats import NoTimmCounterpart, export_onnx, export_timm, timm_state_dict
from selfsup.nn.backbones import build_backbone, export_backbone

MEAN, STD = [0.3], [0.4]
ONNX_ATOL = 1e-4  # onnxruntime vs PyTorch on CPU, float32: observed differences are ~1e-6
TIMM_ATOL = 1e-5  # the same weights in the same architecture: observed differences are 0
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only cost wake-ups

TINY = {
    "resnet": ("resnet10", dict(stem="small", width=4, zero_init_residual=False), 16),
    "vit": ("vit_tiny", dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), 16),
}


def _export(tmp_path, name, kwargs, size, tag="exp"):
    torch.manual_seed(0)
    model = build_backbone(name, in_chans=1, **kwargs)
    with torch.no_grad():  # BN statistics that are not the identity
        model.train()(torch.randn(8, 1, size, size) * 2 + 1)
    export_backbone(model.eval(), tmp_path / tag, extra={"mean": MEAN, "std": STD})
    return tmp_path / tag


@pytest.mark.parametrize("kind", sorted(TINY))
def test_onnx_gives_the_pytorch_features_for_any_batch(kind, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    name, kwargs, size = TINY[kind]
    exp = _export(tmp_path, name, kwargs, size)
    out = tmp_path / "model.onnx"
    if kind == "resnet":  # the command line ...
        assert main(["export", str(exp), "--format", "onnx", "--out", str(out), "--image-size", str(size)]) == 0
        assert f"onnx -> {out}" in capsys.readouterr().out
    else:  # ... and Python
        assert export_onnx(exp, out, image_size=size) == out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [1, size, size] and isinstance(inp.shape[0], str)
    images = torch.rand(5, 1, size, size)  # traced with a batch of 2: the batch axis is dynamic
    (features,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = selfsup.load_backbone(exp)(images)  # floats in [0, 1], its own normalization
    np.testing.assert_allclose(features, expected.numpy(), atol=ONNX_ATOL, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["mean"]) == MEAN and json.loads(props["selfsup_spec"])["name"] == name


# ------------------------------------------------------------------------------------------- timm

# timm 1.0's own key names for resnet18(layers=[1, 1, 1, 1]) and vit_tiny_patch16_224(depth=1), as its state_dict()
TIMM_RESNET10_KEYS = {
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    *(f"layer{i}.0.{m}.{p}" for i in range(1, 5) for m in ("conv1", "conv2") for p in ("weight",)),
    *(f"layer{i}.0.{m}.{p}" for i in range(1, 5) for m in ("bn1", "bn2")
      for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    *(f"layer{i}.0.downsample.0.weight" for i in range(2, 5)),
    *(f"layer{i}.0.downsample.1.{p}" for i in range(2, 5)
      for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
}
TIMM_VIT_DEPTH1_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    *(f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
      for p in ("weight", "bias")),
}


def test_timm_key_mapping_of_a_resnet_and_a_vit():
    resnet = build_backbone("resnet10", in_chans=1, stem="imagenet", width=64)
    name, args, state = timm_state_dict(resnet)
    assert name == "resnet18" and args == {"in_chans": 1, "layers": [1, 1, 1, 1]}
    assert set(state) == TIMM_RESNET10_KEYS
    assert torch.equal(state["layer2.0.downsample.0.weight"], resnet.state_dict()["layer2.0.shortcut.0.weight"])
    assert torch.equal(state["conv1.weight"], resnet.stem[0].weight)
    vit = build_backbone("vit_tiny", in_chans=1, img_size=16, patch_size=4, depth=1, pool="mean", mask_token=True)
    name, args, state = timm_state_dict(vit)
    assert name == "vit_tiny_patch16_224" and set(state) == TIMM_VIT_DEPTH1_KEYS  # mask_token dropped
    assert args == {"in_chans": 1, "img_size": 16, "patch_size": 4, "embed_dim": 192, "depth": 1, "num_heads": 3,
                    "mlp_ratio": 4.0, "qkv_bias": True, "global_pool": "avg", "fc_norm": False}


def test_timm_refuses_a_resnet_timm_cannot_build(tmp_path, capsys):
    exp = _export(tmp_path, *TINY["resnet"])
    with pytest.raises(NoTimmCounterpart, match="'small' stem"):
        export_timm(exp, tmp_path / "timm")
    assert main(["export", str(exp), "--format", "timm", "--out", str(tmp_path / "timm")]) == 2
    assert "model.stem=imagenet" in capsys.readouterr().err and not (tmp_path / "timm").exists()


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet10", dict(stem="imagenet", width=64, zero_init_residual=False), 32),
    ("vit_tiny", dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, pool="mean"), 16),
    ("timm:vit_tiny_patch16_224", dict(img_size=16, patch_size=4, depth=1), 16),  # model.backbone=timm:<name>
])
def test_timm_loads_the_export_and_gives_the_same_features(name, kwargs, size, tmp_path):
    timm = pytest.importorskip("timm")
    exp = _export(tmp_path, name, kwargs, size)
    out = export_timm(exp, tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    x = (torch.rand(3, 1, size, size) - MEAN[0]) / STD[0]
    with torch.no_grad():
        expected = selfsup.load_backbone(exp, raw=True)(x)
        by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        torch.testing.assert_close(by_folder(x), expected, atol=TIMM_ATOL, rtol=0)
        torch.testing.assert_close(by_name(x), expected, atol=TIMM_ATOL, rtol=0)
        with_head = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)  # fine-tuning: a new head
    assert with_head(x).shape == (3, 10)
