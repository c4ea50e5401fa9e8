"""Supervised cross-entropy: the ceiling of the catalog's comparisons.

The same backbone, views, optimizer and steps as a self-supervised recipe, trained on the labels with a linear
classifier on the backbone features: cross-entropy averaged over the views,

    L = (1/V) sum_v (1/N) sum_i -log softmax(W f(x_i^v) + b)_{y_i},

the standard supervised baseline the cookbook measures self-supervised pretraining against (§3.7: "how close to a
supervised backbone"). The classifier is a training head, not exported: evaluation probes the backbone as it does
for every other method, so ``gap closed = (SSL - pixels) / (supervised - pixels)`` compares like with like
(``benchmarks/catalog.py``). Not self-supervised: it needs labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from selfsup.data.types import DataInfo
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views


@dataclass
class SupervisedParams:
    label_smoothing: float = 0.0   # 0: plain cross-entropy (the baseline); 0.1 as in DeiT for long ViT trainings


class Supervised(Method):
    def __init__(self, encoder: nn.Module, classifier: nn.Linear, view_maker, p: SupervisedParams):
        super().__init__()
        self.encoder, self.classifier, self.view_maker, self.p = encoder, classifier, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        if views.labels is None:
            raise ValueError("supervised needs the labels of the batch (Views.labels); train it on a labelled data "
                             "set")
        feats = forward_views(self.encoder, views.crops)
        logits = [self.classifier(f) for f in feats]
        loss = torch.stack([F.cross_entropy(z, views.labels, label_smoothing=self.p.label_smoothing)
                            for z in logits]).mean()
        with torch.no_grad():
            accuracy = (logits[0].argmax(1) == views.labels).float().mean() * 100
        return {"loss": loss, "features": feats[0], "train_top1": accuracy}

    @property
    def guillotine_head(self) -> None:  # the classifier is the task's own head, not a projector to cut
        return None


@register("supervised", SupervisedParams, family="supervised reference",
          cookbook="§3.7 (the supervised baseline SSL is compared with)",
          summary="cross-entropy on the labels: the ceiling the gap closed is measured against (needs labels)")
def build(cfg, data: DataInfo) -> Supervised:
    if data.num_classes is None:
        raise ValueError(f"supervised needs labels and {data.name or 'this data set'} has none: use a labelled data "
                         "set (an image folder with one sub-folder per class), or a self-supervised method such as "
                         "simclr")
    if not 0 <= cfg.params.label_smoothing < 1:
        raise ValueError(f"supervised.label_smoothing must be in [0, 1), got {cfg.params.label_smoothing}")
    encoder = make_backbone(cfg, data)
    return Supervised(encoder, nn.Linear(encoder.num_features, data.num_classes), make_views(cfg, "simclr", data),
                      cfg.params)
