"""BYOL (Grill et al. 2020; cookbook §2.3 eq. (9)-(10), §3.4.1): an online network predicts an EMA teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation import byol_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.heads import projector as mlp
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher


@dataclass
class BYOLParams:
    ema_base: float = 0.996       # BYOL §3.2: tau_base; tau follows a cosine schedule to 1
    ema_final: float = 1.0
    predictor_hidden: int = 4096  # BYOL §3.3: predictor MLP 256 -> 4096 -> 256


class BYOL(Method):
    def __init__(self, encoder, projector, predictor, view_maker, ema_base: float, ema_final: float):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.view_maker = view_maker
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_projector = make_teacher(projector)
        self.ema_base, self.ema_final = ema_base, ema_final

    def forward(self, views: Views, progress: Progress) -> dict:
        n_global = views.n_global
        feats = forward_views(self.encoder, views.crops)
        preds = forward_views(self.predictor, forward_views(self.projector, feats))
        with torch.no_grad():
            targets = forward_views(self.teacher_projector, forward_views(self.teacher_encoder, views.global_crops))
        # Each teacher view is regressed by every other student view; with two views this is the paper's symmetric
        # sum L(p1, z'2) + L(p2, z'1) (Grill et al. eq. 2), not its average. More views are scaled to the same size.
        pairs = [(i, j) for i in range(n_global) for j in range(len(views)) if j != i]
        loss = sum(byol_loss(preds[j], targets[i]) for i, j in pairs) * (2 / len(pairs))
        return {"loss": loss, "features": feats[0], "embedding": preds[0]}

    def on_step_end(self, progress: Progress) -> dict:
        m = cosine_momentum(progress.step, progress.total_steps, self.ema_base, self.ema_final)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_projector, self.projector, m)
        return {"ema_momentum": m}


@register("byol", BYOLParams, family="self-distillation", cookbook="§2.3, eq. (9)-(10); §3.4.1",
          summary="online network + predictor regresses an EMA teacher (cosine 0.996 -> 1)")
def build(cfg, data: DataInfo) -> BYOL:
    encoder = make_backbone(cfg, data)
    proj = make_projector(cfg, encoder.num_features)
    out = cfg.model.projector_out
    predictor = mlp(out, cfg.params.predictor_hidden, out, num_layers=2)
    return BYOL(encoder, proj, predictor, make_views(cfg, "byol", data), cfg.params.ema_base,
                cfg.params.ema_final)
