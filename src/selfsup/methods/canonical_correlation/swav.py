"""SwAV (Caron et al. 2020; cookbook §2.4, §3.1.1 multi-crop): each global crop's code, an equipartitioned soft
assignment of the batch to K prototypes (Sinkhorn-Knopp), is predicted from every other crop.

As the reference (facebookresearch/swav ``main_swav.py``, ``src/resnet50.py``): a projection MLP (2048 hidden -> 128,
``model.projector_*``) whose output is L2-normalized, prototypes ``Linear(128, K, bias=False)`` whose rows are
L2-normalized before every forward, 2 global + ``views.n_local`` local crops (codes from the 2 global ones), and the
prototypes' gradient dropped during the first ``freeze_prototypes_epochs``.

Prototype normalization: the reference normalizes at the start of each iteration; here it happens at construction
and after every optimizer step (``on_step_end``), so every forward sees the same unit rows and a checkpoint holds them.

Queue (small batches; reference ``--queue_length``, ``--epoch_queue_starts``): from epoch ``queue_start_epoch`` the
normalized projections of each global crop are queued (:class:`selfsup.nn.queues.FeatureQueue`, every process's rows
in rank order); once full, their scores under the current prototypes join the batch in Sinkhorn. `swav_loss` sums
Sinkhorn's columns over processes, so each process passes its share of the queue (rows ``rank::world``): together
the shares are the queue one process would use, and W processes compute the codes of 1 (the reference keeps one
queue per process; its union is the same set of rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as du
from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.losses.canonical_correlation import swav_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.queues import FeatureQueue


@dataclass
class SwAVParams:
    prototypes: int = 3000              # K: --nmb_prototypes (every published script)
    temperature: float = 0.1            # --temperature
    epsilon: float = 0.05               # --epsilon (entropy weight of Sinkhorn-Knopp)
    sinkhorn_iterations: int = 3        # --sinkhorn_iterations
    freeze_prototypes_epochs: int = 1   # --freeze_prototypes_niters 313 = 1 epoch at batch 4096 (5005 at batch 256)
    queue_length: int = 0               # --queue_length: 0 = off (batch 4096 scripts); 3840 in the batch-256 ones
    queue_start_epoch: int = 15         # --epoch_queue_starts


class SwAV(Method):
    def __init__(self, encoder, projector, view_maker, p: SwAVParams):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p = encoder, projector, view_maker, p
        self.prototypes = nn.Linear(projector.out_dim, p.prototypes, bias=False)
        self.queues = nn.ModuleList([FeatureQueue(p.queue_length, projector.out_dim, init="empty")
                                     for _ in range(view_maker.n_global)] if p.queue_length else [])
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def queue_scores(self) -> list[torch.Tensor] | None:
        """This process's share of each full queue (rows rank::world), scored by the current prototypes; None
        until the queues are full (the reference uses its queue once full)."""
        if not self.queues or not all(q.full for q in self.queues):
            return None
        world, rank = du.get_world_size(), du.get_rank()
        w = self.prototypes.weight
        return [q.features[rank::world].to(w.dtype) @ w.T for q in self.queues]

    def forward(self, views: Views, progress: Progress) -> dict:
        if self.queues and self.p.queue_length % du.get_world_size():
            raise ValueError(f"swav.queue_length={self.p.queue_length} must be a multiple of the number of processes "
                             f"({du.get_world_size()}) so that each holds an equal share of the queue")
        feats = forward_views(self.encoder, views.crops)
        zs = [F.normalize(z, dim=1) for z in forward_views(self.projector, feats)]
        scores = forward_views(self.prototypes, zs)
        p = self.p
        queued = self.queue_scores()
        loss = swav_loss(scores, views.n_global, p.temperature, p.epsilon, p.sinkhorn_iterations, queued)
        if self.queues and progress.epoch >= p.queue_start_epoch:
            for q, z in zip(self.queues, zs[: views.n_global]):
                q.stage(z)
        return {"loss": loss, "features": feats[0], "queue_in_use": float(queued is not None)}

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.p.freeze_prototypes_epochs:  # main_swav.py: p.grad = None for the prototypes
            self.prototypes.weight.grad = None

    def on_step_end(self, progress: Progress) -> dict:
        self.normalize_prototypes()
        for q in self.queues:
            q.commit()
        return {"queue_filled": int(self.queues[0].count)} if self.queues else {}


@register("swav", SwAVParams, family="canonical correlation", cookbook="§2.4; §3.1.1 multi-crop; §3.8.1",
          summary="swapped prediction of Sinkhorn-equipartitioned prototype codes across multi-crop views")
def build(cfg, data: DataInfo) -> SwAV:
    p = cfg.params
    if p.prototypes < 1 or p.sinkhorn_iterations < 1 or p.temperature <= 0 or p.epsilon <= 0:
        raise ConfigError(f"swav needs prototypes >= 1, sinkhorn_iterations >= 1, temperature > 0 and epsilon > 0, "
                         f"got {p.prototypes}, {p.sinkhorn_iterations}, {p.temperature}, {p.epsilon}")
    if p.queue_length < 0 or p.queue_start_epoch < 0 or p.freeze_prototypes_epochs < 0:
        raise ConfigError(f"swav.queue_length, queue_start_epoch and freeze_prototypes_epochs must be >= 0, got "
                         f"{p.queue_length}, {p.queue_start_epoch}, {p.freeze_prototypes_epochs}")
    if 0 < p.queue_length < cfg.batch_size:
        raise ConfigError(f"swav.queue_length={p.queue_length} is smaller than batch_size={cfg.batch_size}: one step's "
                         "projections would overwrite each other; use 0 (no queue) or at least one batch")
    encoder = make_backbone(cfg, data)
    return SwAV(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "multicrop", data), p)
