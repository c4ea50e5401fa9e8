"""VICReg (Bardes et al. 2022; cookbook §2.4 and Fig. 6): variance, invariance and covariance as separate terms.

The cookbook frames this family by eq. (13): representations with zero mean and identity covariance whose paired
samples agree. VICReg turns the constraints into penalties: the variance term keeps every dimension's standard
deviation above gamma, the covariance term pushes the off-diagonal covariance to zero, the invariance term pulls the
two views together. Each term is its own function so VICRegL and dense methods can apply them to other features.

Scales follow the authors' code (facebookresearch/vicreg, ``main_vicreg.py``, ``VICReg.forward``), whose defaults
produced the published numbers: the invariance term is a mean over all N*d entries (F.mse_loss) where the paper's
s(Z, Z') sums over dimensions, and the two views' variance terms are averaged where the paper adds them.

Distributed: the variance and covariance terms use the whole batch of every process (`gather_with_grad`, the
cookbook's Algorithm 1, as the reference does with ``FullGatherLayer``); every process computes the same value and the
gradients that reach each process's embeddings are those of the whole-batch loss. The invariance term is a per-sample
mean, so each process uses its own samples and DDP's average over equal local batches is the whole-batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad
from selfsup.losses.canonical_correlation._common import at_least_float32, check_embeddings, off_diagonal


def _whole_batch(name: str, z: torch.Tensor, gather: bool) -> torch.Tensor:
    check_embeddings(name, z)
    z = at_least_float32(z)
    z = gather_with_grad(z) if gather else z
    if z.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples in the whole batch (unbiased variance), got {z.shape[0]}")
    return z


def vicreg_invariance(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Invariance term s(Z, Z') = 1/(N d) sum_i ||z_i - z'_i||^2: the mean squared error over all entries.

    Shape: z1, z2 (B, d). The 1/(N d) scale is the reference's ``F.mse_loss(x, y)``; the paper (Bardes et al. 2022,
    §3) writes 1/N sum_i ||z_i - z'_i||^2, d times larger. The default weight 25 goes with the code's scale.
    """
    check_embeddings("vicreg_invariance", z1, z2)
    return F.mse_loss(at_least_float32(z1), at_least_float32(z2))


def vicreg_variance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4, gather: bool = True) -> torch.Tensor:
    """Variance term v(Z) = 1/d sum_j max(0, gamma - S(z^j, eps)), S(x, eps) = sqrt(Var(x) + eps) (Bardes et al.
    2022, §3): a hinge on the standard deviation of each dimension over the whole batch.

    Shape: z (B, d). Var is the unbiased variance along the batch, as in the reference (``x.var(dim=0)``).
    ``gamma=1.0`` (target standard deviation) and ``eps=1e-4`` (keeps the gradient of the square root finite at
    zero variance): the reference's ``F.relu(1 - std_x)`` and ``torch.sqrt(x.var(dim=0) + 0.0001)``.
    ``gather=False`` uses this process's samples only (for a caller that has already gathered).
    """
    z = _whole_batch("vicreg_variance", z, gather)
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def vicreg_covariance(z: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Covariance term c(Z) = 1/d sum_{i != j} C(Z)_ij^2, C(Z) = 1/(N-1) sum_n (z_n - mean z)(z_n - mean z)^T
    (Bardes et al. 2022, §3), over the whole batch of N samples.

    Shape: z (B, d). The 1/d scale and the unbiased 1/(N-1) are the reference's (``cov_x = x.T @ x /
    (batch_size - 1)`` on the gathered, centered batch, ``.div(num_features)``). ``gather`` as in `vicreg_variance`.
    """
    z = _whole_batch("vicreg_covariance", z, gather)
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4, return_terms: bool = False):
    """VICReg, l(Z, Z') = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')] (Bardes et al. 2022, §3,
    with the reference's averaging of the two variance terms).

    Shape: z1, z2 (B, d), the projector outputs of two views. ``sim_weight=25, var_weight=25, cov_weight=1``:
    lambda, mu, nu of the reference (``--sim-coeff``, ``--std-coeff``, ``--cov-coeff`` defaults in
    ``main_vicreg.py``; the paper's ImageNet setting). ``gamma``, ``eps``: see `vicreg_variance`.

    Returns the total, or with ``return_terms=True`` ``(total, {"invariance", "variance", "covariance"})`` with the
    unweighted terms as defined above (variance averaged, covariance summed over the two views), detached, for logs.
    Each view is gathered once; the variance and covariance terms then share that whole batch.
    """
    check_embeddings("vicreg_loss", z1, z2)
    inv = vicreg_invariance(z1, z2)
    g1 = _whole_batch("vicreg_loss", z1, gather=True)
    g2 = _whole_batch("vicreg_loss", z2, gather=True)
    var = (vicreg_variance(g1, gamma, eps, gather=False) + vicreg_variance(g2, gamma, eps, gather=False)) / 2
    cov = vicreg_covariance(g1, gather=False) + vicreg_covariance(g2, gather=False)
    total = sim_weight * inv + var_weight * var + cov_weight * cov
    if return_terms:
        return total, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
    return total
