"""Patch masks for masked image (and video) modeling, drawn per sample on the training device (cookbook §2.5, §3.6).

One module makes every mask the MIM methods use, with the batch, on the device of the ``torch.Generator``
passed in, and from that generator only: the global RNG is never read or advanced. The trainer re-seeds the
generator from (seed, rank, step) every step, so a resumed run redraws the same masks and every process draws
different ones. Everything is pure torch, batched over samples (no Python loop over images).

Patches are numbered in raster order, ``index = row * w + col`` on an (h, w) grid, as the ViT's tokens
(``selfsup.nn.vit``). Conventions: a bool ``mask`` is True where a patch is masked (hidden from the encoder,
or replaced by the mask token); ``keep`` holds the visible indices, ascending, for the ViT's token dropping.

- :func:`random_mask`: MAE's per-sample uniform shuffle (He et al. 2022), fixed count -> token dropping.
- :func:`group_mask`: SimMIM's random masking of square groups of patches (Xie et al. 2022) -> mask tokens.
- :func:`block_mask`: BEiT's block-wise masking (Bao et al. 2022, Alg. 1), used by iBOT with a per-image ratio
  (Zhou et al. 2022) -> variable count, fed as mask tokens (``VisionTransformer.forward_features(masks=...)``).
- :func:`multi_block_mask`: I-JEPA's context block and target blocks (Assran et al. 2023).
- :func:`tube_mask`: VideoMAE's tube masking, one spatial mask for all frames (Tong et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Paper defaults, for callers (and configs) that want to name their source.
MAE_MASK_RATIO = 0.75  # He et al. 2022, masking-ratio ablation: 75% of patches removed
BEIT_MASK_RATIO = 0.4  # Bao et al. 2022, §2.3 and Alg. 1: "0.4N"
IBOT_MASK_RATIO = (0.1, 0.5)  # Zhou et al. 2022; release scripts: --pred_ratio 0 0.3 --pred_ratio_var 0 0.2
SIMMIM_MASK_RATIO = 0.6  # Xie et al. 2022, Table 1 / configs: MASK_RATIO 0.6 with 32-pixel mask patches
VIDEOMAE_MASK_RATIO = 0.9  # Tong et al. 2022, tube masking with an "extremely high" 90% ratio


@dataclass(frozen=True)
class PatchMask:
    """A fixed-count mask for token dropping (MAE, VideoMAE).

    ``mask`` (B, N) bool, True = masked. ``keep`` (B, K) long, the visible indices in ascending order (the
    encoder input). ``restore`` (B, N) long, the inverse permutation of the ordering [visible ascending, masked
    ascending]: ``torch.gather(torch.cat([visible, masked], 1), 1, restore[..., None].expand(-1, -1, D))``
    puts decoder tokens back in raster order (MAE's ``ids_restore``).
    """

    mask: torch.Tensor
    keep: torch.Tensor
    restore: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.keep.shape[1]


@dataclass(frozen=True)
class MultiBlockMask:
    """I-JEPA masks. ``context`` (B, Kc) and each of ``targets`` (B, Kt) are long, ascending patch indices;
    ``context_mask`` (B, N) bool is True on the context patches (after trimming to Kc); ``target_masks``
    (B, n_targets, N) bool is True on each target block."""

    context: torch.Tensor
    targets: list[torch.Tensor]
    context_mask: torch.Tensor
    target_masks: torch.Tensor


# --------------------------------------------------------------------------------------------- checks


def _device_of(generator: torch.Generator | None) -> torch.device:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "masks are drawn only from an explicit torch.Generator (never the global RNG): pass "
            f"generator=torch.Generator(device).manual_seed(seed), got {type(generator).__name__}"
        )
    return generator.device


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_ratio(name: str, ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise ValueError(f"{name} is the fraction of patches masked and must be in [0, 1), got {ratio!r}")
    return float(ratio)


def _check_range(name: str, lo_hi: tuple[float, float], upper: float | None = None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in lo_hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {lo_hi!r}") from None
    if not 0.0 < lo <= hi or (upper is not None and hi > upper):
        bound = f" and high <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high{bound}, got {lo_hi!r}")
    return lo, hi


def _check_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (h, w)):
        raise ValueError(
            f"grid is the patch grid (rows, cols) = (img_h // patch, img_w // patch), or one int for a square "
            f"grid, with both >= 1; got {grid!r}"
        )
    return h, w


# --------------------------------------------------------------------------------------------- helpers


def _fixed_count_mask(mask: torch.Tensor, num_keep: int) -> PatchMask:
    """Wrap a (B, N) mask with exactly N - num_keep True per row into a PatchMask (keep, restore)."""
    n = mask.shape[1]
    pos = torch.arange(n, device=mask.device)
    # Unique keys: visible patches first, then masked ones, raster order within each -> deterministic sort.
    order = torch.argsort(mask.long() * n + pos, dim=1)
    restore = torch.empty_like(order).scatter_(1, order, pos.expand_as(order))
    return PatchMask(mask=mask, keep=order[:, :num_keep], restore=restore)


def _rect_masks(top: torch.Tensor, left: torch.Tensor, bh, bw, h: int, w: int) -> torch.Tensor:
    """Bool (..., h*w) masks of rectangles [top, top+bh) x [left, left+bw); all args broadcast together."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    top, left = top.unsqueeze(-1), left.unsqueeze(-1)
    in_rows = (rows >= top) & (rows < top + (bh.unsqueeze(-1) if torch.is_tensor(bh) else bh))
    in_cols = (cols >= left) & (cols < left + (bw.unsqueeze(-1) if torch.is_tensor(bw) else bw))
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(-2)


# --------------------------------------------------------------------------------------------- MAE


def random_mask(
    batch: int, num_patches: int, ratio: float = MAE_MASK_RATIO, generator: torch.Generator | None = None
) -> PatchMask:
    """MAE random masking (He et al. 2022, §3 "Masking"): a uniform random subset of patches per sample.

    Each sample draws noise u ~ U[0, 1)^N and masks the ``M = round(ratio * N)`` patches with the largest
    noise, i.e. a uniform random shuffle keeps its first ``K = N - M`` patches; every sample has the same K, so
    the visible tokens batch without padding. ``ratio`` default 0.75: MAE's choice (its masking-ratio ablation). MAE's code
    takes ``K = int(N * (1 - ratio))``; the two agree whenever ratio * N is an integer (e.g. 147 of 196).

    ``generator`` is required (the argument is optional only so that ``ratio`` can keep its default); the
    mask is made on ``generator.device``. Returns a :class:`PatchMask`; ``keep`` is ascending (MAE keeps the
    shuffled order; the encoder is order-agnostic since positions are embedded before dropping).
    """
    device = _device_of(generator)
    _check_count("batch", batch)
    _check_count("num_patches", num_patches)
    num_masked = round(_check_ratio("ratio", ratio) * num_patches)
    num_keep = num_patches - num_masked
    if num_keep < 1:
        raise ValueError(
            f"ratio={ratio} masks all {num_patches} patches (round(ratio * N) = N): lower the ratio so at "
            "least one patch stays visible"
        )
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    shuffle = torch.argsort(noise, dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, shuffle[:, num_keep:], True)
    return _fixed_count_mask(mask, num_keep)


# --------------------------------------------------------------------------------------------- SimMIM


def group_mask(
    batch: int,
    grid: int | tuple[int, int],
    group: int = 2,
    ratio: float = SIMMIM_MASK_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SimMIM's random masking (Xie et al. 2022, §3.1 and its ``MaskGenerator``): the image is cut into square
    mask units of ``group`` x ``group`` patches, ``ceil(ratio * units)`` units per sample are drawn uniformly
    without replacement, and every patch of a drawn unit is masked (replaced by the mask token; no token dropping).

    SimMIM's defaults are 32-pixel units and ratio 0.6: ``group`` = 32 / patch size, 2 for a ViT-B/16 on 224 px.
    ``grid`` (h, w) need not be a multiple of ``group``: the units then cover ceil(h / group) x ceil(w / group)
    and are cut at the bottom and right edges (the reference asserts divisibility), so a sample's masked count
    varies around ``ratio * h * w`` (on 7 x 7 patches in 2 x 2 units: 16 units, 10 drawn, 21-40 patches masked).
    Returns (B, h * w) bool, True = masked, on ``generator.device``.
    """
    device = _device_of(generator)
    _check_count("batch", batch)
    _check_count("group", group)
    h, w = _check_grid(grid)
    ratio = _check_ratio("ratio", ratio)
    uh, uw = math.ceil(h / group), math.ceil(w / group)
    units = uh * uw
    count = math.ceil(units * ratio)
    if count >= units:
        raise ValueError(f"ratio={ratio} masks all {units} mask units of {group}x{group} patches: lower the ratio "
                         "or the group size so that some of the image stays visible")
    order = torch.argsort(torch.rand(batch, units, generator=generator, device=device), dim=1)
    coarse = torch.zeros(batch, units, dtype=torch.bool, device=device).scatter_(1, order[:, :count], True)
    fine = coarse.view(batch, uh, uw).repeat_interleave(group, 1).repeat_interleave(group, 2)
    return fine[:, :h, :w].reshape(batch, h * w)


# --------------------------------------------------------------------------------------------- BEiT / iBOT


def _per_sample_targets(
    ratio: float | tuple[float, float], batch: int, n: int, generator: torch.Generator
) -> torch.Tensor:
    """(B,) long masked-patch counts round(r * n), r = ratio or r ~ U(lo, hi) per sample."""
    if isinstance(ratio, (int, float)):
        return torch.full((batch,), round(_check_ratio("ratio", ratio) * n), device=generator.device)
    pair = tuple(ratio) if isinstance(ratio, (tuple, list)) else ()
    if len(pair) != 2:
        raise ValueError(f"ratio must be a float or a (low, high) pair of floats, got {ratio!r}")
    lo, hi = (_check_ratio("ratio bounds", v) for v in pair)
    if lo > hi:
        raise ValueError(f"ratio range must be (low, high) with low <= high, got {ratio!r}")
    r = lo + (hi - lo) * torch.rand(batch, generator=generator, device=generator.device)
    return torch.round(r * n).long()


def _block_shape(
    area: torch.Tensor, u_aspect: torch.Tensor, aspect: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block (height, width) of area ~``area`` with log-uniform aspect r = height/width in ``aspect``.

    BEiT's a = round(sqrt(s r)), b = round(sqrt(s / r)) (Alg. 1 and its code): the realised aspect a/b is r
    up to that rounding, and a * b may differ a little from s either way.
    """
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
    return torch.sqrt(area * r).round().long(), torch.sqrt(area / r).round().long()


def block_mask(
    batch: int,
    grid: int | tuple[int, int],
    ratio: float | tuple[float, float],
    generator: torch.Generator,
    min_block: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
) -> torch.Tensor:
    """BEiT block-wise masking (Bao et al. 2022, Alg. 1), batched; returns a (B, h*w) bool mask.

    Per sample, with target count T = round(ratio * N) and M the masked set, repeat: block size
    s ~ U(min_block, T - |M|), log aspect log r ~ U(log aspect), a = round(sqrt(s r)) rows, b = round(sqrt(s / r))
    columns, top-left corner uniform among the positions where the a x b block fits; add the block to M.
    Every sample runs its own sequence; the batch advances one candidate block per sample per round.

    Boundary (what happens near T). Alg. 1 in the paper adds whole blocks "until |M| > 0.4N", so it can
    overshoot by most of a block. BEiT's released code (masking_generator.py, copied by iBOT) instead accepts a
    candidate only if it adds between 1 and T - |M| new patches, and stops after 10 rejected tries in a row, so
    |M| <= T always and may end a little below it; once T - |M| < min_block it draws s between T - |M| and
    min_block. This follows the code (|M| never exceeds T; a sample stops after ``max_tries`` rejections in a
    row), with one extra rule: a candidate with fewer than ``min_block`` patches (possible only near T, or by
    rounding) is accepted only if it overlaps M, i.e. it may grow a region but never start one (the code can
    add an isolated block of a few patches). Hence every connected masked region contains a whole block of at
    least min_block patches, and a sample whose T is below min_block stays unmasked. Measured on 14x14 with
    ratio 0.4 (T = 78): mean |M| / N = 0.394 (BEiT's code, simulated: 0.396); a block may also span the whole
    grid (the code requires a < h and b < w).

    ``ratio``: a float, or a (low, high) pair from which each sample draws its own ratio uniformly (iBOT,
    Zhou et al. 2022: U(0.1, 0.5); its scripts pass --pred_ratio 0 0.3 --pred_ratio_var 0 0.2, so each image is
    masked with probability 0.5 - mask a subset of the batch, or zero some rows, for the unmasked half). Defaults: ``min_block`` 16 (Alg. 1's Rand(16, ·);
    BEiT's ``--min_mask_patches_per_block 16``; iBOT's (min(h, w) // 3)^2 = 16 on 14x14), ``aspect``
    (0.3, 1/0.3) (Alg. 1; log-uniform as in the code), ``max_tries`` 10 (the code's retry count).
    """
    device = _device_of(generator)
    _check_count("batch", batch)
    h, w = _check_grid(grid)
    n = h * w
    _check_count("min_block", min_block)
    _check_count("max_tries", max_tries)
    aspect = _check_range("aspect", aspect)
    if min_block > n:
        raise ValueError(f"min_block={min_block} patches cannot fit in a {h}x{w} grid: lower min_block")
    target = _per_sample_targets(ratio, batch, n, generator)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    fails = torch.zeros(batch, dtype=torch.long, device=device)
    active = count < target
    while bool(active.any()):  # one candidate block per sample per round
        u = torch.rand(batch, 4, generator=generator, device=device)
        remaining = target - count
        area = min_block + u[:, 0] * (remaining - min_block)  # in [remaining, min_block] near the end
        bh, bw = _block_shape(area, u[:, 1], aspect)
        fits = (bh >= 1) & (bw >= 1) & (bh <= h) & (bw <= w)
        # floor(u * positions) is uniform in [0, h - bh] where the block fits; the clamp guards float rounding
        top = torch.minimum((u[:, 2] * (h - bh + 1)).long(), h - bh).clamp(min=0)
        left = torch.minimum((u[:, 3] * (w - bw + 1)).long(), w - bw).clamp(min=0)
        block = _rect_masks(top, left, bh, bw, h, w)
        new = (block & ~mask).sum(dim=1)
        # a block under min_block may only grow an existing region (overlap), never start one
        grows = (bh * bw >= min_block) | (new < bh * bw)
        accept = active & fits & grows & (new > 0) & (new <= remaining)
        mask |= block & accept[:, None]
        count += torch.where(accept, new, 0)
        fails = torch.where(accept, 0, fails + 1)
        active = (count < target) & (fails < max_tries)
    return mask


# --------------------------------------------------------------------------------------------- I-JEPA


def _jepa_block_size(
    h: int, w: int, scale: tuple[float, float], aspect: tuple[float, float], generator: torch.Generator
) -> tuple[int, int]:
    """One (height, width) for the whole batch: area = s * h * w, s ~ U(scale), r ~ U(aspect) (r = height/width);
    sides round(sqrt(area * r)), round(sqrt(area / r)), clamped to [1, grid side]."""
    u_scale, u_aspect = torch.rand(2, generator=generator, device=generator.device).tolist()
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u_scale)
    r = aspect[0] + (aspect[1] - aspect[0]) * u_aspect
    return min(max(round(math.sqrt(area * r)), 1), h), min(max(round(math.sqrt(area / r)), 1), w)


def _place_blocks(batch: int, n_blocks: int, bh: int, bw: int, h: int, w: int, generator: torch.Generator):
    """Uniform top-left corners (B, n_blocks) for a bh x bw block on an h x w grid (every fitting position)."""
    shape, device = (batch, n_blocks), generator.device
    top = torch.randint(0, h - bh + 1, shape, generator=generator, device=device)
    left = torch.randint(0, w - bw + 1, shape, generator=generator, device=device)
    return top, left


def multi_block_mask(
    batch: int,
    grid: int | tuple[int, int],
    generator: torch.Generator,
    n_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 4,
    max_tries: int = 20,
) -> MultiBlockMask:
    """I-JEPA multi-block masking (Assran et al. 2023, §3 "Targets" and "Context").

    Targets: ``n_targets`` (possibly overlapping) rectangles, each of area s * h * w with s ~ U(target_scale)
    and aspect r ~ U(target_aspect). Context: one square (unit aspect) block of scale ~ U(context_scale),
    from which every target patch is removed, so context and targets are disjoint. Defaults are the paper's
    (4 targets, scale (0.15, 0.2), aspect (0.75, 1.5), context (0.85, 1.0)); ``min_keep`` 4 and ``max_tries``
    20 are the reference MaskCollator's defaults (its ImageNet configs set min_keep 10).

    As in the reference implementation (facebookresearch/ijepa, src/masks/multiblock.py), the block *sizes*
    are drawn once per batch and positions per sample, so all targets have the same Kt = a * b patches. A
    context placement is accepted when at least ``min_keep`` patches survive the target removal; after
    ``max_tries`` rejections the constraint is relaxed by ignoring the last target (then the last two, ...),
    as the reference does. That needs targets crowding the grid: with the defaults on 14x14 (targets of at most
    42 patches, a 13x13 or 14x14 context) it did not happen in 64,000 samples, whose fewest context patches
    were 18 (8x8 grid: none either, fewest 6). All contexts are then trimmed to the
    smallest count Kc in the batch by keeping their first Kc patches in raster order, as the reference does.

    Differences from the reference, all small: scale and aspect are drawn independently (the reference uses
    one uniform for both, tying larger targets to taller ones; the paper describes independent ranges); a block
    may touch the last row/column and the context may cover the whole grid (the reference draws corners in
    [0, h - a) and caps sides at h - 1); a context needs >= min_keep patches (the reference: > min_keep).
    """
    device = _device_of(generator)
    _check_count("batch", batch)
    h, w = _check_grid(grid)
    _check_count("n_targets", n_targets)
    _check_count("min_keep", min_keep)
    _check_count("max_tries", max_tries)
    target_scale = _check_range("target_scale", target_scale, upper=1.0)
    target_aspect = _check_range("target_aspect", target_aspect)
    context_scale = _check_range("context_scale", context_scale, upper=1.0)
    side = max(round(math.sqrt(h * w * context_scale[0])), 1)
    if min(side, h) * min(side, w) < min_keep:
        raise ValueError(
            f"the smallest context block ({min(side, h)}x{min(side, w)} patches at scale {context_scale[0]}) "
            f"holds fewer than min_keep={min_keep} patches: raise context_scale, use a finer patch grid, or "
            "lower min_keep"
        )
    n = h * w
    th, tw = _jepa_block_size(h, w, target_scale, target_aspect, generator)
    ch, cw = _jepa_block_size(h, w, context_scale, (1.0, 1.0), generator)

    top, left = _place_blocks(batch, n_targets, th, tw, h, w, generator)
    target_masks = _rect_masks(top, left, th, tw, h, w)  # (B, n_targets, N)
    offsets = (torch.arange(th, device=device)[:, None] * w + torch.arange(tw, device=device)).flatten()
    corner = top * w + left  # (B, n_targets): raster index of each block's top-left patch
    targets = [t.contiguous() for t in (corner.unsqueeze(-1) + offsets).unbind(1)]  # n_targets x (B, th*tw)

    context = torch.zeros(batch, n, dtype=torch.bool, device=device)
    found = torch.zeros(batch, dtype=torch.bool, device=device)
    for ignored in range(n_targets + 1):  # relax: drop the last `ignored` targets from the constraint
        allowed = ~target_masks[:, : n_targets - ignored].any(dim=1)
        for _ in range(max_tries):
            c_top, c_left = _place_blocks(batch, 1, ch, cw, h, w, generator)
            candidate = _rect_masks(c_top[:, 0], c_left[:, 0], ch, cw, h, w) & allowed
            ok = ~found & (candidate.sum(dim=1) >= min_keep)
            context = torch.where(ok[:, None], candidate, context)
            found |= ok
            if bool(found.all()):
                break
        if bool(found.all()):
            break

    num_context = int(context.sum(dim=1).min())
    pos = torch.arange(n, device=device)
    first = torch.sort(torch.where(context, pos, n + pos), dim=1).values[:, :num_context]  # raster-first trim
    context = torch.zeros_like(context).scatter_(1, first, True)
    return MultiBlockMask(context=first, targets=targets, context_mask=context, target_masks=target_masks)


# --------------------------------------------------------------------------------------------- VideoMAE


def tube_mask(
    batch: int,
    frames: int,
    num_patches: int,
    ratio: float = VIDEOMAE_MASK_RATIO,
    generator: torch.Generator | None = None,
) -> PatchMask:
    """VideoMAE tube masking (Tong et al. 2022, §3.3): one random spatial mask per sample, the same in every
    frame (a "tube" through time), so a masked patch cannot be copied from the same place in a neighbouring frame.

    Tokens are ordered (frame, patch): index = t * num_patches + p. Each frame masks exactly
    round(ratio * num_patches) patches (VideoMAE's code: int(ratio * num_patches); both give 176 of 196 at
    0.9). ``ratio`` default 0.9 (VideoMAE's default and best ratio). ``frames`` counts temporal token slices (frames / tubelet size, 16 / 2 = 8 in
    VideoMAE). Returns a :class:`PatchMask` over the frames * num_patches tokens.
    """
    _check_count("frames", frames)
    spatial = random_mask(batch, num_patches, ratio, generator)
    mask = spatial.mask.unsqueeze(1).expand(-1, frames, -1).reshape(batch, frames * num_patches)
    return _fixed_count_mask(mask, frames * spatial.num_keep)
