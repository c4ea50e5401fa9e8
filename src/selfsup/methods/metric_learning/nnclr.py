"""NNCLR (Dwibedi et al. 2021; cookbook §2.2, §3.1.2): the positive of a view is the nearest neighbour of its
projection in a support set of earlier projections, contrasted (InfoNCE, eq. (6)) with the other view's prediction;
the other samples' predictions are the negatives.

    L_i = -log exp(NN(z_i) . p_i+ / tau) / sum_k exp(NN(z_i) . p_k+ / tau),   symmetric in the two views

The support set is a FIFO queue of view-1 projections (L2-normalized), filled once per optimizer step with every
process's rows (:class:`selfsup.nn.queues.FeatureQueue`). Until it holds a row, a projection is its own neighbour
(then NNCLR is SimCLR with a predictor); lookups use the rows filled so far.
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
from selfsup.nn.queues import FeatureQueue


@dataclass
class NNCLRParams:
    queue_size: int = 98304       # NNCLR §4.1 / Table 6: support set of 98,304
    temperature: float = 0.1      # NNCLR §4.1: tau = 0.1
    predictor_hidden: int = 4096  # NNCLR §4.1: predictor 256 -> 4096 -> 256


def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """For each row of ``z`` (L2-normalized), the row of ``support`` with the highest cosine similarity (no grad)."""
    if support.shape[0] == 0:
        return z.detach()
    with torch.no_grad():
        idx = (z.detach() @ support.to(z.dtype).T).argmax(dim=1)
    return support[idx].to(z.dtype)


class NNCLR(Method):
    def __init__(self, encoder, projector, predictor, view_maker, p: NNCLRParams):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.view_maker = encoder, projector, predictor, view_maker
        self.support = FeatureQueue(p.queue_size, projector.out_dim, init="empty")
        self.p = p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"NNCLR uses two views, got {len(views)}; set views.n_local=0")
        feats = forward_views(self.encoder, views.crops)
        z1, z2 = (F.normalize(z, dim=1) for z in forward_views(self.projector, feats))
        p1, p2 = forward_views(self.predictor, [z1, z2])
        support = self.support.filled()
        nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        t = self.p.temperature
        loss = 0.5 * (info_nce(nn1, p2, temperature=t) + info_nce(nn2, p1, temperature=t))
        self.support.stage(z1)
        nn_cos = float((nn1 * z1.detach()).sum(1).mean())  # how close the borrowed positives are
        return {"loss": loss, "features": feats[0], "nn_cosine": nn_cos}

    def on_step_end(self, progress: Progress) -> dict:
        self.support.commit()
        return {"support_filled": int(self.support.count)}


@register("nnclr", NNCLRParams, family="deep metric learning", cookbook="§2.2 eq. (6); §3.1.2 nearest-neighbour views",
          summary="the positive is the nearest neighbour in a support set of earlier projections")
def build(cfg, data: DataInfo) -> NNCLR:
    p = cfg.params
    if p.queue_size < cfg.batch_size or p.temperature <= 0:
        raise ValueError(f"nnclr needs queue_size >= batch_size ({cfg.batch_size}) and temperature > 0, got "
                         f"{p.queue_size}, {p.temperature}")
    if cfg.views.n_local:
        raise ValueError("NNCLR uses two crops: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    out = cfg.model.projector_out
    return NNCLR(encoder, make_projector(cfg, encoder.num_features), mlp(out, p.predictor_hidden, out, num_layers=2),
                 make_views(cfg, "simclr", data), p)
