"""Batched image augmentations with independent random parameters per image (cookbook §3.1).

Joint-embedding SSL learns whatever invariances its augmentations define (cookbook §3.1), so every image in a
batch must get its *own* crop, flip, jitter, ... draw. torchvision's batched tensor transforms share one draw
per call, which silently turns a batch into B copies of one augmentation; kornia draws per image but is slow on
CPU. Everything here runs on a whole uint8 batch on the training device, with no Python loop over images, and
every draw comes from an optional ``torch.Generator`` so a seed reproduces the views exactly.

Pipeline of one view (SimCLR, Chen et al. 2020, appendix A; BYOL, Grill et al. 2020, Table 6):
random resized crop + horizontal flip -> color jitter (p) -> grayscale (p) -> Gaussian blur (p) ->
solarize (p) -> normalize. Pixels are float32 in [0, 1] until the final normalization.

Implementation notes (measured on a 2-core AMD EPYC, batch 512; numbers in benchmarks/bench_views.py):
- crop + resize + flip is two batched matmuls with per-image bilinear interpolation matrices
  (out = Ry @ x @ Rx^T). It equals ``F.interpolate(crop, size, mode="bilinear", align_corners=False)``
  on the crop (torchvision's ``resized_crop`` with ``antialias=False``) and is 1.7x (3x32x32) to 5x
  (1x28x28) faster on CPU than ``F.affine_grid`` + ``F.grid_sample``. The flip reverses the rows of Rx;
  1/255 is folded into Ry.
- color jitter follows torchvision's ``ColorJitter`` formulas, with the order of the four ops drawn
  *per image* (torchvision draws one order per call). Brightness, contrast and saturation are all
  ``clamp(a * x + (1 - a) * target)``, so one fused step applies whichever of them each image has at
  that position; hue (the costly one) runs only on the images whose hue step it is.
- ops fired on a fraction of the batch (grayscale, blur, solarize, hue) run on that subset only.
- on CPU, image-sized bool tensors and ``torch.where`` are 5-50x slower than float arithmetic, and each
  large temporary costs page faults, so the hot paths use float masks and in-place ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as torchvision's rgb_to_grayscale

# Color-jitter op codes; a per-image permutation of these gives the order of application.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factors that leave an image unchanged


# --------------------------------------------------------------------------------------------- config


@dataclass
class AugmentConfig:
    """One view's pipeline. Defaults: SimCLR's CIFAR-10 recipe (Chen et al. 2020, appendix A/B.9).

    Crop scale/ratio are torchvision's RandomResizedCrop defaults; jitter strength s=0.5 gives
    (0.8s, 0.8s, 0.8s, 0.2s) = (0.4, 0.4, 0.4, 0.1) applied with p=0.8; grayscale p=0.2; SimCLR uses no
    blur on 32px images. ``mean``/``std`` are per channel, or one value broadcast to all channels.
    """

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        # YAML gives lists; tuples keep the config hashable and printable the same way.
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if not (isinstance(self.size, int) and self.size >= 1):
            raise ValueError(
                f"AugmentConfig.size must be a positive int (output side in pixels), got {self.size!r}"
            )
        for name in ("scale", "ratio", "blur_sigma"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(
                    f"AugmentConfig.{name} must be (low, high) with 0 < low <= high, got {lo_hi}"
                )
        for name in ("hflip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability and must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0 (factor drawn from [1-v, 1+v])")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(
                f"AugmentConfig.hue must be in [0, 0.5] (shift drawn from [-hue, hue]), got {self.hue}"
            )
        if not self.mean or not self.std or any(s <= 0 for s in self.std):
            raise ValueError(
                f"AugmentConfig.mean/std must be non-empty and std > 0, got {self.mean}, {self.std}"
            )


def config_field_names() -> tuple[str, ...]:
    """Names accepted as overrides by the view makers in ``views.py``."""
    return tuple(f.name for f in fields(AugmentConfig))


# --------------------------------------------------------------------------------------------- helpers


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0,1) drawn on the generator's device (a CPU generator cannot fill CUDA tensors), then moved."""
    rng_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=rng_device).to(device)


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return _rand((n,), generator, device) < p


