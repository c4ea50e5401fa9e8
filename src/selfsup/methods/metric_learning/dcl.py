"""DCL and DCLW (Yeh et al. 2022; cookbook §2.2): SimCLR with the positive pair taken out of InfoNCE's denominator
(decoupled), which removes the negative-positive coupling that makes InfoNCE need large batches; DCLW also weights
the positive term with a von Mises-Fisher weight that favours hard positives."""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.data.types import DataInfo
from selfsup.losses.metric_learning import dcl_loss, dclw_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views


@dataclass
class DCLParams:
    temperature: float = 0.1      # DCL §5 (ImageNet): tau 0.1, SimCLR's setting
    weighting: str = "none"       # none (DCL) | vmf (DCLW)
    sigma: float = 0.5            # DCLW's von Mises-Fisher concentration (Yeh et al. 2022, §4: sigma = 0.5)


class DCL(Method):
    def __init__(self, encoder, projector, view_maker, p: DCLParams):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p = encoder, projector, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"DCL uses two views, got {len(views)}; set views.n_local=0")
        feats = forward_views(self.encoder, views.crops)
        z1, z2 = forward_views(self.projector, feats)
        if self.p.weighting == "vmf":
            loss = dclw_loss(z1, z2, temperature=self.p.temperature, sigma=self.p.sigma)
        else:
            loss = dcl_loss(z1, z2, temperature=self.p.temperature)
        return {"loss": loss, "features": feats[0], "embedding": z1}


@register("dcl", DCLParams, family="deep metric learning", cookbook="§2.2 eq. (6), decoupled",
          summary="NT-Xent without the positive in the denominator; dcl.weighting=vmf gives DCLW")
def build(cfg, data: DataInfo) -> DCL:
    p = cfg.params
    if p.weighting not in ("none", "vmf"):
        raise ValueError(f"dcl.weighting must be 'none' (DCL) or 'vmf' (DCLW), got {p.weighting!r}")
    if p.temperature <= 0 or p.sigma <= 0:
        raise ValueError(f"dcl needs temperature > 0 and sigma > 0, got {p.temperature}, {p.sigma}")
    if cfg.views.n_local:
        raise ValueError("DCL uses two crops: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    return DCL(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "simclr", data), p)
