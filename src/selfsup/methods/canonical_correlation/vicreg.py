"""VICReg (Bardes et al. 2022; cookbook §2.4, Fig. 6): two views through an expander, whose outputs are pulled
together (invariance) while each view's batch keeps every dimension's standard deviation above gamma (variance) and
its dimensions decorrelated (covariance). No negatives, no teacher, no predictor.

The views are BYOL's asymmetric pair (the reference's ``augmentations.TrainTransform`` is BYOL's recipe). The
expander is ``model.projector_*``: 8192-8192-8192 (3 layers) in the paper (§4.1); every Linear has no bias, which
changes nothing the loss sees (the reference's biases sit before BN or shift both views alike). The three unweighted
terms are logged as ``invariance``, ``variance`` and ``covariance``.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.losses.canonical_correlation import vicreg_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.heads import projector


@dataclass
class VICRegParams:
    sim_weight: float = 25.0   # lambda: main_vicreg.py --sim-coeff (paper §4.1: lambda = mu = 25, nu = 1)
    var_weight: float = 25.0   # mu: main_vicreg.py --std-coeff
    cov_weight: float = 1.0    # nu: main_vicreg.py --cov-coeff
    gamma: float = 1.0         # target standard deviation: paper §3.1 (gamma = 1), main_vicreg.py F.relu(1 - std)
    eps: float = 1e-4          # inside the square root of the variance: main_vicreg.py sqrt(var + 0.0001)


class VICReg(Method):
    def __init__(self, encoder, expander, view_maker, p: VICRegParams):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p = encoder, expander, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"VICReg compares two views, got {len(views)}; set views.n_local=0")
        feats = forward_views(self.encoder, views.crops)
        z1, z2 = forward_views(self.projector, feats)
        p = self.p
        loss, terms = vicreg_loss(z1, z2, p.sim_weight, p.var_weight, p.cov_weight, p.gamma, p.eps, return_terms=True)
        return {"loss": loss, "features": feats[0], "embedding": z1, **terms}


@register("vicreg", VICRegParams, family="canonical correlation", cookbook="§2.4 eq. (13), Fig. 6; §3.2 expander",
          summary="invariance + variance hinge + covariance penalty on a wide expander; no negatives")
def build(cfg, data: DataInfo) -> VICReg:
    p = cfg.params
    if min(p.sim_weight, p.var_weight, p.cov_weight) < 0 or p.gamma <= 0 or p.eps <= 0:
        raise ConfigError(f"vicreg needs weights >= 0, gamma > 0 and eps > 0, got sim_weight={p.sim_weight}, "
                         f"var_weight={p.var_weight}, cov_weight={p.cov_weight}, gamma={p.gamma}, eps={p.eps}")
    if cfg.views.n_local:
        raise ConfigError("VICReg compares two views: set views.n_local=0")
    encoder = make_backbone(cfg, data)
    m = cfg.model
    expander = projector(encoder.num_features, m.projector_hidden, m.projector_out, num_layers=m.projector_layers,
                         last_bn=m.projector_last_bn, bias=False)
    return VICReg(encoder, expander, make_views(cfg, "byol", data), p)
