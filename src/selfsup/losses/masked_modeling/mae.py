"""Masked modeling family (cookbook §2.5, §3.6): reconstruction losses on masked patches only."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C): patches in raster order (the ViT's token order), pixels (p, q, c)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify` for a (h, w) ``grid`` of patches."""
    B = patches.shape[0]
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * patch, w * patch)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE (He et al. 2022, §3 "Reconstruction target"): mean squared error per patch, averaged over the MASKED
    patches only: sum_i m_i ||pred_i - t_i||^2 / D / sum_i m_i.

    `pred`, `target`: (B, N, D) patches; `mask`: (B, N) bool, True = masked. `norm_pix`: each target patch is
    normalized by its own mean and variance (the paper's "w/ norm" target, which improves representations; its
    `--norm_pix_loss`, eps 1e-6). Visible patches never enter the loss.
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
