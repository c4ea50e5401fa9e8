"""MSN (Assran et al. 2022, "Masked Siamese Networks"; cookbook §2.3) and its prior matching (cookbook §3.3; Assran
et al. 2023, "The Hidden Uniform Cluster Prior in Self-Supervised Learning", PMSN).

Masked anchor views and an unmasked target view are compared through their soft assignments to K shared,
L2-normalized prototypes. The loss is the cross-entropy H(q, p) from the sharpened target assignment q to each anchor
assignment p, plus a regularizer on the mean anchor assignment p_bar over the whole batch (every process):

    L = 1/(V B) sum_{v, b} H(q_b, p_{v, b}) + lambda * KL(p_bar || prior),

which with the uniform prior is MSN's mean-entropy maximization, -H(p_bar) + log K (``me_max``), and with a
power-law prior PMSN's prior matching, the remedy the cookbook (§3.3) gives for class-imbalanced pretraining data.
Defaults are those of the released MSN code (facebookresearch/msn, ``src/losses.py`` and
``configs/pretrain/msn_vits16.yaml``) unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad
from selfsup.losses.canonical_correlation.swav import sinkhorn_knopp


def power_law_prior(num_prototypes: int, tau: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """PMSN's power-law prior (Assran et al. 2023): prior_k = k^(-tau) / sum_j j^(-tau), k = 1..K.

    The prototypes are ordered by index: prototype 0 is asked to hold the most mass. ``tau = 0`` is the uniform
    prior 1/K (MSN); a larger ``tau`` a longer tail. Returns a (K,) probability vector.
    """
    if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
        raise ValueError(f"power_law_prior: num_prototypes must be a positive int, got {num_prototypes!r}")
    if not (isinstance(tau, (int, float)) and tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"power_law_prior: tau (the exponent) must be a finite number >= 0, got {tau!r}")
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float64)
    prior = k.pow(-float(tau))
    return (prior / prior.sum()).to(dtype=dtype, device=device)


def msn_probs(z: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """MSN's soft assignment (Assran et al. 2022, §3): p = softmax(cos(z, prototypes) / tau), in at least
    float32. tau = 0.1: ``criterion.temperature`` of the released ViT-S/16 config."""
    if not temperature > 0:
        raise ValueError(f"msn_probs: temperature must be > 0, got {temperature}")
    return F.softmax(msn_scores(z, prototypes) / temperature, dim=-1)


def msn_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B, K) between embeddings z (B, d) and prototypes (K, d), in at least float32."""
    if z.ndim != 2 or prototypes.ndim != 2 or z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"msn_scores: need z (B, d) and prototypes (K, d) with the same d, got {tuple(z.shape)} and "
                         f"{tuple(prototypes.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    return F.normalize(z.to(dtype), dim=-1) @ F.normalize(prototypes.to(dtype), dim=-1).t()


