"""Supervised contrastive learning (SupCon, Khosla et al. 2020; cookbook §2.2): NT-Xent where every view of every
sample of the same class is a positive. It needs labels: it is the supervised reference point of the family, not a
self-supervised method."""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.data.types import DataInfo
from selfsup.losses.metric_learning import supcon_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views


@dataclass
class SupConParams:
    temperature: float = 0.1      # Khosla et al. 2020, §4 / appendix: tau = 0.1


class SupCon(Method):
    def __init__(self, encoder, projector, view_maker, p: SupConParams):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p = encoder, projector, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        if views.labels is None:
            raise ValueError("SupCon needs the labels of the batch (Views.labels); train it on a labelled data set")
        feats = forward_views(self.encoder, views.crops)
        zs = forward_views(self.projector, feats)
        return {"loss": supcon_loss(zs, views.labels, temperature=self.p.temperature), "features": feats[0],
                "embedding": zs[0]}


@register("supcon", SupConParams, family="deep metric learning", cookbook="§2.2 eq. (6) with label positives",
          summary="supervised contrastive: same-class samples are positives (needs labels)")
def build(cfg, data: DataInfo) -> SupCon:
    if data.num_classes is None:
        raise ValueError(f"supcon needs labels and {data.name or 'this data set'} has none: use a labelled data set "
                         "(an image folder with one sub-folder per class), or a self-supervised method such as "
                         "simclr")
    if cfg.params.temperature <= 0:
        raise ValueError(f"supcon.temperature must be > 0, got {cfg.params.temperature}")
    encoder = make_backbone(cfg, data)
    return SupCon(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "simclr", data), cfg.params)
