"""MSN (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning"; cookbook §2.3, §3.3, §3.4): a ViT
sees a masked anchor view (random token dropping) and must assign it to K learnable prototypes as an EMA target
encoder assigns the unmasked target view of the same image; the mean assignment over the whole batch is pushed
towards a prior (uniform: MSN's mean-entropy maximization; power law: PMSN, Assran et al. 2023, cookbook §3.3's
remedy for class-imbalanced pretraining data). Loss: :mod:`selfsup.losses.self_distillation.msn`.

Views: crop 0 is the target view (EMA encoder and head, unmasked); crop 1 is the anchor view, through the online
encoder with only the patches ``views.masks["keep"]`` (``RandomMaskViews``, a uniform random subset per sample; the
reference drops one random subset for the whole batch); ``views.n_local`` extra small crops are MSN's unmasked
"focal" anchor views. Defaults are the released ViT-S/16 run's (facebookresearch/msn ``configs/pretrain/
msn_vits16.yaml`` and ``src/msn_train.py``) unless stated. Not implemented: MSN's focal *masking* of the random
view (the focal crops are separate small crops, as in the reference code), the sharpening schedule (the released
config keeps T = 0.25 constant) and the unused entropy term (``ent_weight: 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.data.views import RandomMaskViews
from selfsup.losses.self_distillation.msn import msn_loss, msn_probs, msn_target_probs, power_law_prior
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.heads import projector
from selfsup.nn.teacher import ema_update, make_teacher
from selfsup.nn.vit import VisionTransformer

PRIORS = ("uniform", "power_law")


@dataclass
class MSNParams:
    num_prototypes: int = 1024       # criterion.num_proto
    out_dim: int = 256               # meta.output_dim (the projection head's output, the prototypes' dimension)
    hidden_dim: int = 2048           # meta.hidden_dim: fc1 -> bn -> gelu -> fc2 -> bn -> gelu -> fc3
    head_bn: bool = True             # meta.use_bn
    temperature: float = 0.1         # criterion.temperature (anchor and target softmax)
    target_sharpen: float = 0.25     # criterion.start_sharpen = final_sharpen: target temperature 0.1 x 0.25 = 0.025
    mask_ratio: float = 0.15         # data.patch_drop for ViT-S/16 (the paper: 0.3 ViT-B/16, 0.7 ViT-L/7)
    me_max_weight: float = 1.0       # criterion.memax_weight
    use_sinkhorn: bool = True        # criterion.use_sinkhorn (released ViT-S/16 config)
    sinkhorn_iterations: int = 3     # losses.distributed_sinkhorn num_itr
    ema_base: float = 0.996          # msn_train.py: 0.996 -> 1 linearly over 1.25 x the training steps
    prior: str = "uniform"           # uniform (MSN) | power_law (PMSN, Assran et al. 2023; cookbook §3.3)
    power_law_tau: float = 0.25      # PMSN's exponent tau of prior_k ~ k^-tau (see the report: value to verify)


def msn_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """The target's EMA momentum at 0-based step ``step`` (msn_train.py): linear from ``base`` towards 1, reaching
    1 only after 1.25 x ``total_steps`` (so it stays below 1 throughout training)."""
    return base + (1.0 - base) * step / (1.25 * max(total_steps, 1))


class MSN(Method):
    def __init__(self, encoder: VisionTransformer, head: nn.Module, view_maker, p: MSNParams):
        super().__init__()
        self.encoder, self.head, self.view_maker, self.p = encoder, head, view_maker, p
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(head)
        bound = 1.0 / math.sqrt(p.out_dim)  # msn_train.py: uniform(-1/sqrt(d), 1/sqrt(d))
        self.prototypes = nn.Parameter(torch.empty(p.num_prototypes, p.out_dim).uniform_(-bound, bound))
        prior = power_law_prior(p.num_prototypes, p.power_law_tau) if p.prior == "power_law" else torch.empty(0)
        self.register_buffer("prior", prior, persistent=False)

    def no_weight_decay(self) -> set[str]:
        return {"prototypes"}  # msn_train.py init_opt: weight_decay 0 on the prototypes

    def anchor_features(self, views: Views) -> list[torch.Tensor]:
        """Backbone features of the anchor views: crop 1 with only its kept patches, then the local crops."""
        if views.n_global < 2:
            raise ValueError(f"MSN needs a target view and a masked anchor view (n_global >= 2), got {views.n_global}")
        masked = self.encoder.forward_features(views.crops[1], keep=views.masks["keep"])["pooled"]
        return [masked, *forward_views(self.encoder, views.local_crops)]

    def forward(self, views: Views, progress: Progress) -> dict:
        p = self.p
        feats = self.anchor_features(views)
        anchors = [msn_probs(z, self.prototypes, p.temperature) for z in forward_views(self.head, feats)]
        with torch.no_grad():
            z_target = self.teacher_head(self.teacher_encoder(views.crops[0]))
        targets = msn_target_probs(z_target, self.prototypes, p.temperature, p.target_sharpen, p.use_sinkhorn,
                                   p.sinkhorn_iterations)
        loss, terms = msn_loss(anchors, targets, self.prior if p.prior == "power_law" else None, p.me_max_weight,
                               return_terms=True)
        with torch.no_grad():
            used = float(targets.argmax(dim=1).unique().numel())  # the reference's "np" log
        return {"loss": loss, "features": feats[0], **terms, "prototypes_used": used}

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        m = msn_momentum(progress.step - 1, progress.total_steps, self.p.ema_base)  # the step just done
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        return {"ema_momentum": m}

    @property
    def guillotine_head(self) -> nn.Sequential:
        return self.head


@register("msn", MSNParams, family="self-distillation", cookbook="§2.3; §3.3 prior matching; §3.4 EMA target",
          summary="masked anchor views match an EMA target's sharpened prototype assignment; mean assignment "
                  "regularized towards a uniform (me-max) or power-law prior")
def build(cfg, data: DataInfo) -> MSN:
    p = cfg.params
    if p.prior not in PRIORS:
        raise ConfigError(f"msn.prior={p.prior!r} is not one of {', '.join(PRIORS)}")
    if p.num_prototypes < 2:
        raise ConfigError(f"msn.num_prototypes={p.num_prototypes} must be >= 2")
    if not 0.0 <= p.mask_ratio < 1.0:
        raise ConfigError(f"msn.mask_ratio={p.mask_ratio} is the fraction of patches dropped: it must be in [0, 1)")
    if p.prior == "power_law" and not p.power_law_tau >= 0:
        raise ConfigError(f"msn.power_law_tau={p.power_law_tau} must be >= 0 (0 is the uniform prior)")
    encoder = make_backbone(cfg, data)
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"MSN masks its anchor view by dropping tokens, so it needs a ViT: set "
                          f"model.backbone=vit_tiny (or vit_small), not {cfg.model.backbone!r}")
    head = projector(encoder.num_features, p.hidden_dim, p.out_dim, num_layers=3, bn=p.head_bn, bias=True,
                     act="gelu")
    grid = cfg.views.size // encoder.patch_size
    views = RandomMaskViews(make_views(cfg, "simclr", data), grid * grid, p.mask_ratio)
    return MSN(encoder, head, views, p)
