"""Mean Shift, MSF (Koohpayegani, Tejankar and Pirsiavash 2021, "Mean Shift for Self-Supervised Learning"; cookbook
§2.3 and §3.4; its k-NN positives, §3.1.2, play the part of extra crops): BYOL's online network (encoder, projector,
predictor) regresses the mean of the k nearest neighbours of an EMA target's embedding, the target included, in a
memory bank of earlier target embeddings (:func:`selfsup.losses.self_distillation.meanshift.meanshift_loss`).

As in the reference (UMBCvision/MSF, train_msf.py):

- two crops, not symmetrized: crop 0 goes through the online network, crop 1 through the target network only. With
  ``augmentation="weak/strong"`` (target/query, the reference's default and its README's ``--weak_strong``) the
  target's crop is weak (random resized crop and flip only) and the online crop strong (MoCo v2's: colour jitter
  (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, blur p=0.5 at ImageNet size, crop and flip). Here the strong view is the
  ``simclr`` view maker (the same jitter and grayscale defaults, blur 0.5 above 32 pixels, with ``views.*`` applied)
  and the weak view is the same config with jitter, grayscale, blur and solarization switched off;
- the target network is a copy of encoder + projector updated by an EMA of constant momentum 0.99 (no schedule);
- the bank starts from L2-normalized Gaussian rows counted as full (``FeatureQueue(init="random")``, as the
  reference's ``torch.randn`` queue) and receives the L2-normalized targets, first in first out. It is written once
  per optimizer step with every process's targets in rank order (:class:`selfsup.nn.queues.FeatureQueue`), so
  gradient accumulation and DDP fill it as one process with the whole batch does.

Not reproduced: the reference's shuffled batch-norm for the target network (a DataParallel artefact there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView
from selfsup.losses.self_distillation.byol import renorm
from selfsup.losses.self_distillation.meanshift import meanshift_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.heads import projector as mlp
from selfsup.nn.queues import FeatureQueue
from selfsup.nn.teacher import ema_update, make_teacher

AUGMENTATIONS = ("weak/strong", "weak/weak", "strong/weak", "strong/strong")  # target/online: train_msf.py choices


@dataclass
class MeanShiftParams:
    k: int = 5                       # MSF abstract ("5 as used in our experiments"); run_msf.sh --topk 5
    bank_size: int = 1024000         # run_msf.sh --mem_bank_size 1024000 (train_msf.py default: 128,000)
    momentum: float = 0.99           # train_msf.py --momentum 0.99, constant
    predictor_hidden: int = 4096     # train_msf.py get_mlp(proj_dim, 2 x feat_dim, proj_dim): 4096 for ResNet-50
    augmentation: str = "weak/strong"  # target/online crops: train_msf.py default, README --weak_strong


def msf_views(cfg, data: DataInfo, augmentation: str) -> MultiView:
    """Crop 0 for the online network, crop 1 for the target network, each ``"weak"`` or ``"strong"`` as
    ``augmentation`` ("target/online") says. Strong: the ``simclr`` view maker with ``views.*``; weak: the same crop
    and flip, no photometric operation (train_msf.py ``aug_weak``)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"meanshift.augmentation must be one of {', '.join(AUGMENTATIONS)} (target/online crops), "
                         f"got {augmentation!r}")
    strong = make_views(cfg, "simclr", data).global_cfgs[0]
    weak = dataclasses.replace(strong, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    target_kind, online_kind = augmentation.split("/")
    pick = {"weak": weak, "strong": strong}
    return MultiView([pick[online_kind], pick[target_kind]])


class MeanShift(Method):
    def __init__(self, encoder, projector, predictor, view_maker, p: MeanShiftParams):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.view_maker = encoder, projector, predictor, view_maker
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_projector = make_teacher(projector)
        self.bank = FeatureQueue(p.bank_size, projector.out_dim, init="random")
        self.p = p

    def forward(self, views: Views, progress: Progress) -> dict:
        if len(views) != 2:
            raise ValueError(f"MeanShift uses two crops (online, target), got {len(views)}; set views.n_local=0")
        online, target_crop = views.crops
        feats = self.encoder(online)
        pred = self.predictor(self.projector(feats))
        with torch.no_grad():
            target = renorm(self.teacher_projector(self.teacher_encoder(target_crop)).float())
        loss = meanshift_loss(pred, target, self.bank.filled(), self.p.k)
        self.bank.stage(target)
        return {"loss": loss, "features": feats}

    def on_step_end(self, progress: Progress) -> dict:
        self.bank.commit()
        ema_update(self.teacher_encoder, self.encoder, self.p.momentum)
        ema_update(self.teacher_projector, self.projector, self.p.momentum)
        return {"bank_ptr": int(self.bank.ptr)}


@register("meanshift", MeanShiftParams, family="self-distillation",
          cookbook="§2.3 (MSF), eq. (9)-(10) with k-NN targets; §3.4 EMA teacher; §3.1.2 nearest-neighbour positives",
          summary="online network + predictor regresses the mean of the EMA target's k nearest neighbours in a bank")
def build(cfg, data: DataInfo) -> MeanShift:
    p = cfg.params
    if p.k < 1:
        raise ValueError(f"meanshift.k must be >= 1 (the target counts as its own first neighbour), got {p.k}")
    if p.bank_size < cfg.batch_size:
        raise ValueError(f"meanshift.bank_size={p.bank_size} is smaller than batch_size={cfg.batch_size}: a step "
                         "would overwrite its own targets; use a bank of at least one batch")
    if p.k - 1 > p.bank_size:
        raise ValueError(f"meanshift.k={p.k} needs k - 1 rows from a bank of {p.bank_size}: lower k")
    if not 0.0 <= p.momentum <= 1.0:
        raise ValueError(f"meanshift.momentum must be in [0, 1], got {p.momentum}")
    if cfg.views.n_local:
        raise ValueError("MeanShift uses two crops: set views.n_local=0")
    views = msf_views(cfg, data, p.augmentation)
    encoder = make_backbone(cfg, data)
    out = cfg.model.projector_out
    return MeanShift(encoder, make_projector(cfg, encoder.num_features), mlp(out, p.predictor_hidden, out, num_layers=2),
                     views, p)
