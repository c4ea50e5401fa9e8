"""The moving-average teacher of self-distillation methods (cookbook §2.3, §3.4.1)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's EMA schedule (Grill et al. 2020, §3.2): tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2.

    Goes from `base` at step 0 to `final` at step K. base=0.996 is BYOL's ImageNet value.
    """
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def warmup_temperature(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """A teacher temperature warmed up linearly from ``start`` to ``end`` over the first ``warmup_epochs`` epochs,
    then constant: DINO's and iBOT's ``np.linspace(start, end, warmup_epochs)[epoch]`` (0-based ``epoch``)."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / max(warmup_epochs - 1, 1)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of `student`: same weights at step 0, never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s for every parameter.

    Buffers (batch-norm running statistics) are left alone: the teacher runs in train mode, normalizes with its own
    batch statistics and keeps its own running averages, as BYOL's target network does.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists; build the teacher with make_teacher()")
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
