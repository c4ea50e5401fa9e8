"""The pretext tasks that classify a label made from the image (cookbook §2.1): rotation, jigsaw permutation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotation_loss(logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotation prediction (Gidaris et al. 2018, eq. (1)-(2)): with g(x, k) the image x rotated by k * 90 degrees and
    F_k the model's probability of rotation k, each image contributes

        loss(x) = -1/4 * sum_{k=0..3} log F_k(g(x, k))

    i.e. the cross-entropy over the 4 rotated copies of every image, averaged over all 4N copies. ``logits``
    (4N, 4), ``rotations`` (4N,) long in {0, 1, 2, 3} (:func:`selfsup.data.pretext.rotate_all`)."""
    if logits.shape[-1] != 4:
        raise ValueError(f"rotation prediction has 4 classes (0/90/180/270 degrees), got logits {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), rotations)


def jigsaw_loss(logits: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Jigsaw puzzle (Noroozi & Favaro 2016, §3): the shuffled tiles' features, concatenated in their shuffled order,
    classify which of the P permutations of the set was applied:

        loss(x) = -log F_{p(x)}(tiles of x shuffled by permutation p(x))

    averaged over the batch. ``logits`` (B, P), ``permutation`` (B,) long in [0, P)."""
    if permutation.min() < 0 or permutation.max() >= logits.shape[-1]:
        raise ValueError(f"permutation indices must be in [0, {logits.shape[-1]}), got "
                         f"[{int(permutation.min())}, {int(permutation.max())}]")
    return F.cross_entropy(logits.float(), permutation)
