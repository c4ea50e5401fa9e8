"""Shuffled batch normalization for a key encoder (MoCo, He et al. 2020, §3.3 "Shuffling BN").

With a queue of old keys, a query and its positive key computed with the statistics of the same batch let the model
"cheat": the batch statistics identify the positive among negatives that came from other batches. MoCo shuffles the
batch across its 8 GPUs before the key encoder, so each key is normalized with the statistics of a different random
group of samples than its query.

:func:`shuffled_bn_forward` does that for any number of processes, one included: the whole batch (gathered, without
gradient: keys need none) is permuted with a permutation every process draws from the same seed, cut into ``groups``
equal groups, each process encodes ``groups / world`` of them, and the keys are gathered back and un-permuted. Every
group's statistics come from the same samples whatever the number of processes, so W processes compute the keys
exactly as one does, and no process encodes more than its share.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.distributed import get_rank, get_world_size
from selfsup.nn.queues import gather_rows


@torch.no_grad()
def shuffled_bn_forward(module: nn.Module, x: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """``module`` applied to ``x`` (this process's rows) in ``groups`` random groups of the whole batch; returns this
    process's outputs in ``x``'s order. ``seed`` must be the same on every process (e.g. derived from the step)."""
    world, rank = get_world_size(), get_rank()
    if groups < 1 or groups % world:
        raise ValueError(f"shuffle_bn_groups={groups} must be a positive multiple of the number of processes "
                         f"({world}): each process encodes the same number of groups")
    full = gather_rows(x)
    n_all = full.shape[0]
    if n_all % groups or n_all // groups < 2:
        raise ValueError(f"the batch of {n_all} does not split into {groups} groups of >= 2 samples (batch norm "
                         "needs 2); use a batch size divisible by shuffle_bn_groups, or fewer groups")
    perm = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed)).to(x.device)
    per = groups // world
    chunks = full[perm].chunk(groups)[rank * per:(rank + 1) * per]
    out = gather_rows(torch.cat([module(c) for c in chunks]))
    restored = torch.empty_like(out)
    restored[perm] = out
    n = x.shape[0]
    return restored[rank * n:(rank + 1) * n]
