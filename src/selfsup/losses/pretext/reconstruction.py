"""The pretext tasks that predict pixels the input hid (cookbook §2.1): inpainting, colorization."""

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


def colorization_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Colorful image colorization (Zhang et al. 2016, eq. (2)): a multinomial cross-entropy per pixel between the
    predicted distribution over the Q quantized ab colours and the soft-encoded true colour Z,

        L_cl = -1/(HW) sum_{h,w} v(Z_{h,w}) sum_q Z_{h,w,q} log softmax(Ẑ_{h,w})_q

    averaged over the batch. ``logits``, ``target`` (B, Q, H, W); ``weights`` (Q,) the class-rebalancing weights v
    (the paper's λ = 0.5 mix of the empirical colour prior and uniform), None for v = 1: rebalancing needs the
    colour prior of the training set, which this function does not estimate."""
    logp = torch.log_softmax(logits.float(), dim=1)
    per_pixel = -(target * logp).sum(1)
    if weights is not None:
        per_pixel = per_pixel * weights.to(logp)[target.argmax(1)]
    return per_pixel.mean()