def _per_image(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor -> (B,) float tensor on x's device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return value.expand(x.shape[0]) if value.ndim == 0 else value


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"expected a batch of images shaped (B, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) or a channel one with x.unsqueeze(1)"
        )
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"expected uint8 images (or float in [0, 1]), got dtype {x.dtype}")


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is assumed to be in [0, 1] already."""
    return x.float().mul_(1 / 255) if x.dtype == torch.uint8 else x.float()


def _apply_to_subset(
    x: torch.Tensor,
    mask: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inplace: bool = False,
) -> torch.Tensor:
    """x with ``fn(x[idx], idx)`` written into the images where mask is True; fn sees only those.

    fn must not modify its input. With ``inplace`` the result may share x's memory (x is then garbage).
    """
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, idx)
    subset = fn(x.index_select(0, idx), idx)
    return x.index_copy_(0, idx, subset) if inplace else x.index_copy(0, idx, subset)


# --------------------------------------------------------------------------------------------- crop


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    tries: int = 10,
) -> torch.Tensor:
    """Per-image RandomResizedCrop boxes as a (n, 4) long tensor of (top, left, height, width).

    Same sampling as torchvision's ``RandomResizedCrop.get_params``, vectorized: ``tries`` candidates per
    image with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first candidate that fits
    wins, and an image with none falls back to the largest central crop whose ratio is within ``ratio``.
    """
    device = torch.device(device)
    u = _rand((n, tries, 2), generator, device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    fb_h, fb_w = _center_crop_fallback(height, width, ratio)
    any_fits = fits.any(dim=1)
    h = torch.where(any_fits, h, torch.full_like(h, fb_h))
    w = torch.where(any_fits, w, torch.full_like(w, fb_w))

    u_pos = _rand((n, 2), generator, device)
    # floor(u * (n_positions)) is a uniform integer in [0, n_positions); the clamp guards float rounding.
    top = torch.minimum((u_pos[:, 0] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((u_pos[:, 1] * (width - w + 1)).floor(), width - w)
    top = torch.where(any_fits, top, (height - h).div(2, rounding_mode="floor"))
    left = torch.where(any_fits, left, (width - w).div(2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).long()


def _center_crop_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback: the whole image, narrowed to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


def _interp_matrix(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, out_size, in_size) bilinear resampling of [start, start+length) to out_size pixels.

    Source coordinate of output pixel u: start + (u + 0.5) * length / out_size - 0.5, clamped to the crop,
    i.e. ``F.interpolate(..., mode="bilinear", align_corners=False)`` applied to the crop, as torchvision's
    ``resized_crop`` (grid_sample-based crops, e.g. kornia's, also read pixels just outside the box).
    ``flip`` (B,) bool reverses the output order of those images (a horizontal flip when used for columns).
    """
    u = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    start, stop = start.float()[:, None], (start + length - 1).float()[:, None]
    src = start + u[None, :] * (length.float()[:, None] / out_size) - 0.5
    src = torch.minimum(torch.maximum(src, start), stop)
    if flip is not None:
        src = torch.where(flip[:, None], src.flip(1), src)
    i0 = src.floor()
    frac = (src - i0).unsqueeze(-1)
    i0 = i0.long().unsqueeze(-1)
    i1 = torch.minimum(i0 + 1, stop.long().unsqueeze(-1))
    m = torch.zeros(start.shape[0], out_size, in_size, device=start.device)
    m.scatter_add_(2, i0, 1 - frac)
    return m.scatter_add_(2, i1, frac)


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int], flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image to its box (top, left, height, width), resize bilinearly to ``size``, optionally flip.

    uint8 input is scaled to [0, 1] on the way (folded into the matrices); float input passes unscaled.
    Returns float32 (B, C, size, size). Exact for an identity box (up to the 1/255 rounding).
    """
    _check_images(x)
    b, c, in_h, in_w = x.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    boxes = boxes.to(x.device)
    ry = _interp_matrix(boxes[:, 0], boxes[:, 2], in_h, out_h)  # (B, out_h, H)
    if x.dtype == torch.uint8:
        ry = ry.mul_(1 / 255)
    rx_t = _interp_matrix(boxes[:, 1], boxes[:, 3], in_w, out_w, flip).transpose(1, 2)  # (B, W, out_w)
    cols = torch.bmm(x.float().reshape(b, c * in_h, in_w), rx_t)  # (B, C*H, out_w)
    if c == 1:
        return torch.bmm(ry, cols).view(b, 1, out_h, out_w)
    return torch.matmul(ry.unsqueeze(1), cols.view(b, c, in_h, out_w))


def random_resized_crop(
    x: torch.Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    hflip_p: float = 0.0,
) -> torch.Tensor:
    """RandomResizedCrop (+ RandomHorizontalFlip with prob ``hflip_p``), one draw per image."""
    _check_images(x)
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator, x.device)
    flip = _bernoulli(x.shape[0], hflip_p, generator, x.device) if hflip_p > 0 else None
    return resized_crop(x, boxes, size, flip)


# --------------------------------------------------------------------------------------------- color


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with ITU-R 601 weights; 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    wr, wg, wb = GRAY_WEIGHTS
    return (x[:, 0:1] * wr).add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Grayscale with the input's channel count (torchvision ``rgb_to_grayscale(num_output_channels=C)``)."""
    return rgb_to_gray(x).expand_as(x).contiguous()


