"""NPID, instance discrimination with a memory bank (Wu et al. 2018; cookbook §2.2 eq. (5)): every training image
is its own class; its "class weight" is its row in a memory bank of L2-normalized embeddings (one per sample),
and a non-parametric softmax over the whole bank classifies each augmented image as itself.

One augmented view per image per step, as in the paper. The bank is updated after each optimizer step with the
samples' new embeddings, v_i <- normalize(m v_i + (1 - m) f_i), with every process's rows
(:class:`selfsup.nn.queues.MemoryBank`); the samples' rows come from ``Views.index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView
from selfsup.losses.metric_learning import npid_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.queues import MemoryBank


@dataclass
class NPIDParams:
    dim: int = 128                # Wu et al. 2018, §3.1: 128-d embeddings
    temperature: float = 0.07     # Wu et al. 2018, §3.1: tau = 0.07
    momentum: float = 0.5         # Wu et al. 2018, §3.3: memory update with lambda = 0.5
    first_visit: str = "mix"      # "mix": a row's random start is mixed in like an older value (lemniscate.pytorch);
                                  # "write": the first visit stores the embedding (MemoryBank's docstring)
    seed: int = 0                 # the bank's random start


class NPID(Method):
    def __init__(self, encoder, head, view_maker, bank: MemoryBank, p: NPIDParams):
        super().__init__()
        self.encoder, self.head, self.view_maker, self.bank, self.p = encoder, head, view_maker, bank, p

    @property
    def guillotine_head(self):
        return None  # a single linear map: nothing to cut layer by layer

    def forward(self, views: Views, progress: Progress) -> dict:
        if views.index is None:
            raise ValueError("NPID needs each sample's row in the training set (Views.index); the trainer provides it")
        feats = self.encoder(views.crops[0])
        z = F.normalize(self.head(feats), dim=1)
        loss = npid_loss(z, views.index, self.bank.bank, temperature=self.p.temperature)
        self.bank.stage(views.index, z)
        return {"loss": loss, "features": feats}

    def on_step_end(self, progress: Progress) -> None:
        self.bank.commit()


@register("npid", NPIDParams, family="deep metric learning", cookbook="§2.2 eq. (5)",
          summary="instance discrimination: non-parametric softmax over a memory bank of every sample")
def build(cfg, data: DataInfo) -> NPID:
    p = cfg.params
    if data.num_samples is None:
        raise ValueError("NPID keeps one memory row per training sample, so it needs the data set's size "
                         "(DataInfo.num_samples)")
    if p.temperature <= 0 or p.dim < 1:
        raise ValueError(f"npid needs temperature > 0 and dim >= 1, got {p.temperature}, {p.dim}")
    encoder = make_backbone(cfg, data)
    two = make_views(cfg, "simclr", data)
    one = MultiView(two.global_cfgs[:1])  # NPID draws one augmented view per image
    bank = MemoryBank(data.num_samples, p.dim, momentum=p.momentum, seed=p.seed, first_visit=p.first_visit)
    return NPID(encoder, nn.Linear(encoder.num_features, p.dim), one, bank, p)
