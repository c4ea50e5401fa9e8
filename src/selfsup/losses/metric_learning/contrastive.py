"""Deep metric learning family (cookbook §2.2): the InfoNCE / NT-Xent loss of SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad, get_rank
from selfsup.losses.metric_learning._common import upcast


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent, the normalized-temperature InfoNCE of SimCLR (cookbook eq. (6), Fig. 3; Chen et al. 2020).

        L = -1/(2N) sum_i [ log e^{cos(z_i, z_i')/tau} / sum_{k != i} e^{cos(z_i, z_k)/tau} ]

    over the 2N embeddings of both views: each embedding's positive is the other view of its image, its negatives are
    the other 2N-2 embeddings. `temperature=0.1`: SimCLR's ImageNet setting (Chen et al. 2020, Table 5 and §B.9);
    recipes override it.

    Distributed: embeddings of every process are gathered with gradient (cookbook Algorithm 1); each process computes
    the loss of its own 2n queries against all 2N keys, with the positive and self indices offset by rank * n, so the
    mean over processes equals the one-process loss on the whole batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent expects two (batch, dim) tensors of the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    z1 = F.normalize(upcast(z1), dim=1)  # half precision -> float32; float64 stays float64
    z2 = F.normalize(upcast(z2), dim=1)
    n = z1.shape[0]
    k1, k2 = gather_with_grad(z1), gather_with_grad(z2)
    total = k1.shape[0]
    queries = torch.cat([z1, z2])
    keys = torch.cat([k1, k2])
    logits = queries @ keys.T / temperature
    local = torch.arange(n, device=z1.device) + get_rank() * n
    self_idx = torch.cat([local, local + total])
    pos_idx = torch.cat([local + total, local])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=z1.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def multi_view_nt_xent(zs: list[torch.Tensor], n_global: int = 2, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent with multi-crop (cookbook §3.1.1): each global view is paired with every other view, big or small.

    Each unordered pair {g_i, v_j} (g_i global, v_j any other view) is counted once and the pair losses are averaged:
    2 global and M local crops give 1 + 2M pairs. Two views reduce exactly to `nt_xent`.
    """
    pairs = [(i, j) for i in range(n_global) for j in range(len(zs)) if j != i and not (j < n_global and j < i)]
    if not pairs:
        raise ValueError("multi_view_nt_xent needs at least two views")
    return sum(nt_xent(zs[i], zs[j], temperature) for i, j in pairs) / len(pairs)
