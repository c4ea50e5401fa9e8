"""W-MSE (Ermolov et al. 2021; cookbook §2.4 eq. (13)): the embeddings of each random sub-batch of ``w`` samples are
whitened (zero mean, identity covariance: eq. (13)'s constraints, imposed exactly), then the MSE between the
L2-normalized whitened positives is minimized, over every pair of ``wmse.views`` views.

As the reference (htdt/self-supervised): symmetric views (one augmentation for all views, SimCLR-like; its
``aug_transform``), a head Linear -> BN -> ReLU -> Linear (``model.get_head``, ``--head_layers 2``, ``--head_size
1024``) to a 64-d embedding (``--emb``): ``model.projector_*``. "W-MSE 2" / "W-MSE 4" are ``wmse.views=2`` / ``4``.

The sub-batch permutations come from a generator seeded with (seed, step), and rank 0's draw is broadcast: every
process and a resumed run draw the same sub-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView
from selfsup.losses.canonical_correlation import wmse_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views


@dataclass
class WMSEParams:
    views: int = 2          # positives per image: --num_samples (2 = "W-MSE 2"; README's "W-MSE 4" uses 4)
    w: int = 128            # whitening sub-batch size: --w_size (CIFAR commands; 256 for STL-10, Tiny ImageNet)
    iterations: int = 1     # sub-batch draws per step: --w_iter (4 in the README's STL-10 / Tiny ImageNet W-MSE 2)
    eps: float = 0.0        # covariance shrinkage towards the identity: --w_eps (0: none)


class WMSE(Method):
    def __init__(self, encoder, head, view_maker, p: WMSEParams, seed: int):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p, self.seed = encoder, head, view_maker, p, seed

    def forward(self, views: Views, progress: Progress) -> dict:
        feats = forward_views(self.encoder, views.crops)
        zs = forward_views(self.projector, feats)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + progress.step)  # the same on every process
        loss = wmse_loss(zs, self.p.w, self.p.iterations, self.p.eps, generator=gen)
        return {"loss": loss, "features": feats[0], "embedding": zs[0]}


@register("wmse", WMSEParams, family="canonical correlation", cookbook="§2.4 eq. (13)",
          summary="MSE between normalized positives after whitening random sub-batches of w embeddings")
def build(cfg, data: DataInfo) -> WMSE:
    p = cfg.params
    if p.views < 2 or p.iterations < 1 or p.w < 2 or not 0.0 <= p.eps <= 1.0:
        raise ConfigError(f"wmse needs views >= 2, iterations >= 1, w >= 2 and eps in [0, 1], got views={p.views}, "
                         f"iterations={p.iterations}, w={p.w}, eps={p.eps}")
    forward_batch = cfg.batch_size // cfg.train.accumulate  # summed over processes: what one whitening sees
    if forward_batch % p.w:
        raise ConfigError(f"wmse.w={p.w} must divide the batch of each forward ({forward_batch} = batch_size / "
                         f"train.accumulate): change batch_size or wmse.w")
    if p.eps == 0.0 and p.w <= cfg.model.projector_out:
        raise ConfigError(f"wmse.w={p.w} must exceed the embedding size model.projector_out={cfg.model.projector_out} "
                         "to whiten (a covariance of w samples has rank < w): raise wmse.w, lower "
                         "model.projector_out, or set wmse.eps > 0")
    if cfg.views.n_local:
        raise ConfigError("W-MSE compares equal views: set views.n_local=0 and wmse.views for more positives")
    encoder = make_backbone(cfg, data)
    pair = make_views(cfg, "simclr", data)
    views = MultiView([pair.global_cfgs[i % pair.n_global] for i in range(p.views)])
    return WMSE(encoder, make_projector(cfg, encoder.num_features), views, p, cfg.seed)
