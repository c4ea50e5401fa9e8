"""Losses as small pure functions, one family per sub-package (cookbook §2): each docstring carries its equation.

- :mod:`selfsup.losses.metric_learning` — deep metric learning (§2.2, §2.6.1): NT-Xent/InfoNCE, MoCo InfoNCE,
  NPID, DCL/DCLW, SupCon, the ancestors (margin contrastive, NCA, triplet, N-pair), Tian's phi/psi family.
- :mod:`selfsup.losses.self_distillation` — self-distillation (§2.3): BYOL, DINO.
- :mod:`selfsup.losses.canonical_correlation` — canonical correlation (§2.4): VICReg, Barlow Twins, W-MSE, SwAV.
- :mod:`selfsup.losses.masked_modeling` — masked image modeling (§2.5): MAE, SimMIM, I-JEPA, data2vec 2.0.
- :mod:`selfsup.losses.pretext` — pretext tasks (§2.1): rotation prediction.
"""
