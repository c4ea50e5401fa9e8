"""Frozen-feature extraction for offline evaluation (cookbook §3.7.1).

Offline protocols (kNN, linear probe) run on features of *un-augmented*, normalized images computed once by the
frozen encoder in eval mode; "In the offline setting no data-augmentation is employed" (cookbook Fig. 13).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def _channel_stats(values: Sequence[float] | Tensor, channels: int, name: str) -> Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32).flatten()
    if stats.numel() == 1:
        stats = stats.expand(channels)
    if stats.numel() != channels:
        raise ValueError(
            f"{name} has {stats.numel()} values but the images have {channels} channels; "
            f"pass one value per channel (or a single value for all channels)."
        )
    return stats.view(1, channels, 1, 1)


def _as_uint8_batch(images, start: int, stop: int) -> Tensor:
    batch = images[start:stop]
    if isinstance(batch, np.ndarray):  # np.memmap included: only this slice is read from disk
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    return batch


def _check_images(images) -> None:
    shape = tuple(images.shape)
    dtype = images.dtype
    if len(shape) != 4:
        raise ValueError(
            f"extract_features expects images shaped (N, C, H, W), got shape {shape}; "
            f"for grayscale (N, H, W) arrays add the channel axis first (images[:, None])."
        )
    if dtype not in (torch.uint8, np.uint8):
        raise ValueError(
            f"extract_features expects uint8 images in [0, 255], got dtype {dtype}; it normalizes them itself "
            f"as (x / 255 - mean) / std, so pass the raw uint8 data, not already-normalized floats."
        )


@torch.no_grad()
def extract_features(
    encoder: Callable[[Tensor], Tensor],
    images_uint8: Tensor | np.ndarray,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Features ``(N, D)`` float32 on CPU of un-augmented uint8 images ``(N, C, H, W)``.

    Each batch is moved to ``device`` on its own (``images_uint8`` may be a NumPy memmap), normalized per channel
    as ``(x / 255 - mean) / std`` and fed to ``encoder`` in eval mode under ``torch.inference_mode``; the
    encoder's previous training flag is restored afterwards. ``dtype`` (e.g. ``torch.bfloat16``) turns on
    autocast for the forward pass; the returned features are always float32.
    """
    _check_images(images_uint8)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n, channels = int(images_uint8.shape[0]), int(images_uint8.shape[1])
    device = torch.device(device)
    mean_t = _channel_stats(mean, channels, "mean").to(device)
    std_t = _channel_stats(std, channels, "std").to(device)
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive in every channel, got {std_t.flatten().tolist()}.")

    was_training = encoder.training if isinstance(encoder, nn.Module) else None
    if isinstance(encoder, nn.Module):
        encoder.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    out: Tensor | None = None
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            with torch.inference_mode(), autocast:
                x = _as_uint8_batch(images_uint8, start, stop).to(device)
                x = (x.float() / 255.0 - mean_t) / std_t
                feats = encoder(x)
            if feats.ndim != 2 or feats.shape[0] != stop - start:
                raise ValueError(
                    f"the encoder must return (batch, features), got shape {tuple(feats.shape)} for a batch of "
                    f"{stop - start}; pool or flatten its output (e.g. global average pooling, ViT [CLS] token)."
                )
            if out is None:
                out = torch.empty(n, feats.shape[1], dtype=torch.float32)
            out[start:stop].copy_(feats)  # a normal tensor, so the features can be used with autograd later
    finally:
        if was_training is not None:
            encoder.train(was_training)
    if out is None:
        raise ValueError("extract_features got an empty image array (N = 0); there is nothing to encode.")
    return out


@torch.no_grad()
def extract_view_features(
    encoder: Callable[[Tensor], Tensor],
    images_uint8: Tensor | np.ndarray,
    view_maker: Callable[[Tensor, torch.Generator], list[Tensor]],
    *,
    n_views: int,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Features ``(N, n_views, D)`` float32 of ``n_views`` augmented views of each uint8 image (for LiDAR).

    ``view_maker(batch_uint8, generator)`` returns a list of normalized views (a
    :class:`selfsup.data.views.MultiView`); it is called until ``n_views`` views exist, each batch with its own
    seeded generator, so the result depends on ``seed``, ``batch_size`` and the image order only.
    """
    _check_images(images_uint8)
    if n_views < 2:
        raise ValueError(f"n_views must be >= 2 (views of the same image are compared), got {n_views}.")
    device = torch.device(device)
    was_training = encoder.training if isinstance(encoder, nn.Module) else None
    if isinstance(encoder, nn.Module):
        encoder.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    chunks = []
    try:
        for start in range(0, int(images_uint8.shape[0]), batch_size):
            x = _as_uint8_batch(images_uint8, start, start + batch_size).to(device)
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
            views: list[Tensor] = []
            while len(views) < n_views:
                views += view_maker(x, gen)
            with torch.inference_mode(), autocast:
                feats = [encoder(v).float().cpu() for v in views[:n_views]]
            chunks.append(torch.stack(feats, dim=1))
    finally:
        if was_training is not None:
            encoder.train(was_training)
    return torch.cat(chunks).clone()
