"""DirectPred (Tian, Chen and Ganguli 2021, "Understanding self-supervised learning dynamics without contrastive
pairs", §5, eqs. (18)-(19); cookbook §2.3, "the role of the predictor"): BYOL's linear predictor is not learned but
set from the eigen-decomposition of a running correlation matrix of the online projections.

These are not losses (DirectPred's loss is BYOL's, eq. (9)); they live next to it as the pure functions of the
method, as DINO's teacher probabilities do.
"""

from __future__ import annotations

import torch


def update_correlation(corr: torch.Tensor | None, z: torch.Tensor, rho: float) -> torch.Tensor:
    """Tian et al. eq. (19): F <- rho F + (1 - rho) E_B[z z^T], the expectation over the rows of `z` (n, d).

    `corr=None` (no estimate yet) returns E_B[z z^T] itself, as the authors' Accumulator does on its first batch.
    rho = 0.3 in the paper (the README's command for DirectPred: ``trainer.dyn_lambda=0.3``). Computed in float64.
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1) (0.3 in the paper), got {rho}")
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be (n >= 1, d) rows of projections, got shape {tuple(z.shape)}")
    z = z.detach().double()
    batch = z.T @ z / z.shape[0]
    if corr is None:
        return batch
    return rho * corr.double() + (1.0 - rho) * batch


def directpred_predictor(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """Tian et al. eq. (18): W_p = U diag(p) U^T with F = U diag(s) U^T and p_j = sqrt(s_j / max_k s_k) + eps.

    Negative eigenvalues (rounding of a PSD matrix) count as 0, as in the authors' ``boost_scale``. An all-zero
    `corr` gives eps * I. `eps` boosts the weak directions (0.01 in the README's DirectPred command,
    ``trainer.dyn_eps=0.01``). Computed in float64; returned in `corr`'s dtype.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (0.01 in the authors' command), got {eps}")
    s, u = torch.linalg.eigh(corr.double())
    s = s.clamp(min=0.0)
    p = (s / s.max().clamp(min=torch.finfo(torch.float64).tiny)).sqrt() + eps
    return ((u * p) @ u.T).to(corr.dtype)
