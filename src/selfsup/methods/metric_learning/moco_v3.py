"""MoCo v3 (Chen, Xie and He 2021; cookbook §2.2 eq. (6), §3.4.1, §3.5.4): a symmetric InfoNCE between the
predictions of one view and the momentum encoder's keys of the other, with the other keys of the whole batch (all
processes) as negatives: no queue.

With a ViT, the patch projection stays at its random initialization (MoCo v3 §4.2, "random patch projection"; cookbook
§3.5.4): it removes the training instability the paper traced to that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.data.types import DataInfo
from selfsup.losses.metric_learning import info_nce
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.heads import projector as mlp
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher
from selfsup.nn.vit import VisionTransformer


@dataclass
class MoCoV3Params:
    temperature: float = 0.2          # moco-v3 CONFIG.md: --moco-t=.2 for ViTs (its ResNet-50 commands use 1.0)
    momentum: float = 0.99            # MoCo v3 §4: m = 0.99, increased to 1 with a cosine schedule
    momentum_final: float = 1.0
    predictor_hidden: int = 4096      # MoCo v3 §4: 2-layer predictor, 4096 hidden, 256 out
    freeze_patch_embed: bool = True   # MoCo v3 §4.2: random patch projection (ViT only)


class MoCoV3(Method):
    def __init__(self, encoder, projector, predictor, view_maker, p: MoCoV3Params):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.view_maker = encoder, projector, predictor, view_maker
        self.key_encoder, self.key_projector = make_teacher(encoder), make_teacher(projector)
        self.p = p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"MoCo v3 uses two views, got {len(views)}; set views.n_local=0")
        feats = forward_views(self.encoder, views.crops)
        q1, q2 = forward_views(self.predictor, forward_views(self.projector, feats))
        with torch.no_grad():
            k1, k2 = (F.normalize(k, dim=1) for k in
                      forward_views(self.key_projector, forward_views(self.key_encoder, views.crops)))
        t = self.p.temperature
        # MoCo v3 Alg. 1: ctr(q1, k2) + ctr(q2, k1), each CrossEntropy * 2 tau
        loss = info_nce(q1, k2, temperature=t, scale_by_2tau=True) + info_nce(q2, k1, temperature=t, scale_by_2tau=True)
        return {"loss": loss, "features": feats[0], "embedding": q1}

    def on_step_end(self, progress: Progress) -> dict:
        m = cosine_momentum(progress.step, progress.total_steps, self.p.momentum, self.p.momentum_final)
        ema_update(self.key_encoder, self.encoder, m)
        ema_update(self.key_projector, self.projector, m)
        return {"ema_momentum": m}


@register("moco_v3", MoCoV3Params, family="deep metric learning",
          cookbook="§2.2 eq. (6); §3.4.1 momentum encoder; §3.5.4 random patch projection",
          summary="symmetric InfoNCE: predictor vs momentum keys, in-batch negatives (all processes), no queue")
def build(cfg, data: DataInfo) -> MoCoV3:
    p = cfg.params
    if p.temperature <= 0 or not 0.0 <= p.momentum <= p.momentum_final <= 1.0:
        raise ValueError(f"moco_v3 needs temperature > 0 and 0 <= momentum <= momentum_final <= 1, got "
                         f"{p.temperature}, {p.momentum}, {p.momentum_final}")
    if cfg.views.n_local:
        raise ValueError("MoCo v3 uses two crops: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    if isinstance(encoder, VisionTransformer) and p.freeze_patch_embed:
        encoder.patch_embed.requires_grad_(False)
    proj = make_projector(cfg, encoder.num_features)
    out = cfg.model.projector_out
    predictor = mlp(out, p.predictor_hidden, out, num_layers=2)
    return MoCoV3(encoder, proj, predictor, make_views(cfg, "byol", data), p)
