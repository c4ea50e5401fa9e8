"""DeepCluster-v2 (Caron et al. 2020, SwAV paper appendix; cookbook §2.3 / §2.4 clustering): spherical k-means on a
memory bank of every training sample's normalized projection gives one pseudo-label per sample; the network is
trained to classify its crops into those clusters with prototypes set to the centroids.

Reference: facebookresearch/swav ``main_deepclusterv2.py`` (``cluster_memory`` for k-means, ``train`` for the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def kmeans_assign(bank: torch.Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None,
                  chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of the unit rows of ``bank`` (N, D) into ``k`` clusters; returns (labels (N,) int64,
    centroids (k, D) unit rows).

    c_j <- random distinct rows of the bank (``torch.randperm(N, generator)[:k]``), then ``iterations`` times:
        E: a_i = argmax_j <x_i, c_j>          (cosine: rows and centroids are unit vectors)
        M: c_j = normalize(sum_{a_i = j} x_i)  (the normalized mean of its members)
    and a last E step, so that ``labels`` are the argmax-cosine assignments to the returned ``centroids``.
    Empty clusters keep their previous centroid (as the reference: ``centroids[mask] = ...`` for counts > 0 only).
    Defaults: 10 iterations (``cluster_memory(..., nmb_kmeans_iters=10)``). ``chunk`` rows per E-step block bounds
    the (chunk, k) score matrix; it does not change the result.
    """
    if bank.ndim != 2:
        raise ValueError(f"kmeans_assign needs a (N, D) bank, got shape {tuple(bank.shape)}")
    n = bank.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means into k={k} clusters needs 1 <= k <= the number of bank rows ({n}): reduce the "
                         "number of prototypes or use a larger data set")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    pick = torch.randperm(n, generator=generator)[:k].to(bank.device)
    centroids = bank[pick].clone()

    def assign(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([(bank[i:i + chunk] @ c.T).argmax(dim=1) for i in range(0, n, chunk)])

    for _ in range(iterations):
        labels = assign(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, bank)
        counts = torch.bincount(labels, minlength=k)
        full = counts > 0
        centroids[full] = F.normalize(sums[full], dim=1)
    return assign(centroids), centroids


def deepcluster_loss(scores: list[torch.Tensor], targets: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy of every crop's prototype scores against its samples' pseudo-labels:

        L = mean over crops v and samples i of  -log softmax(s_{v,i} / tau)[y_i]

    ``scores``: one (B, K) tensor per crop (cosines to the prototypes), ``targets``: (B,) labels in [0, K).
    tau = 0.1: ``--temperature`` (main_deepclusterv2.py and every published script). The reference's
    ``CrossEntropyLoss`` over all crops concatenated is this mean when the crops share a batch size.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.cat(scores) / temperature
    return F.cross_entropy(logits, targets.repeat(len(scores)))
