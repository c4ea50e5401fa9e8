"""Canonical correlation analysis family (cookbook §2.4): VICReg, Barlow Twins, W-MSE, SwAV.

The family descends from CCA's constraints (cookbook eq. (13)): zero-mean, identity-covariance representations
whose paired views agree. VICReg penalizes the variance and covariance of each view, Barlow Twins pushes the
cross-correlation of the two views to the identity, W-MSE whitens the batch exactly, SwAV equipartitions the batch
over prototypes with Sinkhorn-Knopp. Every batch statistic is taken over the whole batch of all processes, so 2
processes with half batches give the loss and gradients of 1 process with the whole batch.
"""

from selfsup.losses.canonical_correlation.barlow_twins import barlow_twins_loss
from selfsup.losses.canonical_correlation.swav import sinkhorn_knopp, swav_loss
from selfsup.losses.canonical_correlation.vicreg import (
    vicreg_covariance,
    vicreg_invariance,
    vicreg_loss,
    vicreg_variance,
)
from selfsup.losses.canonical_correlation.wmse import whiten, wmse_loss

__all__ = [
    "barlow_twins_loss",
    "sinkhorn_knopp",
    "swav_loss",
    "vicreg_covariance",
    "vicreg_invariance",
    "vicreg_loss",
    "vicreg_variance",
    "whiten",
    "wmse_loss",
]