def random_grayscale(
    x: torch.Tensor, p: float, generator: torch.Generator | None = None, inplace: bool = False
) -> torch.Tensor:
    """RandomGrayscale: each image independently becomes gray with probability p (no-op for 1 channel)."""
    if p <= 0 or x.shape[1] == 1:
        return x
    mask = _bernoulli(x.shape[0], p, generator, x.device)
    return _apply_to_subset(x, mask, lambda xs, _: grayscale(xs), inplace)


def _blend_(x: torch.Tensor, alpha: torch.Tensor, gray_w: torch.Tensor, mean_w: torch.Tensor) -> torch.Tensor:
    """In place: x <- clamp(alpha*x + (1-alpha)*(gray_w*gray(x) + mean_w*mean(gray(x)))), per-image (B,) weights.

    brightness: gray_w = mean_w = 0 (blend with black); contrast: mean_w = 1; saturation: gray_w = 1.
    """
    view = (-1, 1, 1, 1)
    alpha = alpha.to(x.dtype).view(view)
    gray_w = ((1 - alpha) * gray_w.view(view)).to(x.dtype)
    mean_w = ((1 - alpha) * mean_w.view(view)).to(x.dtype)
    needs_gray = bool(gray_w.any()) or bool(mean_w.any())
    gray = rgb_to_gray(x) if needs_gray else None
    if x.shape[1] == 1 and gray is not None:
        gray = gray.clone()  # rgb_to_gray returns x itself for 1 channel, and x is about to change
    x.mul_(alpha)
    if gray is not None:
        x.add_(mean_w * gray.mean(dim=(2, 3), keepdim=True)).addcmul_(gray_w, gray)
    return x.clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """torchvision adjust_brightness: clamp(factor * x). ``factor``: float or (B,)."""
    f = _per_image(factor, x)
    return _blend_(x.clone(), f, torch.zeros_like(f), torch.zeros_like(f))


