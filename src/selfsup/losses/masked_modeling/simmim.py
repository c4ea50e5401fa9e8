"""SimMIM's reconstruction loss (Xie et al. 2022; cookbook §2.5)."""

from __future__ import annotations

import torch


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM (Xie et al. 2022, §3.3 "Prediction target", eq. (1)): the l1 distance between the predicted and the
    true pixel values of the MASKED patches only, averaged over their pixels and channels:

        L = 1 / (|M| D) * sum_{i in M} || pred_i - t_i ||_1

    with M the masked patches and D = patch * patch * channels values per patch (the reference's
    ``(l1 * mask).sum() / mask.sum() / in_chans`` over a pixel-level mask). The target is the input image as the
    encoder gets it (normalized by the dataset's mean and std), with no per-patch normalization (unlike MAE's
    ``norm_pix``). ``pred``, ``target``: (B, N, D) patches; ``mask``: (B, N) bool, True = masked. Visible
    patches never enter the loss; with nothing masked the loss is 0.
    """
    per_patch = (pred.float() - target.float()).abs().mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
