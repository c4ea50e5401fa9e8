"""W-MSE (Ermolov et al. 2021; cookbook §2.4): whiten the embeddings, then pull positives together.

Whitening imposes the cookbook's eq. (13) constraints exactly (zero mean, identity covariance) on every sub-batch, so
the MSE between normalized positives cannot be minimized by collapse.

Defaults are the authors' (htdt/self-supervised): ``w=128`` (``--w_size`` default, and the CIFAR-10/100 commands
of its README, with ``--emb 64``; STL-10 and Tiny ImageNet use w=256 with 128-d embeddings), ``iterations=1``
(``--w_iter`` default; the README's W-MSE 2 runs on STL-10 / Tiny ImageNet use 4), ``eps=0`` (``--w_eps``
default: no shrinkage). "W-MSE 2" and "W-MSE 4" name the number of positives per image (2 or 4 views, i.e. 1 or 6
pairs), not the number of iterations. The reference whitens in the embeddings' dtype (float32).
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad, get_world_size
from selfsup.losses.canonical_correlation._common import at_least_float32, check_embeddings


def whiten(z: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cholesky whitening of a batch (Ermolov et al. 2021, §3): Whitening(z) = W_V (z - mu_V), with
    W_V^T W_V = Sigma_V^{-1}, W_V = L^{-1} for the Cholesky factor Sigma_V = L L^T of the batch covariance.

    Shape: z (..., n, d): the whitening statistics are taken over the n rows of each (n, d) matrix, so a stack of
    sub-batches (groups, n, d) is whitened group by group in one call. Sigma_V is the unbiased covariance
    (1/(n-1), as in the reference's ``Whitening2d``); the output has zero mean and identity unbiased covariance.
    ``eps`` shrinks the covariance towards the identity, (1 - eps) Sigma_V + eps I, as the reference's ``w_eps``
    (default 0). With ``eps=0`` it needs n > d: the covariance of n samples has rank at most n - 1.
    """
    if z.ndim < 2:
        raise ValueError(f"whiten expects (..., n, d) embeddings, got shape {tuple(z.shape)}")
    n, d = z.shape[-2], z.shape[-1]
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"whiten: eps is a shrinkage weight in [0, 1], got {eps}")
    if eps == 0.0 and n <= d:
        raise ValueError(f"whiten needs more samples than dimensions (n={n}, d={d}): the covariance of n samples has "
                         "rank at most n - 1; use a larger (sub-)batch or eps > 0")
    z = at_least_float32(z)
    zc = z - z.mean(dim=-2, keepdim=True)
    cov = zc.mT @ zc / (n - 1)
    if eps > 0.0:
        cov = (1.0 - eps) * cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError("whiten: the batch covariance is not positive definite (collapsed or linearly dependent "
                         "dimensions); eps > 0 shrinks it towards the identity")
    return torch.linalg.solve_triangular(chol, zc.mT, upper=False).mT


def _shared_permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One random order of the whole batch, the same on every process (rank 0's draw is broadcast)."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=draw_on).to(device)
    if get_world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def wmse_loss(zs: list[torch.Tensor], w: int = 128, iterations: int = 1, eps: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """W-MSE (Ermolov et al. 2021, §3: the loss and its batch slicing):

        L = 1/(I P) sum_{iterations} sum_{pairs (a, b)} 1/N sum_n ( 2 - 2 cos(Whitening(z^a)_n, Whitening(z^b)_n) ),

    i.e. the mean squared distance between L2-normalized whitened positives, ||u/|u| - v/|v|||^2 = 2 - 2 cos (the
    reference's ``norm_mse_loss``). In each of the I ``iterations`` one random permutation splits the N samples into
    N/w sub-batches of w samples; every view's rows of a sub-batch are whitened together (`whiten`), with the same
    rows for all views so that positives stay aligned. P = V(V-1)/2 pairs of the V views.

    Shape: zs, a list of V >= 2 tensors (B, d), one per view, sample n of every view from the same image.
    Defaults and their sources: see the module docstring. ``generator`` draws the permutations (the global CPU RNG
    when None); the whole batch N (all processes) must be a multiple of w, as in the reference
    (``randperm(bs).view(-1, w_size)``), and w > d unless eps > 0.

    Distributed: the views are gathered with gradient and the sub-batches are drawn over the WHOLE batch, with rank
    0's permutation broadcast, so every process computes the loss of 1 process on the whole batch (the authors'
    script runs on one device). Each process whitens all N/w sub-batches: V*N/w Cholesky factorizations of d x d
    matrices, small next to the encoder.
    """
    if len(zs) < 2:
        raise ValueError(f"wmse_loss needs at least 2 views of each sample, got {len(zs)}")
    check_embeddings("wmse_loss", *zs)
    if iterations < 1:
        raise ValueError(f"wmse_loss: iterations must be >= 1, got {iterations}")
    full = [gather_with_grad(at_least_float32(z)) for z in zs]
    n, d = full[0].shape
    if w < 2 or n % w != 0:
        raise ValueError(f"wmse_loss: the whole batch ({n} samples = {zs[0].shape[0]} x {get_world_size()} "
                         f"processes) must be a multiple of the whitening sub-batch size w={w} (w >= 2)")
    if eps == 0.0 and w <= d:
        raise ValueError(f"wmse_loss: the whitening sub-batch size w={w} must exceed the embedding dimension d={d} "
                         "(or use eps > 0)")
    pairs = list(combinations(range(len(zs)), 2))
    total = full[0].new_zeros(())
    for _ in range(iterations):
        perm = _shared_permutation(n, generator, full[0].device)
        groups = torch.stack([f[perm] for f in full]).view(len(zs), n // w, w, d)  # (views, sub-batches, w, d)
        white = F.normalize(whiten(groups, eps), dim=-1)
        for a, b in pairs:
            total = total + (2 - 2 * (white[a] * white[b]).sum(dim=-1)).mean()
    return total / (iterations * len(pairs))