@torch.no_grad()
def msn_target_probs(z: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1, sharpen: float = 0.25,
                     use_sinkhorn: bool = False, sinkhorn_iterations: int = 3) -> torch.Tensor:
    """The target q = sharpen(softmax(cos(z, prototypes) / tau), T), without gradient (Assran et al. 2022, §3).

    sharpen(p, T)_k = p_k^(1/T) / sum_j p_j^(1/T), so q = softmax(cos / (tau T)): with tau = 0.1 and T = 0.25
    (``criterion.start_sharpen`` = ``final_sharpen``: constant) the target temperature is 0.025; it is computed in
    that form, which never raises an underflowed probability to a power. ``use_sinkhorn`` (released config: true)
    then equipartitions q over the whole batch with SwAV's Sinkhorn-Knopp (3 iterations, ``distributed_sinkhorn``):
    the reference runs it on q itself, here as Sinkhorn-Knopp on the scores log q with epsilon 1 (q's per-sample
    normalization does not cancel in the first prototype normalization, so the raw cosines would differ).
    """
    if not sharpen > 0:
        raise ValueError(f"msn_target_probs: the sharpening temperature T must be > 0, got {sharpen}")
    if not temperature > 0:
        raise ValueError(f"msn_target_probs: temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(msn_scores(z.detach(), prototypes.detach()) / (temperature * sharpen), dim=-1)
    if use_sinkhorn:
        return sinkhorn_knopp(log_q, epsilon=1.0, iterations=sinkhorn_iterations)
    return log_q.exp()


def mean_prediction(anchor_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """p_bar (K,): the mean anchor assignment over every anchor row of the WHOLE batch, all processes included.

    Each process's mean is all-gathered with its autograd graph (``gather_with_grad``: the backward sums every
    process's gradient, which DDP's average turns into the whole-batch gradient), so every process's assignments
    are pushed by the regularizer of the whole batch. Processes must hold the same number of rows (as under DDP).
    """
    local = torch.cat(list(anchor_probs)).mean(dim=0, keepdim=True)
    return gather_with_grad(local).mean(dim=0)


def prior_kl(mean_probs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_bar || prior) = sum_k p_bar_k log(p_bar_k / prior_k), 0 exactly when p_bar = prior.

    ``prior=None`` is the uniform prior 1/K, for which this is MSN's me-max term -H(p_bar) + log K (the reference's
    ``rloss``); PMSN (Assran et al. 2023) puts a power-law prior (``power_law_prior``) here instead.
    """
    k = mean_probs.shape[-1]
    neg_entropy = torch.sum(torch.special.xlogy(mean_probs, mean_probs))
    if prior is None:
        return neg_entropy + math.log(k)
    if prior.shape != (k,):
        raise ValueError(f"prior_kl: prior must be a (K,) = ({k},) probability vector, got {tuple(prior.shape)}")
    return neg_entropy - torch.sum(mean_probs * torch.log(prior.to(mean_probs)))


def msn_loss(anchor_probs: torch.Tensor | Sequence[torch.Tensor], target_probs: torch.Tensor,
             prior: torch.Tensor | None = None, me_max_weight: float = 1.0,
             return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSN's objective (Assran et al. 2022, §3) with PMSN's prior matching (Assran et al. 2023):

        L = 1/(V B) sum_{v < V} sum_{b < B} H(q_b, p_{v,b}) + lambda KL(p_bar || prior),
        H(q, p) = -sum_k q_k log p_k,   p_bar = mean of p_{v,b} over all anchor rows of all processes.

    ``anchor_probs``: one (B, K) tensor (a single anchor view) or a sequence of V of them, every anchor view of
    the B samples (``msn_probs``, with gradient); ``target_probs``: (B, K) sharpened targets (``msn_target_probs``),
    whose gradient is never used (they are detached). ``prior``: None for the uniform prior (MSN's mean-entropy
    maximization, KL = -H(p_bar) + log K), or a (K,) probability vector (``power_law_prior``). ``me_max_weight``
    lambda = 1.0 (released config ``criterion.memax_weight``). The cross-entropy averages over this process's rows
    (DDP averages over processes); the KL uses the whole batch (``mean_prediction``). With ``return_terms`` also
    returns ``{"ce", "prior_kl"}``, detached.
    """
    anchors = [anchor_probs] if isinstance(anchor_probs, torch.Tensor) else list(anchor_probs)
    if not anchors:
        raise ValueError("msn_loss needs at least one anchor view")
    for p in anchors:
        if p.shape != target_probs.shape:
            raise ValueError(f"msn_loss: each anchor view's probabilities must be (B, K) = "
                             f"{tuple(target_probs.shape)} like the targets, got {tuple(p.shape)}")
    q = target_probs.detach()
    ce = sum(torch.sum(-q * torch.log(p), dim=1).mean() for p in anchors) / len(anchors)
    kl = prior_kl(mean_prediction(anchors), prior)
    loss = ce + me_max_weight * kl
    if return_terms:
        return loss, {"ce": ce.detach(), "prior_kl": kl.detach()}
    return loss
