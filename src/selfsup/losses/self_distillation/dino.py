"""DINO (cookbook §2.3, eq. (12)): cross-entropy between the student's softmax and the centered, sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
