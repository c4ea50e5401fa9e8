"""Mean Shift, MSF (Koohpayegani, Tejankar and Pirsiavash 2021; cookbook §2.3 and §3.4: "MSF compares a query's
nearest neighbor representation to the student target's representation and then minimize the l2 distance between
them with renormalization"): BYOL's regression (cookbook eq. (9)-(10)) towards the mean of the target's k nearest
neighbours instead of towards the target alone.

    L = 1/B sum_i 1/k sum_{n in NN_k(t_i)} || renorm(p_i) - n ||_2^2          (each term = 2 - 2 cos(p_i, n))

``NN_k(t_i)`` is the L2-normalized target ``t_i`` itself plus its k - 1 nearest neighbours (cosine) among the rows of
the memory bank. The reference (UMBCvision/MSF, train_msf.py ``MeanShift.forward``) enqueues the batch's targets
before its top-k search, so a target is its own first neighbour (distance 0; paper Fig. 1: "Obviously target
embedding itself will be the first nearest neighbor"). Here the target is counted separately and the k - 1 others
are searched in the bank as it stood before the step. Two consequences, both deliberate: the loss is per sample
(a process holding half the batch computes the same terms as one process on the whole batch), and the other
samples of the current batch are not candidates (the reference's are, and it has already evicted the oldest B rows;
at ImageNet scale, B = 256 rows of a 1,024,000-row bank, the difference is negligible).
"""

from __future__ import annotations

import torch

from selfsup.losses.self_distillation.byol import renorm


def meanshift_neighbours(target: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, D): for each row of ``target`` its own renormalized row, then its k - 1 nearest ``bank`` rows by cosine
    similarity, nearest first (no gradient). ``bank`` rows are taken as L2-normalized (the queue stores renormalized
    targets and starts from normalized Gaussian rows), so a dot product is their cosine with the target."""
    if k < 1:
        raise ValueError(f"k (the number of neighbours, the target included) must be >= 1, got {k}")
    if bank.ndim != 2 or bank.shape[1] != target.shape[-1]:
        raise ValueError(f"the bank must be (N, {target.shape[-1]}) like the targets, got {tuple(bank.shape)}")
    if bank.shape[0] < k - 1:
        raise ValueError(f"k={k} needs k - 1 = {k - 1} neighbours from the bank, which holds {bank.shape[0]} rows: "
                         "use a larger bank or a smaller k")
    with torch.no_grad():
        t = renorm(target.detach())
        if k == 1:
            return t[:, None, :]
        bank = bank.detach().to(t.dtype)
        idx = (t @ bank.T).topk(k - 1, dim=1).indices  # (B, k - 1), the largest cosine first
        return torch.cat([t[:, None, :], bank[idx]], dim=1)


def meanshift_loss(p: torch.Tensor, target: torch.Tensor, bank: torch.Tensor, k: int = 5) -> torch.Tensor:
    """MSF's loss (module docstring): mean over the batch of the mean over ``NN_k(target_i)`` of
    || renorm(p_i) - n ||_2^2 = 2 - 2 cos(p_i, n).

    ``p`` (B, D): the online network's prediction of one view; ``target`` (B, D): the EMA target network's
    projection of the other view (renormalized here); ``bank`` (N, D): L2-normalized target embeddings of earlier
    steps; ``k``: neighbours including the target itself (MSF abstract: "5 as used in our experiments"; run_msf.sh
    ``--topk 5``). With k = 1 this is BYOL's loss (paper abstract: "identical to BYOL when using only one nearest
    neighbor"). Neither the target nor the bank receives a gradient. Computed in float32 at least (float64 inputs stay float64).
    """
    if p.shape != target.shape or p.ndim != 2:
        raise ValueError(f"p and target must both be (B, D), got {tuple(p.shape)} and {tuple(target.shape)}")
    dtype = torch.promote_types(p.dtype, torch.float32)
    nbrs = meanshift_neighbours(target.to(dtype), bank, k)           # (B, k, D), detached
    return (renorm(p.to(dtype))[:, None, :] - nbrs).pow(2).sum(dim=-1).mean()
