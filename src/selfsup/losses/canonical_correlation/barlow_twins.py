"""Barlow Twins (Zbontar et al. 2021; cookbook §2.4): the cross-correlation of the two views pushed to the identity.

In the cookbook's terms (eq. (14)), each dimension of one view is maximally correlated with the same dimension of the
other, and decorrelated from every other dimension (the identity-covariance constraint of eq. (13), relaxed).
"""

from __future__ import annotations

import torch

from selfsup.distributed import gather_with_grad
from selfsup.losses.canonical_correlation._common import at_least_float32, check_embeddings, off_diagonal


def _standardize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: biased variance, eps inside the square root."""
    z = z - z.mean(dim=0)
    return z / torch.sqrt(z.pow(2).mean(dim=0) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, §2):

        L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,   C = z1n^T z2n / N,

    where z1n, z2n are the embeddings standardized along the batch (mean 0, biased variance 1, no affine) and N is
    the WHOLE batch size. Shape: z1, z2 (B, d).

    ``lambd=5e-3``: the paper's trade-off (its implementation details; the authors' ``main.py`` default is 0.0051).
    ``eps=1e-5``: ``nn.BatchNorm1d``'s default, which the reference uses for the standardization.

    Distributed: the reference standardizes with SyncBatchNorm and all-reduces C divided by the total batch size;
    here both views are gathered with gradient (cookbook Algorithm 1) and every process computes the whole-batch
    loss, so 2 processes with half batches give the loss and gradients of 1 process with the whole batch. (The
    reference's plain all_reduce carries no gradient across processes, so under DDP its gradients are the whole-batch
    ones divided by the number of processes: facebookresearch/barlowtwins issue #8, lightly issue #1977.)
    """
    check_embeddings("barlow_twins_loss", z1, z2)
    z1 = gather_with_grad(at_least_float32(z1))
    z2 = gather_with_grad(at_least_float32(z2))
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"barlow_twins_loss needs at least 2 samples in the whole batch to standardize, got {n}")
    c = _standardize(z1, eps).T @ _standardize(z2, eps) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
