"""InfoNCE between queries and keys (cookbook eq. (6); Oord et al. 2018) as MoCo v2 (queue) and v3 (batch) use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import check_pair, check_positive, gather, local_offset, upcast


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor | None = None, temperature: float = 0.2,
             scale_by_2tau: bool = False) -> torch.Tensor:
    """InfoNCE, one direction: query q_i must pick its key k_i (cookbook eq. (6)).

        L = -1/B sum_i log( e^{cos(q_i, k_i)/tau} / (e^{cos(q_i, k_i)/tau} + sum_{n in neg(i)} e^{cos(q_i, n)/tau}) )

    negatives (Q, D) given (MoCo, He et al. 2020; MoCo v2, Chen et al. 2020): the negatives are the rows of the queue,
        the same for every query; logits [q.k, q.queue], target 0. The queue is detached here.
    negatives=None (MoCo v3, Chen, Xie & He 2021, Alg. 1): the negatives are the other keys of the whole batch:
        logits q @ all_keys.T, target the query's own key (rank * B + i under DDP).

    q and k are L2-normalized (cosine similarity, as in eq. (6)); the queue rows are renormalized too (a no-op for a
    MoCo queue, which stores normalized keys). Whether k carries gradient is the caller's choice: MoCo computes keys
    with the momentum encoder under no_grad.
    `temperature=0.2`: MoCo v2 (Chen, Fan, Girshick & He 2020, "Improved baselines with momentum contrastive
    learning"; MoCo v1 used 0.07, moco's main_moco.py default). MoCo v3 uses t=0.2 for ViTs (moco-v3 CONFIG.md,
    --moco-t=.2) and t=1.0 for ResNet-50 (moco-v3 main_moco.py default, used by its ResNet-50 commands).
    `scale_by_2tau`: MoCo v3 multiplies each direction's cross-entropy by 2 * tau (moco-v3 `builder.py`,
    `ctr_loss(...) * (2 * self.T)`; paper Alg. 1), which cancels the 1/tau factor of the logits' gradient; off by
    default so the value is eq. (6). MoCo v3's symmetric loss is `info_nce(q1, k2) + info_nce(q2, k1)` with that scale.

    Distributed: with negatives=None the keys are gathered with gradient and each process scores its own queries
    (targets offset by rank * B): the mean over processes equals the one-process loss, gradients included. With a
    queue the loss is per query and needs no gather (the queue must hold the same rows on every process).
    """
    fn = "info_nce"
    check_pair(q, k, fn, ("q", "k"))
    check_positive(temperature, "temperature", fn)
    q, k = F.normalize(upcast(q), dim=1), F.normalize(upcast(k), dim=1)
    n = q.shape[0]
    if negatives is not None:
        if negatives.ndim != 2 or negatives.shape[1] != q.shape[1]:
            raise ValueError(f"{fn}: negatives must be (Q, {q.shape[1]}) to match q's dimension, got "
                             f"{tuple(negatives.shape)}")
        queue = F.normalize(upcast(negatives.detach()).to(q.dtype), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
        target = torch.zeros(n, dtype=torch.long, device=q.device)
    else:
        logits = q @ gather(k).T / temperature
        target = torch.arange(n, device=q.device) + local_offset(n)
    loss = F.cross_entropy(logits, target)
    return loss * (2 * temperature) if scale_by_2tau else loss
