"""BYOL (cookbook §2.3, eqs. (9)-(10)): regression of the EMA teacher's normalized embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def renorm(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cookbook eq. (10): v / max(||v||_2, eps), eps = 1e-12 as in the cookbook and BYOL's code."""
    return F.normalize(v, dim=-1, eps=eps)


def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """BYOL, cookbook eq. (9): E || renorm(p) - renorm(sg(z_t)) ||_2^2  (= 2 - 2 cos(p, z_t)), mean over the batch.

    `p` is the online network's prediction of one view, `z_target` the teacher's projection of the other view; the
    target is detached here so callers cannot forget the stop-gradient. BYOL symmetrizes by adding the loss with the
    views swapped (Grill et al. 2020, eq. 2): callers *sum* the two terms, they do not average them.
    """
    return (renorm(p.float()) - renorm(z_target.detach().float())).pow(2).sum(dim=-1).mean()
