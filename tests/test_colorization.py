"""Colorization: Lab conversion on hand-known colours, the in-gamut ab cells, soft targets, the loss of Zhang et al.
eq. (2), an encoder that sees only lightness, a clear error on single-channel data, and training on colour images
the test writes."""

import pytest
import torch
from test_train import _args, _resumed_equals_uninterrupted

from selfsup.cli import main
from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.pretext import ab_bins, rgb_to_lab, soft_encode
from selfsup.data.types import DataInfo
from selfsup.losses.pretext import colorization_loss
from selfsup.methods import get_method
from selfsup.methods.pretext.colorization import ColorizationParams

SMALL = ["model.backbone=resnet10", "model.width=8", "model.stem=small", "optim.name=adamw", "optim.lr_rule=none",
         "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false",
         "eval.rotation=false", "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false",
         "colorization.decoder_channels=16"]


def test_lab_of_known_colours():
    rgb = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]).T.reshape(1, 3, 5, 1)
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    known = torch.tensor([[100, 0, 0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86],
                          [0, 0, 0]])  # CIE Lab (D65) of white, red, green, blue, black
    torch.testing.assert_close(lab, known, atol=0.02, rtol=0)


def test_ab_cells_cover_the_gamut_and_soft_targets_sum_to_one_near_the_colour():
    c = ab_bins(10.0)
    assert 250 <= len(c) <= 320 and torch.equal(c, torch.round(c / 10) * 10)
    red = rgb_to_lab(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1))[:, 1:]
    z = soft_encode(red, c)
    assert z.shape == (1, len(c), 1, 1) and torch.allclose(z.sum(1), torch.ones(1, 1, 1))
    nearest = torch.cdist(red.view(1, 2), c).argmin()
    assert z[0, :, 0, 0].argmax() == nearest and (z > 0).sum() == 5


def test_colorization_loss_is_the_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 3, 3, generator=g)
    target = torch.softmax(torch.randn(2, 6, 3, 3, generator=g), 1)
    by_hand = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(colorization_loss(logits, target), by_hand)
    w = torch.tensor([1.0, 2, 3, 4, 5, 6])
    weighted = -(target * torch.log_softmax(logits, 1)).sum(1) * w[target.argmax(1)]
    torch.testing.assert_close(colorization_loss(logits, target, w), weighted.mean())


def test_the_encoder_sees_grey_images_and_single_channel_data_is_refused():
    cfg = Config(method="colorization", params=ColorizationParams(decoder_channels=16, output_stride=2))
    for k, v in {"model.backbone": "resnet10", "model.width": 8, "model.stem": "small", "views.size": 16}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("colorization").build(cfg, DataInfo("image", (3, 16, 16), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    seen = []
    m.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = m(m.view_maker(x, torch.Generator().manual_seed(0)), Progress(0, 10, 0))
    raw = seen[0] * m.std + m.mean
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)  # R = G = B: no colour reaches the encoder
    torch.testing.assert_close(raw[:, 1], raw[:, 2], atol=1e-5, rtol=0)
    out["loss"].backward()
    assert m.decoder(out["features"]).shape == (2, len(m.bins), 8, 8) and m.decoder.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="colour"):
        get_method("colorization").build(cfg, DataInfo("image", (1, 16, 16), (0.5,), (0.2,)))


def test_fashion_mnist_is_a_config_error(tiny_fmnist, tmp_path, capsys):
    assert main(_args("colorization", tiny_fmnist, tmp_path / "r", *SMALL, "data.name=fashion_mnist")) == 2
    assert "needs colour" in capsys.readouterr().err


def test_colorization_trains_on_colour_images_and_resumes_exactly(tmp_path):
    from PIL import Image

    root = tmp_path / "colours"
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", 48), ("test", 16)]:
        for i in range(n):
            c = i % 3  # a red, green or blue square on a grey background
            img = torch.full((16, 16, 3), 120, dtype=torch.uint8)
            top, left = torch.randint(0, 8, (2,), generator=g).tolist()
            img[top:top + 8, left:left + 8] = 40
            img[top:top + 8, left:left + 8, c] = 230
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(root / split / f"class{c}" / f"{i}.png")
    fast = [*SMALL, "data=folder", "data.image_size=16", "views.size=16", "colorization.output_stride=2",
            "batch_size=16"]
    state = _resumed_equals_uninterrupted("colorization", root, tmp_path, *fast, stop=1)
    assert any(k.startswith("decoder.") for k in state)
