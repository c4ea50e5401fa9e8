"""The pretext tasks that regress pixels the input hid (cookbook §2.1): inpainting."""

from __future__ import annotations

import torch


def inpainting_loss(pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Context-encoder reconstruction (Pathak et al. 2016, eq. (1)): the squared error on the pixels the input hid,

        L_rec = || M ⊙ (x − F((1 − M) ⊙ x)) ||² / (|M| C)

    with M the binary hole mask, averaged over the hole's pixels and the C channels (the paper sums; the mean
    keeps the scale independent of the hole size). ``pred``, ``target`` (B, C, H, W); ``hole`` (B, H, W) bool,
    True where the input was blanked. The paper adds an adversarial term (λ_adv = 0.001) for sharper images; the
    features it studies do not need it, and it is not implemented here."""
    m = hole.unsqueeze(1).float()
    sq = (pred.float() - target.float()).pow(2) * m
    return sq.sum() / (m.sum() * pred.shape[1]).clamp_min(1.0)
