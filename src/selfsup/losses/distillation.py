"""Self-distillation family (cookbook §2.3): BYOL's regression of the teacher's embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def renorm(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cookbook eq. (10): v / max(||v||_2, eps), eps = 1e-12 as in the cookbook and BYOL's code."""
    return F.normalize(v, dim=-1, eps=eps)


def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """BYOL, cookbook eq. (9): E || renorm(p) - renorm(sg(z_t)) ||_2^2  (= 2 - 2 cos(p, z_t)), mean over the batch.

    `p` is the online network's prediction of one view, `z_target` the teacher's projection of the other view; the
    target is detached here so callers cannot forget the stop-gradient. BYOL symmetrizes by adding the loss with the
    views swapped (Grill et al. 2020, eq. 2): callers *sum* the two terms, they do not average them.
    """
    return (renorm(p.float()) - renorm(z_target.detach().float())).pow(2).sum(dim=-1).mean()


def dino_teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher side of cookbook eq. (12): sg(softmax((f_t(x) - center) / tau_t)), in float32.

    Centering (subtracting a running mean of the teacher's outputs) and sharpening (a low tau_t, DINO's 0.04 to
    0.07) pull in opposite directions and together avoid collapse (Caron et al. 2021, §3.1 and Fig. 7).
    """
    return F.softmax((teacher_logits.detach().float() - center) / temperature, dim=-1)


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              student_temperature: float = 0.1) -> torch.Tensor:
    """DINO, cookbook eq. (12): mean over pairs (teacher view i, student view j != i) of
    CrossEnt(P_t,i, softmax(f_s(x_j) / tau_s)) = E_b[ -sum_k P_t,i[b, k] log softmax(f_s(x_j)[b] / tau_s)_k ].

    `student_logits`: one (B, K) tensor per crop, global crops first (the teacher's crops are the first
    `len(teacher_probs)`); `teacher_probs`: `dino_teacher_probs` of each global crop. tau_s = 0.1 as in DINO's code
    (`--student_temp`). Pairs with j == i (the same crop) are skipped, as in DINO's `DINOLoss`.
    """
    terms = [(-q * F.log_softmax(s.float() / student_temperature, dim=-1)).sum(dim=-1).mean()
             for i, q in enumerate(teacher_probs) for j, s in enumerate(student_logits) if j != i]
    if not terms:
        raise ValueError("dino_loss needs at least two crops (a teacher crop and another student crop)")
    return sum(terms) / len(terms)
