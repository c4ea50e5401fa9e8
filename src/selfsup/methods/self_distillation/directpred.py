"""DirectPred (Tian, Chen and Ganguli 2021; cookbook §2.3, the predictor's role): BYOL whose linear predictor is set,
not learned, from the eigen-decomposition of a running correlation matrix of the online projections."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation import byol_loss
from selfsup.losses.self_distillation.directpred import directpred_predictor, update_correlation
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.queues import gather_rows
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher


@dataclass
class DirectPredParams:
    ema_base: float = 0.996       # BYOL §3.2 (DirectPred keeps BYOL's EMA teacher)
    ema_final: float = 1.0
    rho: float = 0.3              # Tian et al. eq. (19); README command: trainer.dyn_lambda=0.3
    eps: float = 0.01             # Tian et al. eq. (18); README command: trainer.dyn_eps=0.01
    freq: int = 1                 # recompute W_p every `freq` optimizer steps; README: trainer.predictor_freq=1


class DirectPred(Method):
    """Buffers: ``corr`` (d, d) float64, the running F; ``corr_updates``, how many optimizer steps fed it;
    ``predictor_weight`` (d, d), W_p. All in ``state_dict()``, none trained: W_p gets no gradient.

    The projections of every micro-batch of a step are staged in ``forward`` and F is updated once, in
    ``on_step_end``, from all of them gathered across processes in rank order (2 processes = 1). W_p starts at the
    identity (the authors start from a random linear layer; either is replaced after the first step).
    """

    def __init__(self, encoder, projector, view_maker, p: DirectPredParams):
        super().__init__()
        if p.freq < 1:
            raise ValueError(f"directpred.freq must be >= 1 (recompute the predictor every freq steps), got {p.freq}")
        if not 0.0 <= p.rho < 1.0:
            raise ValueError(f"directpred.rho must be in [0, 1) (0.3 in the paper), got {p.rho}")
        if p.eps < 0:
            raise ValueError(f"directpred.eps must be >= 0 (0.01 in the authors' command), got {p.eps}")
        self.encoder = encoder
        self.projector = projector
        self.view_maker = view_maker
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_projector = make_teacher(projector)
        self.p = p
        d = projector.out_dim
        self.register_buffer("corr", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("corr_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("predictor_weight", torch.eye(d))
        self._staged: list[torch.Tensor] = []

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """The linear predictor W_p z (no bias, as in the authors' linear predictor: has_bias=false)."""
        return F.linear(z, self.predictor_weight.to(z.dtype))

    def stage(self, z: torch.Tensor) -> None:
        """Remember projections (n, d) for this step's update of F (detached; written in ``on_step_end``)."""
        self._staged.append(z.detach().float())

    def forward(self, views: Views, progress: Progress) -> dict:
        n_global = views.n_global
        feats = forward_views(self.encoder, views.crops)
        z = forward_views(self.projector, feats)
        self.stage(torch.cat(z))  # F is over the online projections of every view (the authors use both views)
        preds = [self.predict(zi) for zi in z]
        with torch.no_grad():
            targets = forward_views(self.teacher_projector, forward_views(self.teacher_encoder, views.global_crops))
        pairs = [(i, j) for i in range(n_global) for j in range(len(views)) if j != i]
        loss = sum(byol_loss(preds[j], targets[i]) for i, j in pairs) * (2 / len(pairs))
        return {"loss": loss, "features": feats[0]}

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        m = cosine_momentum(progress.step, progress.total_steps, self.p.ema_base, self.p.ema_final)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_projector, self.projector, m)
        if self._staged:
            z = gather_rows(torch.cat(self._staged))
            self._staged = []
            prev = self.corr if int(self.corr_updates) > 0 else None
            self.corr.copy_(update_correlation(prev, z, self.p.rho))
            self.corr_updates += 1
            if (progress.step - 1) % self.p.freq == 0:  # the authors: after steps 0, freq, 2 freq, ...
                self.predictor_weight.copy_(directpred_predictor(self.corr, self.p.eps))
        return {"ema_momentum": m}


@register("directpred", DirectPredParams, family="self-distillation", cookbook="§2.3 (the predictor's role)",
          summary="BYOL with a linear predictor set from the eigenvectors of the projections' running correlation")
def build(cfg, data: DataInfo) -> DirectPred:
    encoder = make_backbone(cfg, data)
    return DirectPred(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "byol", data), cfg.params)
