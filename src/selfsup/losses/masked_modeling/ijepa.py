"""I-JEPA's objective (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture"; cookbook §2.5, §3.1): predict, in representation space, the target encoder's features of a few
target blocks from a context block."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("smooth_l1", "l2")


@torch.no_grad()
def ijepa_targets(teacher_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The regression targets: the target encoder's patch tokens, layer-normalized over the feature dimension
    (no affine parameters; the reference's ``F.layer_norm(h, (h.size(-1),))`` in src/train.py), then gathered at
    each target block's patch indices. Computed without gradient (the target encoder is an EMA copy).

    ``teacher_tokens``: (B, N, D) patch tokens of the FULL image in raster order; ``targets``: (T, B, Kt) long patch
    indices, one row of Kt indices per target block and sample. Returns (T, B, Kt, D), float32.
    """
    h = F.layer_norm(teacher_tokens.float(), (teacher_tokens.shape[-1],))
    return torch.stack([torch.gather(h, 1, t.unsqueeze(-1).expand(-1, -1, h.shape[-1])) for t in targets])


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1", beta: float = 1.0) -> torch.Tensor:
    """I-JEPA (Assran et al. 2023, §3 "Loss", eq. (1)): the average distance between the predicted and the target
    patch-level representations of the M target blocks B_1..B_M,

        L = 1/M sum_{i=1..M} 1/|B_i| sum_{j in B_i} d(s_hat_y(j), s_y(j)),

    where the paper writes d as the squared L2 distance and the reference code (facebookresearch/ijepa, src/train.py
    ``loss_fn``) uses ``F.smooth_l1_loss(z, h)`` (Huber with beta=1) on the concatenated blocks, which is the
    default here. Both are averaged over every element (blocks x samples x patches x feature dimensions): all
    blocks of a batch have the same size, so this is also the mean over blocks of each block's mean.

    ``pred``, ``target``: (T, B, Kt, D) (any matching shapes); ``target`` from :func:`ijepa_targets`.
    ``kind``: "smooth_l1" (reference code, default) or "l2" (the paper's squared L2, per-dimension mean).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown I-JEPA loss {kind!r}; choose one of {LOSS_KINDS}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
