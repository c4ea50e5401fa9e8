"""The ancestors of InfoNCE (cookbook §2.2, Fig. 2): margin contrastive loss, NCA, triplet loss, (N+1)-tuple loss.

All distances are Euclidean on the embeddings as given (no normalization: eqs. (1)-(4) are written on raw z), computed
pairwise without the |a|^2 + |b|^2 - 2ab shortcut, so near-duplicates get exact distances and finite gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import (
    check_embeddings,
    check_labels,
    check_pair,
    check_positive,
    gather,
    gather_nograd,
    local_offset,
    share_of_mean,
    upcast,
)

TRIPLET_MINING = ("hard", "semi-hard", "all")
NCA_NORMALIZATION = ("anchor", "global")


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def margin_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, same: torch.Tensor, margin: float = 1.0,
                            squared: bool = True) -> torch.Tensor:
    """Margin contrastive loss on pairs (cookbook eq. (1); Hadsell, Chopra & LeCun 2006, eq. (4)).

    Pair b is (z1[b], z2[b]) with D_b = ||z1[b] - z2[b]||_2 and target same[b] (True: a positive pair).

        squared=True  (Hadsell et al. 2006):  l_b = same_b * 1/2 D_b^2 + (1 - same_b) * 1/2 [m - D_b]_+^2
        squared=False (cookbook eq. (1) as printed):  l_b = same_b * D_b + (1 - same_b) * [m - D_b]_+^2
        L = 1/B sum_b l_b          (the equations sum; we average, so the scale does not grow with the batch)

    `margin=1.0`: the conventional value (TensorFlow's `contrastive_loss` default); Hadsell et al. choose m per
    experiment and we could not confirm a single value from the paper. `squared=True` by default because the unsquared
    pull of eq. (1) has no gradient at D = 0 and differs from the loss the cookbook cites.

    Distributed: a sum of independent pair terms, no batch statistic and no gather; with the same number of pairs on
    every process the mean over processes is the one-process mean.
    """
    fn = "margin_contrastive_loss"
    check_pair(z1, z2, fn)
    check_positive(margin, "margin", fn)
    if same.shape != (z1.shape[0],):
        raise ValueError(f"{fn}: same must have shape ({z1.shape[0]},), one target per pair, got {tuple(same.shape)}")
    z1, z2 = upcast(z1), upcast(z2)
    diff = z1 - z2
    d = torch.linalg.vector_norm(diff, dim=1)
    s = same.to(d.dtype)
    push = F.relu(margin - d).pow(2)
    if squared:
        return (0.5 * (s * diff.pow(2).sum(1) + (1 - s) * push)).mean()
    return (s * d + (1 - s) * push).mean()


def nca_loss(z: torch.Tensor, labels: torch.Tensor | None, normalization: str = "anchor") -> torch.Tensor:
    """Neighbourhood Component Analysis (cookbook eq. (2); Goldberger, Roweis, Hinton & Salakhutdinov 2005).

    With d_ij = ||z_i - z_j||_2^2 and P the ordered pairs (i, j), i != j, of the same class:

        normalization="anchor" (Goldberger et al. 2005): p_ij = e^{-d_ij} / sum_{k != i} e^{-d_ik},
            L = -1/N sum_i sum_{j: (i,j) in P} p_ij          (minus the expected leave-one-out accuracy)
        normalization="global" (cookbook eq. (2) as printed):
            L = - sum_{(i,j) in P} e^{-d_ij} / sum_{(k,l), k != l} e^{-d_kl}
            (eq. (2)'s denominator runs over [N]^2; we drop the N self-pairs k = l, which contribute e^0 = 1 each and
            are excluded by NCA's own p_ii = 0)

    No temperature: NCA learns the metric's scale. Default "anchor" because it is NCA as published.

    Distributed: "anchor" scores this process's anchors against all gathered samples (labels gathered too) and averages
    over its anchors; "global" computes the whole-batch loss on every process. Both equal the one-process loss and
    gradients (see `_common`).
    """
    fn = "nca_loss"
    check_embeddings(z, fn)
    check_labels(labels, z.shape[0], fn)
    if normalization not in NCA_NORMALIZATION:
        raise ValueError(f"{fn}: normalization must be one of {NCA_NORMALIZATION}, got {normalization!r}")
    z, labels = upcast(z), labels.to(z.device)  # NCCL gathers device tensors only
    keys, key_labels = gather(z), gather_nograd(labels)
    total = keys.shape[0]
    if total < 2:
        raise ValueError(f"{fn} needs at least 2 samples in the (gathered) batch, got {total}")
    if normalization == "global":
        eye = torch.eye(total, dtype=torch.bool, device=z.device)
        logits = (-_dist(keys, keys).pow(2)).masked_fill(eye, float("-inf"))
        p = torch.softmax(logits.flatten(), dim=0).view(total, total)
        positive = (key_labels[:, None] == key_labels[None, :]) & ~eye
        return -(p * positive).sum()
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)
    self_mask = torch.zeros(n, total, dtype=torch.bool, device=z.device)
    self_mask[rows, rows + local_offset(n)] = True
    p = torch.softmax((-_dist(z, keys).pow(2)).masked_fill(self_mask, float("-inf")), dim=1)
    positive = (labels[:, None] == key_labels[None, :]) & ~self_mask
    return -(p * positive).sum(1).mean()


def triplet_loss(z: torch.Tensor, labels: torch.Tensor | None, margin: float = 0.2, mining: str = "hard",
                 squared: bool = False) -> torch.Tensor:
    """Triplet loss with in-batch mining (cookbook eq. (3); Weinberger & Saul 2009, Schroff et al. 2015).

    Anchors a, positives p (same label, p != a), negatives n (other label), D = ||z_a - z_x||_2 (squared=True: D^2):

        mining="all"       (eq. (3)): mean over every valid (a, p, n) of [D_ap - D_an + m]_+
        mining="hard"      (batch hard, Hermans, Beyer & Leibe 2017):
                           mean over anchors of [max_p D_ap - min_n D_an + m]_+
        mining="semi-hard" (FaceNet, Schroff et al. 2015 §3.2): for each (a, p), the closest negative farther than
                           the positive, D_an > D_ap; where none is, the farthest negative (we found no rule for that
                           case in the paper; this is TensorFlow's `triplet_semihard_loss` rule). Mean over (a, p).

    Anchors with no positive or no negative in the batch are skipped, and the mean runs over what is left (the "all"
    mean counts zero-loss triplets too; Hermans et al.'s "batch all" averages over non-zero ones only).
    `margin=0.2`: FaceNet's alpha = 0.2 (Schroff et al. 2015). `squared=False`: Hermans et al. 2017 found plain
    Euclidean distances more stable than squared ones; FaceNet uses squared distances of unit vectors (squared=True,
    normalize z first). "all" holds a (n, N, N) tensor: keep it to small batches.

    Distributed: this process's anchors against all gathered samples and labels; the number of valid anchors / pairs
    differs per process, so each returns W * (its sum) / (global count), whose mean over processes is the
    one-process mean (`_common.share_of_mean`).
    """
    fn = "triplet_loss"
    check_embeddings(z, fn)
    check_labels(labels, z.shape[0], fn)
    check_positive(margin, "margin", fn)
    if mining not in TRIPLET_MINING:
        raise ValueError(f"{fn}: mining must be one of {TRIPLET_MINING}, got {mining!r}")
    z, labels = upcast(z), labels.to(z.device)  # NCCL gathers device tensors only
    keys, key_labels = gather(z), gather_nograd(labels)
    n, total = z.shape[0], keys.shape[0]
    d = _dist(z, keys)
    if squared:
        d = d.pow(2)
    rows = torch.arange(n, device=z.device)
    self_mask = torch.zeros(n, total, dtype=torch.bool, device=z.device)
    self_mask[rows, rows + local_offset(n)] = True
    same = labels[:, None] == key_labels[None, :]
    pos, neg = same & ~self_mask, ~same
    # the same masks for every anchor of the gathered batch give the global count of terms, from labels alone
    same_all = key_labels[:, None] == key_labels[None, :]
    pos_all = same_all & ~torch.eye(total, dtype=torch.bool, device=z.device)
    has_neg_all = (~same_all).any(1)
    has_neg = neg.any(1)
    inf = torch.full_like(d, float("inf"))
    if mining == "hard":
        valid = pos.any(1) & has_neg
        hardest_pos = torch.where(pos, d, -inf).amax(1)
        hardest_neg = torch.where(neg, d, inf).amin(1)
        gap = torch.where(valid, hardest_pos - hardest_neg, torch.zeros_like(hardest_pos))
        terms = F.relu(gap + margin) * valid
        count = (pos_all.any(1) & has_neg_all).sum()
    elif mining == "semi-hard":
        neg_sorted, order = torch.where(neg, d, inf).sort(dim=1)
        first_farther = torch.searchsorted(neg_sorted.detach().contiguous(), d.detach().contiguous(), right=True)
        n_neg = neg.sum(1, keepdim=True)
        farthest = order.gather(1, (n_neg - 1).clamp(min=0))
        chosen = torch.where(first_farther < n_neg, order.gather(1, first_farther.clamp(max=total - 1)), farthest)
        valid = pos & has_neg[:, None]
        terms = F.relu(d - d.gather(1, chosen) + margin) * valid
        count = (pos_all & has_neg_all[:, None]).sum()
    else:
        valid = pos[:, :, None] & neg[:, None, :]
        terms = F.relu(d[:, :, None] - d[:, None, :] + margin) * valid
        count = (pos_all.sum(1) * (~same_all).sum(1)).sum()
    return share_of_mean(terms.sum(), count)


def n_pair_loss(anchors: torch.Tensor, positives: torch.Tensor, l2_reg: float = 0.002) -> torch.Tensor:
    """(N+1)-tuple / multi-class N-pair loss (cookbook eq. (4); Sohn 2016).

    N pairs (a_i, p_i) of N distinct classes (in SSL: N images, two views each); the other pairs' positives are the
    negatives of a_i ("N-pair-mc"):

        L = 1/N sum_i -log( e^{<a_i, p_i>} / sum_j e^{<a_i, p_j>} )
          = 1/N sum_i log(1 + sum_{j != i} e^{<a_i, p_j> - <a_i, p_i>})
            + l2_reg / 4 * (1/N sum_i ||a_i||^2 + 1/N sum_i ||p_i||^2)     (eq. (4)'s beta ||Z||_F^2)

    Raw inner products, no temperature and no normalization, as in Sohn 2016 (which therefore needs the norm penalty).
    `l2_reg=0.002` with the 1/4 factor: TensorFlow's reference `npairs_loss` (reg_lambda=0.002); Sohn 2016 regularizes
    the embedding norm but we could not confirm its coefficient from the paper.

    Distributed: this process's anchors against all gathered positives (targets offset by rank * n); the penalty is
    a mean over local rows. Mean over processes = one-process loss.
    """
    fn = "n_pair_loss"
    check_pair(anchors, positives, fn, ("anchors", "positives"))
    if l2_reg < 0:
        raise ValueError(f"{fn}: l2_reg must be >= 0, got {l2_reg}")
    a, p = upcast(anchors), upcast(positives)
    n = a.shape[0]
    logits = a @ gather(p).T
    target = torch.arange(n, device=a.device) + local_offset(n)
    penalty = 0.25 * l2_reg * (a.pow(2).sum(1).mean() + p.pow(2).sum(1).mean())
    return F.cross_entropy(logits, target) + penalty
