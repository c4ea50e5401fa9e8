"""Canonical correlation analysis family (cookbook §2.4): VICReg, Barlow Twins, W-MSE, SwAV."""

from selfsup.methods.canonical_correlation import barlow_twins, swav, vicreg, wmse  # noqa: F401  (registration)
