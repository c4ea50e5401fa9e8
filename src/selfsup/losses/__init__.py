"""Losses as small pure functions, one family per sub-package (cookbook §2): each docstring carries its equation.

- :mod:`selfsup.losses.metric_learning` — deep metric learning (§2.2): NT-Xent/InfoNCE.
- :mod:`selfsup.losses.self_distillation` — self-distillation (§2.3): BYOL, DINO.
- :mod:`selfsup.losses.masked_modeling` — masked image modeling (§2.5): MAE.
"""
