"""iBOT (Zhou et al. 2022; cookbook §2.3 and §2.5): DINO's [CLS] self-distillation plus masked-patch
self-distillation, where the teacher's patch head is the "online tokenizer" of masked image modeling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.self_distillation.dino import dino_loss


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, mask: torch.Tensor,
                    student_temperature: float = 0.1) -> torch.Tensor:
    """The masked-image-modeling term of iBOT for one global crop:

        L_MIM = E_b[ sum_{i in M_b} -P_t[b, i] . log softmax(f_s(x_masked)[b, i] / tau_s) / max(|M_b|, 1) ]

    ``student_patch_logits`` (B, N, K): the student's patch outputs for the *masked* crop (masked patches replaced
    by the mask token); ``teacher_patch_probs`` (B, N, K): the teacher's centered, sharpened softmax of the same
    crop *unmasked* (its patch head tokenizes every patch); ``mask`` (B, N) bool, True where the student's patch was
    masked. Only masked patches count; a sample with no masked patch contributes 0 and still counts in the batch
    mean, as in iBOT's ``iBOTLoss`` (main_ibot.py: ``sum(loss * mask) / mask.sum().clamp(min=1)``, then ``.mean()``).
    tau_s = 0.1 (``student_temp``).
    """
    if mask.shape != student_patch_logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {tuple(student_patch_logits.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    logits = student_patch_logits.to(torch.promote_types(student_patch_logits.dtype, torch.float32))  # >= float32
    per_patch = (-teacher_patch_probs * F.log_softmax(logits / student_temperature, dim=-1)).sum(dim=-1)
    m = mask.to(per_patch.dtype)
    return ((per_patch * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()


def ibot_loss(student_cls: list[torch.Tensor], teacher_cls_probs: list[torch.Tensor],
              student_patch: list[torch.Tensor], teacher_patch_probs: list[torch.Tensor], masks: list[torch.Tensor],
              student_temperature: float = 0.1, lambda_cls: float = 1.0,
              lambda_patch: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """iBOT's objective (main_ibot.py ``iBOTLoss``): L = lambda_1 L_[CLS] + lambda_2 L_MIM, returned with its terms.

    L_[CLS] is DINO's cookbook eq. (12) over every pair (teacher global crop q, student crop v != q), global and
    local crops (:func:`selfsup.losses.self_distillation.dino_loss`); L_MIM is :func:`ibot_patch_loss` averaged over
    the global crops, each student crop against the teacher's output for the same crop (v == q). ``student_cls``:
    one (B, K) tensor per crop, global crops first; ``student_patch``, ``teacher_patch_probs``, ``masks``: one per
    global crop. Defaults lambda_1 = lambda_2 = 1 (``--lambda1``, ``--lambda2``).
    """
    if not len(student_patch) == len(teacher_patch_probs) == len(masks) == len(teacher_cls_probs):
        raise ValueError(f"one student patch output, teacher patch target and mask per global crop: got "
                         f"{len(student_patch)}, {len(teacher_patch_probs)}, {len(masks)} for "
                         f"{len(teacher_cls_probs)} global crops")
    cls_term = dino_loss(student_cls, teacher_cls_probs, student_temperature)
    patch_term = sum(ibot_patch_loss(s, t, m, student_temperature)
                     for s, t, m in zip(student_patch, teacher_patch_probs, masks)) / len(masks)
    return lambda_cls * cls_term + lambda_patch * patch_term, cls_term, patch_term
