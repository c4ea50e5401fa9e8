"""SwAV (Caron et al. 2020; cookbook §2.4 and §3.1.1 multi-crop): swapped prediction of equipartitioned codes.

The cookbook lists SwAV in the canonical-correlation family but writes no SwAV equation (its eqs. (13)-(14) are
CCA's constraints and DCCAE's objective); the equations below are the SwAV paper's (§3.1). The equipartition
constraint of the codes plays the role of eq. (13)'s spread constraint: the batch cannot collapse onto one prototype.

Defaults are those of every published SwAV run (facebookresearch/swav, ``main_swav.py`` defaults and all
``scripts/swav_*.sh``): ``temperature=0.1``, ``epsilon=0.05``, ``iterations=3`` (``--sinkhorn_iterations``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfsup.distributed import all_reduce_sum_, get_world_size
from selfsup.losses.canonical_correlation._common import at_least_float32, check_embeddings


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes Q of SwAV's online clustering (Caron et al. 2020, §3.1): the entropy-regularized transport

        max_Q Tr(Q^T C^T Z) + epsilon H(Q)  over  {Q >= 0 : Q 1_B = 1_K / K, Q^T 1_K = 1_B / B},

    solved by Q = Diag(u) exp(C^T Z / epsilon) Diag(v), whose scalings u, v come from ``iterations`` alternate
    normalizations: each prototype's total mass to 1/K, then each sample's to 1/B.

    Shape: scores (B_local, K), the prototype scores C^T z of this process's samples (computed without gradient, in
    at least float32). Returns (B_local, K) codes in which every sample's row sums to 1 (the last normalization is
    the samples'), and every prototype's column sums over the whole batch to B/K once converged (3 iterations get
    close). B is the WHOLE batch: the sums over samples are all-reduced, so processes holding parts of a batch get
    the rows of the whole-batch result. The normalizations run in the log domain (logsumexp): the reference's
    exp-then-divide result up to rounding (its first division by the total mass cancels in the first prototype
    normalization), without overflow or 0/0 when scores / epsilon spans thousands (DINO logits over a small
    temperature).
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (batch, prototypes) scores, got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn_knopp: epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be >= 1 (rows sum to 1 only after one), got {iterations}")
    log_q = at_least_float32(scores.detach()) / epsilon
    batch, k = log_q.shape[0] * get_world_size(), log_q.shape[1]
    for _ in range(iterations):
        log_q = log_q - (_logsumexp_over_batch(log_q) + math.log(k))  # each prototype: total mass 1/K
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(batch))  # each sample: mass 1/B
    return torch.exp(log_q + math.log(batch))


def _logsumexp_over_batch(x: torch.Tensor) -> torch.Tensor:
    """log sum_b exp(x[b, k]) over the samples of every process: (B_local, K) -> (1, K)."""
    if get_world_size() == 1:
        return torch.logsumexp(x, dim=0, keepdim=True)
    peak = x.max(dim=0, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak + torch.log(all_reduce_sum_(torch.exp(x - peak).sum(dim=0, keepdim=True)))


def swav_loss(scores: list[torch.Tensor], n_global: int = 2, temperature: float = 0.1, epsilon: float = 0.05,
              iterations: int = 3, queue_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    """SwAV's swapped prediction with multi-crop (Caron et al. 2020, §3.1 swapped prediction, §3.2 multi-crop):

        L = 1/G sum_{i < G} 1/(V-1) sum_{v != i} E_b[ -sum_k q_i[b, k] log softmax(s_v[b] / tau)_k ],

    where s_v = C^T z_v are the prototype scores of crop v, q_i = sinkhorn_knopp(s_i) the code of global crop i
    (computed without gradient: only the predictions are trained), G = ``n_global`` and V = len(scores). This is
    the averaging of the reference (``main_swav.py``: each code's sub-loss over the other V-1 crops, then over
    the ``crops_for_assign``).

    Shape: scores, a list of V >= 2 tensors (B, K), global crops first. ``queue_scores``: None, or one (Q, K)
    tensor per global crop, the scores of queued embeddings from earlier batches under the current prototypes; they
    are put before the batch's rows for Sinkhorn (more samples to equipartition over, for small batches) and only the
    batch's B codes are kept, as in the reference. Defaults and their sources: see the module docstring.

    Distributed: the cross-entropy is a per-sample mean on each process's own samples (DDP's average over equal local
    batches is the whole-batch mean); `sinkhorn_knopp` all-reduces its sums, so the codes are the whole batch's.
    Each process's queue enters Sinkhorn as extra columns, as in the reference (its queue is per process).
    """
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops (codes are predicted from other crops), got {len(scores)}")
    check_embeddings("swav_loss", *scores)
    if not 1 <= n_global <= len(scores):
        raise ValueError(f"swav_loss: n_global must be in [1, {len(scores)}] (the number of crops), got {n_global}")
    if not temperature > 0:
        raise ValueError(f"swav_loss: temperature must be > 0, got {temperature}")
    if queue_scores is not None and len(queue_scores) != n_global:
        raise ValueError(f"swav_loss: queue_scores needs one tensor per global crop ({n_global}), "
                         f"got {len(queue_scores)}")
    batch, k = scores[0].shape
    log_p = [F.log_softmax(at_least_float32(s) / temperature, dim=1) for s in scores]
    loss = log_p[0].new_zeros(())
    for i in range(n_global):
        assign = scores[i].detach()
        if queue_scores is not None:
            queued = queue_scores[i]
            if queued.ndim != 2 or queued.shape[1] != k:
                raise ValueError(f"swav_loss: queue_scores[{i}] must be (Q, {k}), got shape {tuple(queued.shape)}")
            assign = torch.cat([queued.detach().to(assign.dtype), assign])
        q = sinkhorn_knopp(assign, epsilon, iterations)[-batch:]
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i)
        loss = loss + sub / (len(scores) - 1)
    return loss / n_global
