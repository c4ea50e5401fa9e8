"""DeepCluster-v2 (Caron et al. 2020, appendix of the SwAV paper; cookbook §2.3 eq. (8), the self-distillation
family's history): the targets are the k-means clusters of the network's own embeddings of the whole training set,
recomputed once per epoch; every crop is classified into its sample's cluster, with prototypes set to the centroids.

As the reference (facebookresearch/swav ``main_deepclusterv2.py``): a projection MLP (2048 hidden -> 128,
``model.projector_*``) whose output is L2-normalized, several prototype sets (heads; ``--nmb_prototypes 3000 3000
3000``), multi-crop, one memory bank per global crop (``--crops_for_assign 0 1``) holding the normalized projection
of every training sample, overwritten with the sample's newest embedding after each step (``MemoryBank`` with
momentum 0); head h clusters bank ``h % n_global``. At the start of each epoch, spherical k-means
(:func:`selfsup.losses.self_distillation.deepcluster.kmeans_assign`) on the bank gives each sample a pseudo-label per
head and the centroids, which REPLACE the head's prototype weights; the loss is the mean over heads of the
cross-entropy of softmax(prototype scores / tau) of every crop against its sample's label.

The prototypes are never trained by default (``freeze_prototypes``): the reference's ``--freeze_prototypes_niters
300000`` exceeds its 800 x 313 = 250400 steps, so they only ever hold the centroids.

First epoch: the reference fills its banks before training with a no-grad pass of the untrained network over the
data (``init_memory``). Here epoch 0 is that pass (``fill_banks``): the global crops go through the network without
gradients and fill the banks, the loss is an exact zero (every gradient is dropped in ``before_optimizer_step``, so
the optimizer leaves the parameters as they are), and the first k-means runs at the first step of epoch 1. It costs
one forward epoch of the global crops, as the reference's pass does (``train.budget`` times it apart from the
training steps).

Samples the previous epoch did not see (a dropped last batch) keep their older bank row (the reference gives them
the ignored label -100). Every process holds the same banks (every process's rows are gathered in rank order), runs
k-means with the same generator seeded from (``seed``, epoch, head), and then takes rank 0's result by broadcast,
so that non-deterministic GPU sums cannot split the processes. Labels, centroids (the prototypes) and the epoch last
clustered are buffers: a resume in the middle of an epoch finds them as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as du
from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation.deepcluster import deepcluster_loss, kmeans_assign
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views
from selfsup.nn.queues import MemoryBank


@dataclass
class DeepClusterV2Params:
    prototypes: list[int] = field(default_factory=lambda: [3000, 3000, 3000])  # --nmb_prototypes 3000 3000 3000
    temperature: float = 0.1            # --temperature 0.1
    kmeans_iterations: int = 10         # cluster_memory(..., nmb_kmeans_iters=10)
    freeze_prototypes: bool = True      # --freeze_prototypes_niters 300000 > every run's steps: never trained


def cluster_sizes(p: DeepClusterV2Params) -> list[int]:
    """K of every head (one head per entry of ``prototypes``; H heads of K clusters: ``[K, K, ...]``)."""
    ks = [p.prototypes] if isinstance(p.prototypes, int) else list(p.prototypes)
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"deepcluster_v2.prototypes must be a non-empty list of cluster counts >= 1, "
                          f"got {p.prototypes}")
    return [int(k) for k in ks]


class DeepClusterV2(Method):
    def __init__(self, encoder, projector, view_maker, ks: list[int], num_samples: int, seed: int,
                 p: DeepClusterV2Params):
        super().__init__()
        self.encoder, self.projector, self.view_maker, self.p, self.seed = encoder, projector, view_maker, p, seed
        dim = projector.out_dim
        self.prototypes = nn.ModuleList([nn.Linear(dim, k, bias=False) for k in ks])
        with torch.no_grad():
            for w in self.prototypes:
                w.weight.copy_(F.normalize(w.weight, dim=1))
        self.banks = nn.ModuleList([MemoryBank(num_samples, dim, momentum=0.0, seed=seed + i)
                                    for i in range(view_maker.n_global)])
        self.register_buffer("labels", torch.zeros(len(ks), num_samples, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))  # -1: no k-means yet

    @property
    def guillotine_head(self):
        return self.projector if isinstance(self.projector, nn.Sequential) else None

    def kmeans_generator(self, epoch: int, head: int) -> torch.Generator:
        """The same generator on every process and on resume: seeded from (seed, epoch, head)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 101 + head)

    @torch.no_grad()
    def cluster(self, epoch: int) -> None:
        """k-means of every head on its bank; the labels and the centroids (into the prototypes) of rank 0."""
        for h, proto in enumerate(self.prototypes):
            bank = self.banks[h % len(self.banks)].bank
            with torch.autocast(bank.device.type, enabled=False):  # float32 cosines: no low-precision ties
                labels, centroids = kmeans_assign(bank.float(), proto.out_features, self.p.kmeans_iterations,
                                                  self.kmeans_generator(epoch, h))
            if du.get_world_size() > 1:
                dist.broadcast(labels, 0)
                dist.broadcast(centroids, 0)
            self.labels[h].copy_(labels)
            proto.weight.copy_(centroids.to(proto.weight.dtype))
        self.clustered_epoch.fill_(epoch)

    def forward(self, views: Views, progress: Progress) -> dict:
        if views.index is None:
            raise ValueError("DeepCluster-v2 needs each sample's row in the training set (Views.index) for its memory "
                             "bank and pseudo-labels; the trainer provides it")
        if progress.epoch >= 1 and int(self.clustered_epoch) != progress.epoch:
            self.cluster(progress.epoch)  # once per epoch, at its first step (any micro-batch order)
        if int(self.clustered_epoch) < 0:  # epoch 0: filling the banks, no pseudo-labels yet
            return self.fill_banks(views)
        feats = forward_views(self.encoder, views.crops)
        zs = [F.normalize(z, dim=1) for z in forward_views(self.projector, feats)]
        for bank, z in zip(self.banks, zs[: views.n_global]):
            bank.stage(views.index, z)
        index = views.index.to(self.labels.device)
        losses = [deepcluster_loss(forward_views(proto, zs), self.labels[h][index], self.p.temperature)
                  for h, proto in enumerate(self.prototypes)]
        return {"loss": torch.stack(losses).mean(), "features": feats[0], "clustering_on": 1.0}

    def fill_banks(self, views: Views) -> dict:
        """Epoch 0, the reference's ``init_memory``: a no-grad pass of the global crops that fills the banks. The
        loss is an exact zero tied to every parameter (so that backward, DDP's reducer and gradient accumulation run
        as on any step); ``before_optimizer_step`` then drops the zero gradients and no parameter moves."""
        with torch.no_grad():
            feats = forward_views(self.encoder, views.crops[: views.n_global])
            zs = [F.normalize(z, dim=1) for z in forward_views(self.projector, feats)]
        for bank, z in zip(self.banks, zs):
            bank.stage(views.index, z)
        # one element of each parameter, indexed (not viewed: a channels_last weight has no flat view)
        zero = torch.stack([q[(0,) * q.ndim] for q in self.parameters() if q.requires_grad]).sum() * 0.0
        return {"loss": zero, "features": feats[0], "clustering_on": 0.0}

    def before_optimizer_step(self, progress: Progress) -> None:
        if int(self.clustered_epoch) < 0:  # epoch 0: the reference's init_memory pass changes no parameter
            for q in self.parameters():
                q.grad = None
        elif self.p.freeze_prototypes:
            for proto in self.prototypes:
                proto.weight.grad = None

    def on_step_end(self, progress: Progress) -> dict:
        for bank in self.banks:
            bank.commit()
        if not self.p.freeze_prototypes:  # trained prototypes stay unit rows, as SwAV's
            with torch.no_grad():
                for proto in self.prototypes:
                    proto.weight.copy_(F.normalize(proto.weight, dim=1))
        return {}


@register("deepcluster_v2", DeepClusterV2Params, family="self-distillation", cookbook="§2.3 eq. (8) / §2.4 clustering",
          summary="per-epoch spherical k-means of a memory bank gives pseudo-labels; crops classified into them")
def build(cfg, data: DataInfo) -> DeepClusterV2:
    p = cfg.params
    if data.num_samples is None:
        raise ValueError("DeepCluster-v2 keeps one memory row and one pseudo-label per training sample, so it needs "
                         "the data set's size (DataInfo.num_samples)")
    ks = cluster_sizes(p)
    if max(ks) > data.num_samples:
        raise ConfigError(f"deepcluster_v2.prototypes={ks}: k-means cannot make more clusters than the "
                          f"{data.num_samples} training samples; reduce them")
    if p.temperature <= 0 or p.kmeans_iterations < 0:
        raise ConfigError(f"deepcluster_v2 needs temperature > 0 and kmeans_iterations >= 0, got {p.temperature}, "
                          f"{p.kmeans_iterations}")
    encoder = make_backbone(cfg, data)
    return DeepClusterV2(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "multicrop", data), ks,
                         data.num_samples, cfg.seed, p)