def adjust_contrast(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """torchvision adjust_contrast: clamp(factor * x + (1 - factor) * mean(gray(x))) per image."""
    f = _per_image(factor, x)
    return _blend_(x.clone(), f, torch.zeros_like(f), torch.ones_like(f))


def adjust_saturation(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """torchvision adjust_saturation: clamp(factor * x + (1 - factor) * gray(x)) per pixel (no-op for 1 channel)."""
    if x.shape[1] == 1:
        return x
    f = _per_image(factor, x)
    return _blend_(x.clone(), f, torch.ones_like(f), torch.zeros_like(f))


def _is_max(maxc: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Float 1.0 where c == maxc else 0.0 (c <= maxc). Arithmetic, since bool ops are slow on CPU."""
    return torch.sub(maxc, c).sign_().neg_().add_(1)


def adjust_hue(x: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """torchvision adjust_hue: rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5]); no-op for 1 channel.

    RGB -> HSV -> RGB in closed form. A hue rotation keeps value (max) and chroma (max - min), so with
    h the new hue in sixths of a turn, in [0, 6), each channel is max - chroma * ramp(h) where
    ramp_R = clamp(2 - |h - 3|, 0, 1), ramp_G = clamp(|h - 2| - 1, 0, 1), ramp_B = clamp(|h - 4| - 1, 0, 1)
    (torchvision's six-sector table of _hsv2rgb, written as triangle waves). No bool tensors or torch.where:
    both are unvectorized, hence slow, on CPU.
    """
    if x.shape[1] == 1:
        return x
    shift = _per_image(shift, x).view(-1, 1, 1)
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    chroma.neg_().add_(maxc)
    inv = chroma.clamp_min(1e-12).reciprocal_()
    # hue in sixths of a turn, with torchvision's tie-breaking (red wins, then green):
    # red max: (g - b)/chroma; green max: 2 + (b - r)/chroma; blue max: 4 + (r - g)/chroma
    is_r = _is_max(maxc, r)
    is_g = _is_max(maxc, g).mul_(1 - is_r)
    is_b = (1 - is_r).sub_(is_g)
    hue6 = (g - b).mul_(is_r)
    hue6.addcmul_(torch.sub(b, r), is_g).addcmul_(torch.sub(r, g), is_b).mul_(inv)
    hue6.add_(is_g, alpha=2).add_(is_b, alpha=4).add_(shift * 6)
    hue6.sub_(torch.floor(hue6 * (1 / 6)).mul_(6))  # mod 6 (torch.remainder is slow on CPU)
    centers, signs, offsets = torch.tensor(
        [[3.0, 2.0, 4.0], [-1.0, 1.0, 1.0], [2.0, -1.0, -1.0]], device=x.device
    ).view(3, 1, 3, 1, 1)
    ramp = (hue6.unsqueeze(1) - centers).abs_().mul_(signs).add_(offsets).clamp_(0, 1)
    return ramp.mul_(chroma.neg_().unsqueeze(1)).add_(maxc.unsqueeze(1))


def sample_jitter_params(
    n: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ColorJitter draws: factors (n, 4) and order (n, 4), a permutation of op codes per row.

    Factors follow torchvision: brightness/contrast/saturation ~ U[max(0, 1-v), 1+v], hue shift ~ U[-h, h].
    Images where the jitter (probability p) did not fire get identity factors (1, 1, 1, 0).
    """
    device = torch.device(device)
    u = _rand((n, 4), generator, device)
    lo = torch.tensor(
        [max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue], device=device
    )
    hi = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue], device=device)
    factors = lo + (hi - lo) * u
    order = _rand((n, 4), generator, device).argsort(dim=1)
    if p < 1:
        fired = _bernoulli(n, p, generator, device)
        factors = torch.where(fired[:, None], factors, torch.tensor(_JITTER_IDENTITY, device=device))
    return factors, order


