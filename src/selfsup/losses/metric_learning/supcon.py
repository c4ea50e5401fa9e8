"""Supervised contrastive loss, L^sup_out (Khosla et al. 2020, eq. (2); cookbook §2.2, "many positive views")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import (
    check_embeddings,
    check_labels,
    check_positive,
    gather,
    gather_nograd,
    local_offset,
    share_of_mean,
    upcast,
)


def supcon_loss(zs: list[torch.Tensor], labels: torch.Tensor | None, temperature: float = 0.1) -> torch.Tensor:
    """SupCon, L^sup_out: every view of every same-label sample is a positive (Khosla et al. 2020, eq. (2)).

    The V views of B samples give A = V*B anchors; for anchor i, P(i) = the other anchors with i's label (its own
    other views included) and s_ia = cos(z_i, z_a)/tau:

        L = 1/|I| sum_{i in I} -1/|P(i)| sum_{p in P(i)} log( e^{s_ip} / sum_{a != i} e^{s_ia} )

    where I is the anchors with at least one positive (all of them when V >= 2; with one view, a sample whose label
    is alone in the batch is skipped). With all-distinct labels and V = 2 this is NT-Xent (SimCLR).
    `temperature=0.1`: Khosla et al. 2020 §4 (their reference code's default is 0.07 and multiplies the loss by
    tau / 0.07 ("base_temperature"), a constant factor we leave out).

    Distributed: every view and the labels are gathered (views with gradient); each process scores its own V*n anchors
    against all V*N; the count of anchors with a positive comes from the gathered labels, and each process returns
    W * (its sum) / (global count), so the mean over processes is the one-process loss.
    """
    fn = "supcon_loss"
    if not isinstance(zs, (list, tuple)) or len(zs) == 0:
        raise ValueError(f"{fn} expects a non-empty list of (batch, dim) views, got {type(zs).__name__}")
    check_embeddings(zs[0], fn, "zs[0]")
    for v, z in enumerate(zs):
        if z.shape != zs[0].shape:
            raise ValueError(f"{fn}: every view must have the shape of zs[0] {tuple(zs[0].shape)}, zs[{v}] has "
                             f"{tuple(z.shape)}")
    check_labels(labels, zs[0].shape[0], fn)
    check_positive(temperature, "temperature", fn)
    views = [F.normalize(upcast(z), dim=1) for z in zs]
    n_views, n = len(views), views[0].shape[0]
    keys = torch.cat([gather(z) for z in views])  # view-major: view v of gathered sample j is row v * N + j
    labels = labels.to(views[0].device)  # NCCL gathers device tensors only
    all_labels = gather_nograd(labels)
    total = all_labels.shape[0]
    anchors = torch.cat(views)
    logits = anchors @ keys.T / temperature
    local = torch.arange(n, device=anchors.device) + local_offset(n)
    self_idx = torch.cat([local + v * total for v in range(n_views)])
    rows = torch.arange(n_views * n, device=anchors.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positive = (labels.repeat(n_views)[:, None] == all_labels.repeat(n_views)[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / n_pos.clamp(min=1)
    if n_views >= 2:
        count = n_views * total
    else:
        count = ((all_labels[:, None] == all_labels[None, :]).sum(1) >= 2).sum()
    return share_of_mean(per_anchor.sum(), count)


supcon = supcon_loss
