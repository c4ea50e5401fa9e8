"""MoCo v2 (He et al. 2020; Chen et al. 2020b; cookbook §2.2 eq. (6), §3.4.1): InfoNCE of a query against its key
from a momentum encoder and a queue of keys from earlier batches.

Batch norm: shuffled BN (MoCo §3.3), not SyncBN. With a queue, a query and its positive key normalized with the
same batch's statistics can be told apart from the queued negatives by those statistics alone; SyncBN would share
them more, not less. :func:`selfsup.nn.shuffle_bn.shuffled_bn_forward` gives each key the statistics of a random
group of the whole batch, the same groups on any number of processes. The queue receives the keys of every process,
in rank order, once per optimizer step (:class:`selfsup.nn.queues.FeatureQueue`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.types import DataInfo
from selfsup.losses.metric_learning import info_nce
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.queues import FeatureQueue
from selfsup.nn.shuffle_bn import shuffled_bn_forward
from selfsup.nn.teacher import ema_update, make_teacher


@dataclass
class MoCoV2Params:
    queue_size: int = 65536        # MoCo §3.3 / §4.1: K = 65,536 keys
    temperature: float = 0.2       # MoCo v2 (Chen et al. 2020b, Table 1): tau 0.2 with the MLP head
    momentum: float = 0.999        # MoCo §3.3, §4.1: m = 0.999, constant
    shuffle_bn_groups: int = 8     # MoCo §3.3: BN shuffled over 8 GPUs (32 keys per group at batch 256)
    symmetric: bool = False        # MoCo v2's reference is one-directional; True adds L(q2, k1) (MoCo v3 §3)
    seed: int = 0                  # the first queue's random keys and the shuffle permutations


class MoCoV2(Method):
    # the key encoder's BN statistics are those of its shuffled groups (shuffled_bn_forward), the same groups on any
    # number of processes; synchronizing them would merge the groups of different processes
    local_batchnorm = ("key_encoder", "key_projector")

    def __init__(self, encoder, projector, view_maker, p: MoCoV2Params):
        super().__init__()
        self.encoder, self.projector, self.view_maker = encoder, projector, view_maker
        self.key_encoder, self.key_projector = make_teacher(encoder), make_teacher(projector)
        self.queue = FeatureQueue(p.queue_size, projector.out_dim, init="random", seed=p.seed)
        self.p = p

    def _keys(self, crop: torch.Tensor, progress: Progress, which: int) -> torch.Tensor:
        key_net = nn.Sequential(self.key_encoder, self.key_projector)
        seed = self.p.seed * 1_000_003 + progress.step * 2 + which  # the same on every process
        return F.normalize(shuffled_bn_forward(key_net, crop, self.p.shuffle_bn_groups, seed), dim=1)

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"MoCo v2 uses two views (a query and a key crop), got {len(views)}; set views.n_local=0")
        directions = [(0, 1), (1, 0)] if self.p.symmetric else [(0, 1)]
        crops = [views.crops[q] for q, _ in directions]
        feats = forward_views(self.encoder, crops)
        queries = forward_views(self.projector, feats)
        negatives = self.queue.filled()  # the keys of earlier steps: commit() writes only after the step
        loss = 0.0
        for (_, k), q in zip(directions, queries):
            key = self._keys(views.crops[k], progress, k)
            loss = loss + info_nce(q, key, negatives=negatives, temperature=self.p.temperature)
            self.queue.stage(key)
        return {"loss": loss / len(directions), "features": feats[0]}

    def on_step_end(self, progress: Progress) -> dict:
        ema_update(self.key_encoder, self.encoder, self.p.momentum)
        ema_update(self.key_projector, self.projector, self.p.momentum)
        self.queue.commit()
        return {"queue_ptr": int(self.queue.ptr)}


@register("moco_v2", MoCoV2Params, family="deep metric learning",
          cookbook="§2.2 eq. (6); §3.4.1 momentum encoder; §3.8.1",
          summary="InfoNCE against a momentum encoder's key and a 65,536-key queue; shuffled BN")
def build(cfg, data: DataInfo) -> MoCoV2:
    p = cfg.params
    for name, value in (("queue_size", p.queue_size), ("shuffle_bn_groups", p.shuffle_bn_groups)):
        if value < 1:
            raise ValueError(f"moco_v2.{name} must be >= 1, got {value}")
    if p.temperature <= 0 or not 0.0 <= p.momentum <= 1.0:
        raise ValueError(f"moco_v2 needs temperature > 0 and momentum in [0, 1], got {p.temperature}, {p.momentum}")
    if p.queue_size < cfg.batch_size:
        raise ValueError(f"moco_v2.queue_size={p.queue_size} is smaller than batch_size={cfg.batch_size}: one "
                         "step's keys would overwrite each other; use a queue of at least one batch")
    micro = cfg.batch_size // cfg.train.accumulate
    if micro % p.shuffle_bn_groups or micro // p.shuffle_bn_groups < 2:
        raise ValueError(f"moco_v2.shuffle_bn_groups={p.shuffle_bn_groups} must divide the batch of each forward "
                         f"({micro} = batch_size / train.accumulate) into groups of >= 2 samples")
    if cfg.views.n_local:
        raise ValueError("MoCo v2 uses two crops: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    return MoCoV2(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "simclr", data), p)
