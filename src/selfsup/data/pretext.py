"""Labels made from the data itself for the pretext tasks of cookbook §2.1 (what a method trains on, and what the
rotation probe of :mod:`selfsup.evaluate.rotation` measures)."""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_all(images: Tensor) -> tuple[Tensor, Tensor]:
    """``(4N, C, H, W)`` images rotated by 0/90/180/270 degrees (counter-clockwise) and their rotation index
    (Gidaris et al. 2018): the N images rotated by 0 first, then by 90, 180 and 270 degrees."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"rotation prediction needs square images (N, C, H, H) so every rotation has the same shape, got "
            f"{tuple(images.shape)}; center-crop them first."
        )
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return rotated, torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
