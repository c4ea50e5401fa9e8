"""Small helpers shared by the canonical-correlation losses (private)."""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision is too coarse for batch statistics (variances, Cholesky, exp(s / 0.05)); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_embeddings(name: str, *zs: torch.Tensor) -> None:
    """Every tensor must be (batch, dim) and all of the same shape."""
    for z in zs:
        if z.ndim != 2:
            raise ValueError(f"{name} expects (batch, dim) embeddings, got shape {tuple(z.shape)}")
    if any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"{name} expects embeddings of the same shape, got {[tuple(z.shape) for z in zs]}")


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The d*(d-1) off-diagonal entries of a square (d, d) matrix, as a flat tensor."""
    keep = ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    return m[keep]
