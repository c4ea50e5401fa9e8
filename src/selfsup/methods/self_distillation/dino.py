"""DINO (Caron et al. 2021; cookbook §2.3 eq. (12), §3.4): a student matches the centered, sharpened output
distribution of an EMA teacher across multi-crop views.

Defaults are DINO's `main_dino.py` unless a recipe says otherwise: student temperature 0.1, teacher temperature
0.04 warming up to `teacher_temp` over `warmup_teacher_temp_epochs`, center momentum 0.9, teacher EMA 0.996 -> 1
(cosine), last layer frozen during the first epoch, gradient clipping 3.0 (`optim.clip_grad`), 2 global crops
(teacher) + `views.n_local` local crops (student only).

Under several processes the center's batch mean is all-reduced, so every process keeps the same center (DDP
broadcasts no buffer that would hide a divergence). With gradient accumulation the center is updated once per
optimizer step from the teacher outputs of all micro-batches.

DINOv2 options (Oquab et al. 2023, §4): ``centering: sinkhorn_knopp`` replaces the running center by Sinkhorn-Knopp
equipartition of the teacher's batch (3 iterations, all-reduced), and ``koleo_weight`` (DINOv2: 0.1) adds the KoLeo
regularizer on the student's backbone features of each global crop. DINO's weight-decay schedule (0.04 -> 0.4) is the
trainer's ``optim.weight_decay_end``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup import distributed as du
from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation import dino_loss, dino_teacher_probs, koleo_loss, sinkhorn_knopp_teacher
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.heads import DINOHead
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher, warmup_temperature


@dataclass
class DINOParams:
    out_dim: int = 65536                 # main_dino.py --out_dim
    hidden_dim: int = 2048               # DINOHead defaults: 3-layer MLP 2048 -> bottleneck 256
    bottleneck_dim: int = 256
    head_bn: bool = False                # --use_bn_in_head (False for ViTs; the ResNet-50 run used True)
    norm_last_layer: bool = True         # --norm_last_layer
    student_temp: float = 0.1            # DINOLoss student_temp
    teacher_temp: float = 0.04           # --teacher_temp (0.07 for the best ViT-S/16 run, after warm-up)
    warmup_teacher_temp: float = 0.04    # --warmup_teacher_temp
    warmup_teacher_temp_epochs: int = 0  # --warmup_teacher_temp_epochs (30 in the paper's long runs)
    center_momentum: float = 0.9         # DINOLoss center_momentum
    ema_base: float = 0.996              # --momentum_teacher, cosine schedule to 1
    freeze_last_layer_epochs: int = 1    # --freeze_last_layer
    centering: str = "center"            # center (DINO) | sinkhorn_knopp (DINOv2 train.centering)
    sinkhorn_iterations: int = 3         # DINOv2 sinkhorn_knopp_teacher n_iterations
    koleo_weight: float = 0.0            # DINOv2 dino.koleo_loss_weight: 0.1 (0 = off, DINO)


class DINO(Method):
    def __init__(self, encoder: nn.Module, head: DINOHead, view_maker, p: DINOParams):
        super().__init__()
        self.encoder, self.head, self.view_maker, self.p = encoder, head, view_maker, p
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(head)
        self.register_buffer("center", torch.zeros(p.out_dim))
        # the teacher outputs of the current optimizer step (all micro-batches), for the center update
        self.register_buffer("_batch_sum", torch.zeros(p.out_dim), persistent=False)
        self.register_buffer("_batch_count", torch.zeros(()), persistent=False)

    def teacher_temperature(self, epoch: int) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over the first epochs, then constant."""
        p = self.p
        return warmup_temperature(epoch, p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_epochs)

    def forward(self, views: Views, progress: Progress) -> dict:
        feats = forward_views(self.encoder, views.crops)
        student = forward_views(self.head, feats)
        with torch.no_grad():
            teacher = forward_views(self.teacher_head, forward_views(self.teacher_encoder, views.global_crops))
            if self.p.centering == "center":
                t_all = torch.cat(teacher).float()
                self._batch_sum += t_all.sum(dim=0)
                self._batch_count += t_all.shape[0]
        temp = self.teacher_temperature(progress.epoch)
        if self.p.centering == "sinkhorn_knopp":  # equipartition over all global crops of the batch together
            probs = list(sinkhorn_knopp_teacher(torch.cat(teacher), temp, self.p.sinkhorn_iterations).chunk(len(teacher)))
        else:
            probs = [dino_teacher_probs(t, self.center, temp) for t in teacher]
        loss = dino_loss(student, probs, self.p.student_temp)
        logs = {"teacher_temp": temp}
        if self.p.koleo_weight > 0:
            koleo = sum(koleo_loss(f) for f in feats[: views.n_global])
            loss = loss + self.p.koleo_weight * koleo
            logs["koleo"] = koleo.detach()
        return {"loss": loss, "features": feats[0], **logs}

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.p.freeze_last_layer_epochs:  # DINO's cancel_gradients_last_layer
            for prm in (self.head.prototypes, self.head.gain):
                if prm is not None:
                    prm.grad = None

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        if self.p.centering == "center":
            total = du.all_reduce_sum_(torch.cat([self._batch_sum, self._batch_count.view(1)]))  # same everywhere
            batch_center = total[:-1] / total[-1]
            self.center.mul_(self.p.center_momentum).add_(batch_center, alpha=1 - self.p.center_momentum)
            self._batch_sum.zero_()
            self._batch_count.zero_()
        # main_dino.py: momentum_schedule[it] for the iteration `it` just done (0-based)
        m = cosine_momentum(progress.step - 1, progress.total_steps, self.p.ema_base, 1.0)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        return {"ema_momentum": m}

    @property
    def guillotine_head(self) -> nn.Sequential:
        return self.head.mlp  # the bottleneck; the prototype layer is a classifier over out_dim "clusters"


@register("dino", DINOParams, family="self-distillation", cookbook="§2.3, eq. (12); §3.4; §3.1.1 multi-crop",
          summary="student matches the centered, sharpened softmax of an EMA teacher across multi-crop views")
def build(cfg, data: DataInfo) -> DINO:
    p = cfg.params
    if p.centering not in ("center", "sinkhorn_knopp"):
        raise ConfigError(f"dino.centering={p.centering!r} is not one of center, sinkhorn_knopp")
    encoder = make_backbone(cfg, data)
    head = DINOHead(encoder.num_features, p.out_dim, p.hidden_dim, p.bottleneck_dim, use_bn=p.head_bn,
                    norm_last_layer=p.norm_last_layer)
    return DINO(encoder, head, make_views(cfg, "multicrop", data), p)