def apply_color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor | None = None, inplace: bool = False
) -> torch.Tensor:
    """Apply per-image jitter ``factors`` (B, 4) = (brightness, contrast, saturation, hue shift) in ``order``.

    ``order`` (B, 4) lists op codes (BRIGHTNESS=0, CONTRAST=1, SATURATION=2, HUE=3) in application order per
    image; the default is torchvision's listing order b, c, s, h. Ops whose factors are the identity for the
    whole batch are skipped, and 1-channel images use only brightness and contrast. With ``inplace`` x's
    memory is reused (x is then garbage; use the return value).
    """
    if not x.is_floating_point():
        raise ValueError(
            f"color jitter works on float images in [0, 1], got {x.dtype}; use to_float01(x) first"
        )
    b = x.shape[0]
    factors = factors.to(device=x.device, dtype=torch.float32)
    order = torch.arange(4, device=x.device).expand(b, 4) if order is None else order.to(x.device)
    identity = torch.tensor(_JITTER_IDENTITY, device=x.device)
    active = [op for op in range(4) if bool((factors[:, op] != identity[op]).any())]
    if x.shape[1] == 1:
        active = [op for op in active if op in (BRIGHTNESS, CONTRAST)]
    if not active:
        return x
    if not inplace:
        x = x.clone()
    keep = torch.isin(order, torch.tensor(active, device=x.device))
    steps = order[keep].view(b, len(active))  # each row is a permutation, so every row keeps len(active)
    for k in range(len(active)):
        op = steps[:, k]
        is_blend = op != HUE
        if bool(is_blend.any()):
            alpha = torch.where(
                is_blend, factors.gather(1, op.clamp(max=SATURATION)[:, None]).squeeze(1), 1.0
            )
            x = _blend_(x, alpha, (op == SATURATION).float(), (op == CONTRAST).float())
        if HUE in active:
            on = (op == HUE) & (factors[:, HUE] != 0)
            x = _apply_to_subset(x, on, lambda xs, idx: adjust_hue(xs, factors[idx, HUE]), inplace=True)
    return x


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """RandomApply(ColorJitter, p) with per-image factors, per-image firing and per-image random op order.

    Defaults: SimCLR strength 0.5 -> (0.4, 0.4, 0.4, 0.1), p=0.8 (Chen et al. 2020, appendix A).
    """
    factors, order = sample_jitter_params(
        x.shape[0], brightness, contrast, saturation, hue, p, generator, x.device
    )
    return apply_color_jitter(x, factors, order, inplace)


# --------------------------------------------------------------------------------------------- blur


def blur_kernel_size(size: int) -> int:
    """SimCLR's kernel side: 10% of the image side, made odd, at least 3 (224 -> 23, 96 -> 9, 32 -> 3)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, kernel_size) normalized 1-D Gaussian kernels, as torchvision's ``_get_gaussian_kernel1d``."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (float or (B,)), reflect padding like torchvision.

    Each 1-D pass is a sum of ``kernel_size`` shifted slices weighted per image, which beats a grouped
    convolution with B*C groups on CPU for the small kernels of small images.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    b, c, h, w = x.shape
    r = kernel_size // 2
    if r >= min(h, w):
        raise ValueError(
            f"kernel_size {kernel_size} too large for {h}x{w} images (reflect padding needs < side)"
        )
    kernels = gaussian_kernels(_per_image(sigma, x), kernel_size).view(b, 1, 1, kernel_size)
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    rows = padded[..., 0:w] * kernels[..., 0:1]
    for j in range(1, kernel_size):
        rows.addcmul_(padded[..., j : j + w], kernels[..., j : j + 1])
    kernels = kernels.view(b, 1, kernel_size, 1)
    out = rows[:, :, 0:h] * kernels[:, :, 0:1]
    for j in range(1, kernel_size):
        out.addcmul_(rows[:, :, j : j + h], kernels[:, :, j : j + 1])
    return out


def random_gaussian_blur(
    x: torch.Tensor,
    p: float,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_size: int | None = None,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Blur each image with probability p, sigma ~ U(sigma) per image (SimCLR appendix A: sigma in [0.1, 2])."""
    if p <= 0:
        return x
    n = x.shape[0]
    kernel_size = kernel_size or blur_kernel_size(x.shape[-1])
    sigmas = sigma[0] + (sigma[1] - sigma[0]) * _rand((n,), generator, x.device)
    mask = _bernoulli(n, p, generator, x.device)
    return _apply_to_subset(x, mask, lambda xs, idx: gaussian_blur(xs, sigmas[idx], kernel_size), inplace)


