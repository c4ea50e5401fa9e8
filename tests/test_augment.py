"""Batched augmentations and view makers checked against hand computations and reference formulas.

References: torchvision's RandomResizedCrop.get_params (ported below, for the crop-box distribution), its
_rgb2hsv/_hsv2rgb (ported below, BSD-3-Clause, for hue), F.interpolate (crop+resize) and F.conv2d (blur).
"""

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from selfsup.data import augment as A
from selfsup.data.views import (
    MultiView,
    ViewMaker,
    build_view_maker,
    byol_views,
    multicrop_views,
    simclr_views,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_u8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=gen(seed), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------- crop boxes


def torchvision_crop_params(height, width, scale, ratio, rng: random.Random):
    """Port of torchvision.transforms.RandomResizedCrop.get_params with Python's RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_crop_boxes_within_bounds_and_distributed_like_torchvision(height, width):
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    boxes = A.sample_crop_boxes(n, height, width, scale, ratio, gen(0))
    top, left, h, w = boxes.T.double()
    assert boxes.dtype == torch.long and boxes.shape == (n, 4)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # integer rounding of w and h moves area and ratio slightly off the continuous bounds
    frac = h * w / (height * width)
    round_slack = (h + w + 1) / (height * width)
    assert (frac >= scale[0] - round_slack).all() and (frac <= scale[1] + 1e-9).all()
    aspect = w / h
    assert (aspect >= ratio[0] * (1 - 1 / h) * (1 - 1 / w) - 1e-9).all()
    assert (aspect <= ratio[1] * (1 + 1 / h) * (1 + 1 / w) + 1e-9).all()

    rng = random.Random(0)
    ref = torch.tensor([torchvision_crop_params(height, width, scale, ratio, rng) for _ in range(n)]).double()
    ref_frac = ref[:, 2] * ref[:, 3] / (height * width)
    assert abs(frac.mean() - ref_frac.mean()) < 0.02
    assert abs(frac.std() - ref_frac.std()) < 0.02
    assert abs((w / h).log().mean() - (ref[:, 3] / ref[:, 2]).log().mean()) < 0.02
    # positions uniform over the valid range: mean of top/(height-h) ~ 1/2 where there is room
    room = height - h
    assert abs((top[room > 0] / room[room > 0]).mean() - 0.5) < 0.03


def test_crop_boxes_fall_back_to_center_crop():
    # area fraction 1 with aspect ratio 2 never fits a square image -> central crop narrowed to ratio 2
    boxes = A.sample_crop_boxes(5, 20, 20, scale=(1.0, 1.0), ratio=(2.0, 2.0), generator=gen(0))
    assert boxes.tolist() == [[5, 0, 10, 20]] * 5


# --------------------------------------------------------------------------------------------- crop + resize


def test_resized_crop_matches_interpolate_of_crop():
    x = torch.rand(6, 3, 20, 24, generator=gen(1))
    boxes = torch.tensor(
        [[0, 0, 20, 24], [3, 5, 10, 7], [0, 10, 20, 14], [7, 0, 5, 5], [1, 2, 17, 3], [19, 23, 1, 1]]
    )
    flip = torch.tensor([False, True, False, True, False, True])
    out = A.resized_crop(x, boxes, 16, flip)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(
            x[i : i + 1, :, t : t + h, l : l + w], size=(16, 16), mode="bilinear", align_corners=False
        )
        if flip[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_resized_crop_of_uint8_scales_to_unit_range():
    x = rand_u8(4, 1, 12, 12)
    boxes = torch.tensor([[2, 3, 6, 8]] * 4)
    out = A.resized_crop(x, boxes, 9)
    ref = A.resized_crop(x.float() / 255, boxes, 9)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_identity_crop_and_flip_are_exact():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) / 150  # asymmetric image
    same = A.random_resized_crop(x, 5, scale=(1, 1), ratio=(1, 1), generator=gen(0), hflip_p=0.0)
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    flipped = A.random_resized_crop(x, 5, scale=(1, 1), ratio=(1, 1), generator=gen(0), hflip_p=1.0)
    torch.testing.assert_close(flipped, torch.flip(x, dims=[-1]), atol=1e-6, rtol=0)
    u8 = rand_u8(3, 1, 7, 7)
    torch.testing.assert_close(
        A.random_resized_crop(u8, 7, scale=(1, 1), ratio=(1, 1)), u8.float() / 255, atol=1e-6, rtol=0
    )


def test_half_of_the_images_are_flipped_independently():
    x = torch.rand(1, 1, 6, 6, generator=gen(2)).expand(200, 1, 6, 6)
    out = A.random_resized_crop(x, 6, scale=(1, 1), ratio=(1, 1), generator=gen(0), hflip_p=0.5)
    is_flipped = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    is_same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert (is_flipped ^ is_same).all()
    assert 70 < int(is_flipped.sum()) < 130


# --------------------------------------------------------------------------------------------- color


def test_grayscale_uses_itu_601_weights():
    x = torch.rand(3, 3, 4, 4, generator=gen(3))
    g = A.grayscale(x)
    ref = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(g[:, c], ref)
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(A.grayscale(one), one)


def test_random_grayscale_probability_and_independence():
    x = torch.rand(400, 3, 2, 2, generator=gen(4))
    out = A.random_grayscale(x, 0.2, gen(0))
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    untouched = (out == x).all(dim=(1, 2, 3))
    assert (gray ^ untouched).all()
    assert 50 < int(gray.sum()) < 110
    assert torch.equal(A.random_grayscale(x, 0.0, gen(0)), x)


def test_brightness_contrast_saturation_by_hand():
    x = torch.tensor([0.2, 0.6, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(A.adjust_brightness(x, 1.5), torch.tensor([0.3, 0.9, 1.0]).view(1, 1, 1, 3))
    # contrast blends with the image's mean gray level (here mean = 17/30)
    m = (0.2 + 0.6 + 0.9) / 3
    expected = torch.tensor([0.5 * v + 0.5 * m for v in (0.2, 0.6, 0.9)]).view(1, 1, 1, 3)
    torch.testing.assert_close(A.adjust_contrast(x, 0.5), expected)
    # saturation blends each pixel with its own gray value; factor 0 is grayscale, 2 over-saturates (clamped)
    rgb = torch.tensor([[0.8, 0.4, 0.1], [0.3, 0.3, 0.3]]).T.reshape(1, 3, 1, 2)
    gray = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(A.adjust_saturation(rgb, 0.0), gray.unsqueeze(1).expand_as(rgb))
    torch.testing.assert_close(A.adjust_saturation(rgb, 2.0), (2 * rgb - gray.unsqueeze(1)).clamp(0, 1))
    # per-image factors
    two = torch.stack([x[0], x[0]])
    out = A.adjust_brightness(two, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out, torch.stack([x[0] * 0.5, (x[0] * 2).clamp(0, 1)]))


def _rgb2hsv(img):
    """torchvision.transforms._functional_tensor._rgb2hsv (BSD-3-Clause), as reference."""
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img):
    """torchvision.transforms._functional_tensor._hsv2rgb (BSD-3-Clause), as reference."""
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32) % 6
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    mask = i.unsqueeze(dim=-3) == torch.arange(6).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    return torch.einsum(
        "...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), torch.stack((a1, a2, a3), dim=-4)
    )


def test_hue_shift_by_hand_and_against_torchvision_hsv():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(A.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(A.adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1))
    gray = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(A.adjust_hue(gray, 0.25), gray)

    x = torch.rand(32, 3, 5, 5, generator=gen(5))
    x[:8] = (x[:8] * 4).round() / 4  # ties between channels exercise the tie-breaking
    shifts = torch.rand(32, generator=gen(6)) - 0.5
    out = A.adjust_hue(x, shifts)
    for i in range(32):
        h, s, v = _rgb2hsv(x[i]).unbind(0)
        ref = _hsv2rgb(torch.stack(((h + shifts[i]) % 1.0, s, v)))
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


def test_solarize_by_hand():
    x = torch.tensor([0.2, 0.5, 0.8, 1.0]).view(1, 1, 1, 4)
    torch.testing.assert_close(A.solarize(x), torch.tensor([0.2, 0.5, 0.2, 0.0]).view(1, 1, 1, 4))
    torch.testing.assert_close(A.solarize(x, 0.3), torch.tensor([0.2, 0.5, 0.2, 0.0]).view(1, 1, 1, 4))
    torch.testing.assert_close(A.solarize(x, 0.6), torch.tensor([0.2, 0.5, 0.2, 0.0]).view(1, 1, 1, 4))
    torch.testing.assert_close(A.solarize(x, 0.9), torch.tensor([0.2, 0.5, 0.8, 0.0]).view(1, 1, 1, 4))


def test_jitter_applies_each_images_own_order():
    x = torch.rand(1, 3, 4, 4, generator=gen(7)).expand(2, 3, 4, 4).contiguous()
    factors = torch.tensor([[1.6, 0.3, 1.8, 0.2]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = A.apply_color_jitter(x, factors, order)

    def compose(img, ops):
        fns = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
        for op in ops:
            img = fns[op](img, factors[0, op].item())
        return img

    torch.testing.assert_close(out[0:1], compose(x[0:1], [0, 1, 2, 3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1:2], compose(x[1:2], [3, 2, 1, 0]), atol=1e-6, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # the order matters, so the two images differ
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    assert torch.equal(A.apply_color_jitter(x, identity, order), x)


def test_jitter_on_one_channel_uses_brightness_and_contrast_only():
    x = torch.rand(2, 1, 4, 4, generator=gen(8))
    factors = torch.tensor([[1.2, 0.7, 0.0, 0.3], [0.9, 1.3, 2.0, -0.4]])
    order = torch.tensor([[2, 1, 3, 0], [0, 3, 1, 2]])
    out = A.apply_color_jitter(x, factors, order)
    torch.testing.assert_close(out[0:1], A.adjust_brightness(A.adjust_contrast(x[0:1], 0.7), 1.2))
    torch.testing.assert_close(out[1:2], A.adjust_contrast(A.adjust_brightness(x[1:2], 0.9), 1.3))


def test_jitter_params_are_per_image_and_in_range():
    factors, order = A.sample_jitter_params(500, 0.4, 0.4, 0.2, 0.1, p=0.8, generator=gen(0))
    fired = ~(factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(dim=1)
    assert 350 < int(fired.sum()) < 450
    f = factors[fired]
    assert ((f[:, :2] >= 0.6) & (f[:, :2] <= 1.4)).all() and ((f[:, 2] >= 0.8) & (f[:, 2] <= 1.2)).all()
    assert ((f[:, 3] >= -0.1) & (f[:, 3] <= 0.1)).all()
    assert f[:, 0].unique().numel() == f.shape[0]  # independent draws
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(500, 4))
    assert order.unique(dim=0).shape[0] == 24  # all 4! orders occur


# --------------------------------------------------------------------------------------------- blur


def test_gaussian_kernel_formula():
    k = A.gaussian_kernels(torch.tensor([0.5, 2.0]), 5)
    t = torch.arange(-2.0, 3.0)
    for i, s in enumerate((0.5, 2.0)):
        ref = torch.exp(-(t**2) / (2 * s * s))
        torch.testing.assert_close(k[i], ref / ref.sum())
    assert A.blur_kernel_size(224) == 23 and A.blur_kernel_size(32) == 3 and A.blur_kernel_size(96) == 9


def test_blur_constant_sum_and_reference_conv():
    const = torch.full((2, 3, 9, 9), 0.37)
    torch.testing.assert_close(A.gaussian_blur(const, torch.tensor([0.3, 1.9]), 5), const)

    blob = torch.zeros(1, 1, 15, 15)
    blob[..., 6:9, 5:10] = torch.rand(3, 5, generator=gen(9))
    assert abs(A.gaussian_blur(blob, 1.0, 5).sum() - blob.sum()) < 1e-5  # mass away from borders is kept

    x = torch.rand(3, 3, 10, 12, generator=gen(10))
    sigmas = torch.tensor([0.1, 0.8, 2.0])
    out = A.gaussian_blur(x, sigmas, 5)
    t = torch.arange(-2.0, 3.0)
    for i, s in enumerate(sigmas.tolist()):
        k1 = torch.exp(-(t**2) / (2 * s * s))
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        padded = F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect")
        ref = F.conv2d(padded, k2.expand(3, 1, 5, 5), groups=3)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_random_blur_fires_per_image():
    x = torch.rand(100, 1, 8, 8, generator=gen(11))
    out = A.random_gaussian_blur(x, 0.3, (1.0, 2.0), 3, gen(0))
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 15 < int(changed.sum()) < 45


# --------------------------------------------------------------------------------------------- normalize


def test_normalize_eval_transform():
    x = rand_u8(2, 3, 4, 4)
    out = A.normalize(x, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    ref = (x.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(A.normalize(x[:, :1], (0.5,), (0.5,)), x[:, :1].float() / 127.5 - 1)
    with pytest.raises(ValueError, match="channels"):
        A.normalize(x, (0.4, 0.5), (0.2,))


# --------------------------------------------------------------------------------------------- pipeline


def test_augment_output_dtype_shape_range_and_reproducibility():
    cfg = A.AugmentConfig(size=16, blur_p=0.5, solarize_p=0.3, mean=(0.0,), std=(1.0,))
    aug = A.Augment(cfg)
    x = rand_u8(8, 3, 20, 20)
    out = aug(x, gen(0))
    assert out.dtype == torch.float32 and out.shape == (8, 3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1  # mean 0, std 1: the un-normalized [0, 1] pixels
    assert torch.equal(out, aug(x, gen(0)))
    assert not torch.allclose(out, aug(x, gen(1)))
    normalized = A.Augment(A.AugmentConfig(size=16, blur_p=0.5, solarize_p=0.3))(x, gen(0))
    torch.testing.assert_close(normalized, (out - 0.5) / 0.5)


def test_same_image_repeated_gets_different_views():
    x = rand_u8(1, 3, 32, 32).expand(16, 3, 32, 32)
    out = A.Augment(A.AugmentConfig())(x, gen(0))
    dist = (out.flatten(1)[:, None] - out.flatten(1)[None]).abs().amax(-1)
    assert (dist + torch.eye(16) * 10 > 1e-3).all()  # every pair differs


def test_augment_rejects_bad_input_and_config():
    with pytest.raises(ValueError, match="C in"):
        A.Augment(A.AugmentConfig())(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="probability"):
        A.AugmentConfig(jitter_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        A.AugmentConfig(scale=(0.5, 0.2))
    assert A.AugmentConfig(scale=[0.2, 1.0]).scale == (0.2, 1.0)  # YAML lists become tuples


# --------------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("kind", ["simclr", "byol", "multicrop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_view_makers_for_each_kind_and_channel_count(kind, channels):
    vm = build_view_maker(kind, 16, (0.5,), (0.5,), channels, n_local=3 if kind == "multicrop" else 0)
    assert isinstance(vm, ViewMaker)
    x = rand_u8(4, channels, 20, 20)
    views = vm(x, gen(0))
    n_expected = 5 if kind == "multicrop" else 2
    assert len(views) == n_expected
    for i, v in enumerate(views):
        side = 16 if i < 2 else 7  # DINO local/global ratio 96/224 of 16 -> 7
        assert v.shape == (4, channels, side, side) and v.dtype == torch.float32
        assert v.min() >= -1 - 1e-6 and v.max() <= 1 + 1e-6
    assert not torch.allclose(views[0], views[1])
    assert all(torch.equal(a, b) for a, b in zip(views, vm(x, gen(0))))


def test_recipe_configs_follow_the_papers():
    s = simclr_views(32, (0.5,), (0.5,))
    assert [c.blur_p for c in s.global_cfgs] == [0.0, 0.0]
    assert simclr_views(64, (0.5,), (0.5,)).global_cfgs[0].blur_p == 0.5
    assert simclr_views(32, (0.5,), (0.5,), blur_p=0.5).global_cfgs[1].blur_p == 0.5
    b = byol_views(32, (0.5,), (0.5,))
    assert [(c.blur_p, c.solarize_p) for c in b.global_cfgs] == [(1.0, 0.0), (0.1, 0.2)]
    assert all(
        (c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p, c.gray_p)
        == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
        for c in b.global_cfgs
    )
    m = multicrop_views(32, 14, 6, (0.5,), (0.5,), jitter_p=0.5)
    assert (m.n_global, m.n_local) == (2, 6)
    assert [c.scale for c in m.global_cfgs] == [(0.4, 1.0)] * 2 and m.local_cfg.scale == (0.05, 0.4)
    assert m.local_cfg.size == 14 and all(c.jitter_p == 0.5 for c in [*m.global_cfgs, m.local_cfg])
    gray = simclr_views(28, (0.5,), (0.5,), channels=1).global_cfgs[0]
    assert (gray.saturation, gray.hue, gray.gray_p) == (0.0, 0.0, 0.0)


def test_unknown_names_raise_helpful_errors():
    with pytest.raises(ValueError, match="Did you mean 'jitter_p'.*Valid names"):
        build_view_maker("simclr", 32, (0.5,), (0.5,), 3, jiter_p=0.5)
    with pytest.raises(ValueError, match="Valid kinds: simclr, byol, multicrop"):
        build_view_maker("moco", 32, (0.5,), (0.5,), 3)
    with pytest.raises(ValueError, match="multicrop"):
        build_view_maker("simclr", 32, (0.5,), (0.5,), 3, n_local=2)
    with pytest.raises(ValueError, match="global_scale"):
        multicrop_views(32, 14, 2, (0.5,), (0.5,), scale=(0.2, 1.0))


def test_multiview_matches_single_augments_on_uint8():
    cfgs = [A.AugmentConfig(size=12), A.AugmentConfig(size=12, blur_p=1.0, solarize_p=0.5)]
    x = rand_u8(5, 3, 16, 16)
    views = MultiView(cfgs)(x, gen(3))
    g = gen(3)
    singles = [A.Augment(c)(x, g) for c in cfgs]
    for v, s in zip(views, singles):
        torch.testing.assert_close(v, s, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_views_match_cpu_with_a_cpu_generator():
    vm = build_view_maker("byol", 16, (0.5,), (0.5,), 3)
    x = rand_u8(8, 3, 20, 20)
    cpu = vm(x, gen(0))
    cuda = vm(x.cuda(), gen(0))
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    on_device = vm(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert all(v.device.type == "cuda" for v in on_device)


def test_views_record_each_crops_box_and_flip_and_draw_as_before():
    """Views.geometry: per crop (top, left, height, width, flip) as fractions of the source; the crop it describes is
    the one made (checked on images whose pixels are their own column index), and recording it changes no draw."""
    from selfsup.data.views import MultiView

    H = W = 40
    cols = torch.arange(W, dtype=torch.float32).expand(4, 1, H, W) / (W - 1)  # pixel value = column / (W - 1)
    gcfg = A.AugmentConfig(size=10, scale=(0.2, 0.6), hflip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                           solarize_p=0.0, mean=(0.0,), std=(1.0,))
    lcfg = dataclasses.replace(gcfg, size=6)
    views = MultiView([gcfg, gcfg], lcfg, n_local=2)(cols, torch.Generator().manual_seed(5))
    assert len(views.geometry) == 4 and all(g.shape == (4, 5) for g in views.geometry)
    for crop, g in zip(views.crops, views.geometry):
        top, left, h, w, flip = g.unbind(1)
        assert bool(((0 <= top) & (top + h <= 1 + 1e-6) & (0 <= left) & (left + w <= 1 + 1e-6)).all())
        row = crop[:, 0, 0]  # values run from the box's left edge to its right edge (reversed when flipped)
        first, last = row[:, 0], row[:, -1]
        lo, hi = left * W / (W - 1), (left + w) * W / (W - 1)
        assert torch.equal(flip.bool(), first > last)
        ends = torch.stack([torch.minimum(first, last), torch.maximum(first, last)], 1)
        assert bool(((ends[:, 0] >= lo - 1.5 / W) & (ends[:, 1] <= hi + 0.5 / W)).all())  # inside the box
        assert bool(((ends[:, 1] - ends[:, 0]) > 0.6 * (hi - lo) - 2 / W).all())  # and spanning most of it
    assert any(bool(g[:, 4].any()) for g in views.geometry) and not all(bool(g[:, 4].all()) for g in views.geometry)
    again = [A.Augment(c)(cols, g) for g in [torch.Generator().manual_seed(5)] for c in (gcfg, gcfg, lcfg, lcfg)]
    assert all(torch.equal(a, b) for a, b in zip(again, views.crops))  # the same draws as the plain Augment path


def test_crop_views_is_one_crop_with_nothing_photometric():
    from selfsup.data.views import crop_views

    v = crop_views(16, (0.5,), (0.25,), 1, (0.3, 1.0))
    (cfg,) = v.global_cfgs
    assert v.n_global == 1 and cfg.scale == (0.3, 1.0) and cfg.hflip_p == 0.5
    assert cfg.jitter_p == cfg.gray_p == cfg.blur_p == cfg.solarize_p == 0.0
    assert crop_views(16, (0.5,), (0.25,), 1, flip=False).global_cfgs[0].hflip_p == 0.0
    x = torch.full((4, 1, 16, 16), 128, dtype=torch.uint8)  # a flat image stays flat: no photometric change
    out = v(x, torch.Generator().manual_seed(0)).crops[0]
    torch.testing.assert_close(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="crop scale"):
        crop_views(16, (0.5,), (0.25,), 1, (0.0, 1.0))
