"""Decoupled contrastive learning, DCL and DCLW (cookbook Fig. 3; Yeh, Hong, Hsu, Liu, Chen & LeCun 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import check_pair, check_positive, gather, local_offset, upcast


def _decoupled(z1: torch.Tensor, z2: torch.Tensor, temperature: float, sigma: float | None, detach_weight: bool,
               fn: str) -> torch.Tensor:
    check_pair(z1, z2, fn)
    check_positive(temperature, "temperature", fn)
    z1, z2 = F.normalize(upcast(z1), dim=1), F.normalize(upcast(z2), dim=1)
    n = z1.shape[0]
    k1, k2 = gather(z1), gather(z2)
    total = k1.shape[0]
    if total < 2:
        raise ValueError(f"{fn} needs at least 2 samples in the (gathered) batch: with one there is no negative")
    logits = torch.cat([z1, z2]) @ torch.cat([k1, k2]).T / temperature
    local = torch.arange(n, device=z1.device) + local_offset(n)
    rows = torch.arange(2 * n, device=z1.device)
    self_idx = torch.cat([local, local + total])
    pos_idx = torch.cat([local + total, local])
    positive = logits[rows, pos_idx]
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, self_idx] = True
    excluded[rows, pos_idx] = True  # the decoupling: the positive leaves the denominator
    negative = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)
    if sigma is None:
        return (negative - positive).mean()
    a, b = (k1.detach(), k2.detach()) if detach_weight else (k1, k2)
    weight_all = 2 - total * torch.softmax((a * b).sum(1) / sigma, dim=0)  # over the whole (gathered) batch
    weight = weight_all[local].repeat(2)
    return (negative - weight * positive).mean()


def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """DCL: NT-Xent without the positive pair in the denominator (cookbook Fig. 3; Yeh et al. 2022 eq. (6)).

    Over the 2N embeddings of both views, s_ik = cos(z_i, z_k)/tau, i' the other view of i:

        L = 1/(2N) sum_i [ -s_ii' + log sum_{k != i, k != i'} e^{s_ik} ]

    (NT-Xent's denominator also holds e^{s_ii'}.) The loss can be negative; its minimum is not 0.
    `temperature=0.1`: the DCL paper's setting as we read it (Yeh et al. 2022) and the default of the
    public re-implementations (raminnakhli/Decoupled-Contrastive-Learning, lightly's DCLLoss); we could not re-check
    the paper's table. Those implementations sum the two directions (2x this value); we average, like `nt_xent`.

    Distributed: as `nt_xent`: both views gathered with gradient, each process scores its own 2n queries against all
    2N keys (self and positive indices offset by rank * n); the mean over processes is the one-process loss.
    """
    return _decoupled(z1, z2, temperature, None, True, "dcl_loss")


def dclw_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, sigma: float = 0.5,
              detach_weight: bool = True) -> torch.Tensor:
    """DCLW: DCL with the positive term weighted by a negative von Mises-Fisher weight (Yeh et al. 2022, DCLW).

        w_i = 2 - N e^{cos(z_i, z_i')/sigma} / sum_{j=1}^N e^{cos(z_j, z_j')/sigma}      (mean over the batch: 1)
        L = 1/(2N) sum_i [ -w_i s_ii' + log sum_{k != i, k != i'} e^{s_ik} ]

    Easy positives (high cosine) get a weight below 1, hard ones above. The sum over j runs over the whole batch,
    gathered across processes: normalizing over the local batch only (as lightly's DCLWLoss does) changes the loss
    with the number of processes.
    `sigma=0.5`: Yeh et al. 2022's DCLW setting (also the default of both re-implementations named in
    `dcl_loss`; we did not re-check the section). `temperature=0.1`: see `dcl_loss`. `detach_weight=True`: w is a
    weight, not a path for gradients (lightly detaches it; raminnakhli's version does not; we did not check the paper
    on this).

    Distributed: as `dcl_loss`, and w is computed from the gathered cosines of all N pairs.
    """
    check_positive(sigma, "sigma", "dclw_loss")
    return _decoupled(z1, z2, temperature, sigma, detach_weight, "dclw_loss")