# --------------------------------------------------------------------------------------------- solarize / normalize


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels >= threshold (x in [0, 1]), as torchvision's ``solarize`` (BYOL: threshold 0.5)."""
    if threshold == 0.5:
        return torch.minimum(x, 1 - x)  # same values, and much faster on CPU than torch.where
    return torch.where(x >= threshold, 1 - x, x)


def random_solarize(
    x: torch.Tensor,
    p: float,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Solarize each image with probability p (BYOL, Grill et al. 2020, Table 6: p=0.2 on the second view)."""
    if p <= 0:
        return x
    mask = _bernoulli(x.shape[0], p, generator, x.device)
    return _apply_to_subset(x, mask, lambda xs, _: solarize(xs, threshold), inplace)


def _mean_std(mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device):
    mean, std = tuple(mean), tuple(std)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ValueError(
                f"{name} has {len(v)} values but images have {channels} channels; give 1 or {channels}"
            )
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s


def normalize_float(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """(x - mean) / std per channel on float images in [0, 1]."""
    m, s = _mean_std(mean, std, x.shape[1], x.device)
    return x.sub_(m).div_(s) if inplace else (x - m) / s


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Eval-time transform, no augmentation: uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std."""
    _check_images(x_uint8)
    return normalize_float(to_float01(x_uint8), mean, std)


# --------------------------------------------------------------------------------------------- pipeline


class Augment:
    """One view's augmentation pipeline (see module docstring), callable on a whole batch.

    ``aug(x, generator)`` with x uint8 (B, C, H, W), C in {1, 3}, on any device -> float32
    (B, C, size, size), normalized. Float input in [0, 1] is accepted too (``MultiView`` converts once).
    Draws happen in a fixed order (crop, flip, jitter, gray, blur, solarize) from ``generator``.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.blur_kernel_size = blur_kernel_size(cfg.size)

    def __repr__(self) -> str:
        return f"Augment({self.cfg})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, generator)[0]

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The view and its geometry: (B, 5) float32 rows (top, left, height, width, flip), the crop box as
        fractions of the source image's height and width and 1.0 where the view was flipped horizontally (what
        dense methods such as VICRegL need to match locations across views)."""
        cfg = self.cfg
        _check_images(x)
        H, W = x.shape[2], x.shape[3]
        boxes = sample_crop_boxes(x.shape[0], H, W, cfg.scale, cfg.ratio, generator, x.device)
        flip = _bernoulli(x.shape[0], cfg.hflip_p, generator, x.device) if cfg.hflip_p > 0 else None
        geometry = torch.cat([boxes.float() / torch.tensor([H, W, H, W], dtype=torch.float32, device=boxes.device),
                              (flip.float() if flip is not None else boxes.new_zeros(len(boxes)).float())[:, None]],
                             dim=1)
        # the crop makes a fresh float tensor, so every later op may work in place on it
        x = resized_crop(x, boxes, cfg.size, flip)
        if cfg.jitter_p > 0 and (cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue):
            x = color_jitter(
                x,
                cfg.brightness,
                cfg.contrast,
                cfg.saturation,
                cfg.hue,
                cfg.jitter_p,
                generator,
                inplace=True,
            )
        x = random_grayscale(x, cfg.gray_p, generator, inplace=True)
        x = random_gaussian_blur(
            x, cfg.blur_p, cfg.blur_sigma, self.blur_kernel_size, generator, inplace=True
        )
        x = random_solarize(x, cfg.solarize_p, 0.5, generator, inplace=True)
        return normalize_float(x, cfg.mean, cfg.std, inplace=True), geometry
