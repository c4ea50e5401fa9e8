"""RotNet (Gidaris et al. 2018; cookbook §2.1): the encoder learns by predicting which of four rotations (0, 90,
180, 270 degrees) was applied to an image. To tell them apart it must recognize the object, its orientation and
its parts, with no label.

Every image of a batch enters in all four rotations at once (the paper's best variant, §3.2 and Table 1: "all 4
rotations in the same mini-batch"), so an optimizer step sees 4B images. The head is one linear layer on the pooled
features (the paper puts its classifier on convolutional features; on a ResNet the pooled feature is the
representation we evaluate). Augmentation is a random resized crop + flip only: colour changes are not needed (the
task has no trivial colour shortcut) and a flip never makes two rotations ambiguous. The head is not exported; a
RotNet encoder's rotation probe (``eval.rotation``) is high by construction and says nothing about its quality.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from selfsup.data.pretext import rotate_all
from selfsup.data.types import DataInfo
from selfsup.data.views import crop_views
from selfsup.losses.pretext import rotation_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone


@dataclass
class RotNetParams:
    crop_scale_min: float = 0.5   # random resized crop scale (0.5, 1) + flip (untuned; the paper crops 224 of 256)


class RotNet(Method):
    def __init__(self, encoder: nn.Module, head: nn.Linear, view_maker):
        super().__init__()
        self.encoder, self.head, self.view_maker = encoder, head, view_maker

    def forward(self, views: Views, progress: Progress) -> dict:
        x = views.crops[0]
        rotated, rotations = rotate_all(x)
        feats = self.encoder(rotated)
        logits = self.head(feats)
        acc = (logits.argmax(1) == rotations).float().mean()
        return {"loss": rotation_loss(logits, rotations), "features": feats[: x.shape[0]],  # the upright images
                "rotation_acc": acc.detach()}

    @property
    def guillotine_head(self) -> None:
        return None  # the head is a 4-way classifier, not a projector


@register("rotnet", RotNetParams, family="pretext task", cookbook="§2.1",
          summary="predict which of 4 rotations was applied; all 4 rotations of each image in the batch")
def build(cfg, data: DataInfo) -> RotNet:
    p = cfg.params
    if not 0.0 < p.crop_scale_min <= 1.0:
        raise ValueError(f"rotnet.crop_scale_min={p.crop_scale_min} must be in (0, 1]")
    encoder = make_backbone(cfg, data)
    only = crop_views(cfg.views.size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    return RotNet(encoder, nn.Linear(encoder.num_features, 4), only)
