"""DINO (cookbook §2.3, eq. (12)): cross-entropy between the student's softmax and the centered, sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.canonical_correlation.swav import sinkhorn_knopp


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


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's replacement of centering (Oquab et al. 2023, §4): SwAV's Sinkhorn-Knopp
    (`selfsup.losses.canonical_correlation.sinkhorn_knopp`, the single implementation) with the teacher temperature
    tau_t in place of SwAV's epsilon, in float32; DINOv2 uses 3 iterations.

    Returns (B_local, K) targets whose rows sum to 1 and in which every prototype gets mass close to B/K over the
    whole batch (all processes; exactly B/K once converged): sharp, and equipartitioned instead of centered.
    """
    return sinkhorn_knopp(teacher_logits.float(), epsilon=temperature, iterations=iterations)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regularizer of DINOv2 (Sablayrolles et al. 2019; Oquab et al. 2023, §4):
    L = -1/n sum_i log(d_i), d_i = min_{j != i} || x_i/||x_i|| - x_j/||x_j|| ||, on one process's batch.

    It spreads the features uniformly over the sphere (a differential entropy estimator). DINOv2 applies it with
    weight 0.1 to the student's backbone features of each global crop, in float32.
    """
    x = F.normalize(x.float(), dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)  # never one's own neighbour (cosines are >= -1)
    nearest = dots.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()
