"""Barlow Twins (Zbontar et al. 2021; cookbook §2.4 eq. (13)-(14)): the cross-correlation matrix of two views'
embeddings, standardized over the whole batch, is pushed to the identity.

As the reference (facebookresearch/barlowtwins ``main.py``): BYOL's asymmetric views (its ``Transform``), a
projector whose Linear layers have no bias and whose last layer has no BN (the loss standardizes the embeddings:
``nn.BatchNorm1d(affine=False)`` there, `barlow_twins_loss` here), 8192-8192-8192 on ImageNet (``--projector``).

Its optimizer rule (cookbook §3.5.2) is the trainer's: LARS with biases and BN parameters excluded from weight
decay and LARS adaptation (``optim.param_groups``), and a smaller lr for them, ``optim.no_decay_lr_scale`` =
0.0048 / 0.2 = 0.024 (``--learning-rate-biases`` / ``--learning-rate-weights``), set by the ImageNet recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.losses.canonical_correlation import barlow_twins_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.heads import projector


@dataclass
class BarlowTwinsParams:
    lambd: float = 5e-3   # weight of the off-diagonal terms: paper §2 / implementation details (main.py: 0.0051)


class BarlowTwins(Method):
    def __init__(self, encoder, projector_, view_maker, p: BarlowTwinsParams):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p = encoder, projector_, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"Barlow Twins correlates two views, got {len(views)}; set views.n_local=0")
        feats = forward_views(self.encoder, views.crops)
        z1, z2 = forward_views(self.projector, feats)
        return {"loss": barlow_twins_loss(z1, z2, self.p.lambd), "features": feats[0], "embedding": z1}


@register("barlow_twins", BarlowTwinsParams, family="canonical correlation",
          cookbook="§2.4 eq. (13)-(14); §3.5.2 LARS and bias lr",
          summary="cross-correlation of the two views' standardized embeddings pushed to the identity")
def build(cfg, data: DataInfo) -> BarlowTwins:
    p = cfg.params
    if p.lambd < 0:
        raise ConfigError(f"barlow_twins.lambd must be >= 0 (the paper uses 5e-3), got {p.lambd}")
    if cfg.views.n_local:
        raise ConfigError("Barlow Twins correlates two views: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    m = cfg.model
    proj = projector(encoder.num_features, m.projector_hidden, m.projector_out, num_layers=m.projector_layers,
                     last_bn=m.projector_last_bn, bias=False)
    return BarlowTwins(encoder, proj, make_views(cfg, "byol", data), p)
