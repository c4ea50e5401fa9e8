"""SimSiam (Chen and He 2021; cookbook §2.3 eq. (11), §3.4): BYOL without a teacher, a stop-gradient instead."""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation.simsiam import simsiam_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.heads import predictor as make_predictor


@dataclass
class SimSiamParams:
    predictor_hidden: int = 512     # SimSiam §3: predictor 2048 -> 512 -> 2048 (a bottleneck), BN on its hidden layer
    fix_predictor_lr: bool = True   # SimSiam §4.2 / reference --fix-pred-lr: the predictor's lr is not decayed


class SimSiam(Method):
    def __init__(self, encoder, projector, predictor, view_maker, fix_predictor_lr: bool):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.view_maker = view_maker
        self.fix_predictor_lr = fix_predictor_lr

    def forward(self, views: Views, progress: Progress) -> dict:
        n_global = views.n_global
        feats = forward_views(self.encoder, views.crops)
        z = forward_views(self.projector, feats)
        p = forward_views(self.predictor, z)
        # Each global view's projection (stop-gradient, inside simsiam_loss) is predicted from every other view. Two
        # views: (L(p2, z1) + L(p1, z2)) / 4 = 1 + D(p1, z2)/2 + D(p2, z1)/2, the paper's loss plus 1 (same gradient).
        pairs = [(i, j) for i in range(n_global) for j in range(len(views)) if j != i]
        loss = sum(simsiam_loss(p[j], z[i]) for i, j in pairs) * (0.5 / len(pairs))
        return {"loss": loss, "features": feats[0], "embedding": z[0]}

    def param_groups(self, weight_decay: float, no_decay_lr_scale: float = 1.0) -> list[dict]:
        """The default groups, with the predictor's parameters moved to groups of their own marked ``constant_lr``
        when ``fix_predictor_lr`` (the trainer's ``set_lr`` keeps them at the peak lr; weight decay unchanged)."""
        groups = super().param_groups(weight_decay, no_decay_lr_scale)
        if not self.fix_predictor_lr:
            return groups
        in_predictor = {id(p) for p in self.predictor.parameters()}
        out = []
        for g in groups:
            rest = [p for p in g["params"] if id(p) not in in_predictor]
            fixed = [p for p in g["params"] if id(p) in in_predictor]
            if rest:
                out.append({**g, "params": rest})
            if fixed:
                out.append({**g, "params": fixed, "constant_lr": True})
        return out


@register("simsiam", SimSiamParams, family="self-distillation", cookbook="§2.3, eq. (11); §3.4",
          summary="online network + predictor regresses its own stop-gradient projection; no teacher")
def build(cfg, data: DataInfo) -> SimSiam:
    encoder = make_backbone(cfg, data)
    proj = make_projector(cfg, encoder.num_features)
    out = cfg.model.projector_out
    # SimSiam §A: MoCo v2's symmetric augmentation (jitter 0.8, grayscale 0.2, blur 0.5 on both views): "simclr"
    return SimSiam(encoder, proj, make_predictor(out, cfg.params.predictor_hidden, out),
                   make_views(cfg, "simclr", data), cfg.params.fix_predictor_lr)
