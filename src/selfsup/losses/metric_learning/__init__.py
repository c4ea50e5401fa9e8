"""Deep metric learning losses (cookbook §2.2): pull views of one sample together, push other samples apart."""

from selfsup.losses.metric_learning.contrastive import multi_view_nt_xent, nt_xent

__all__ = ["multi_view_nt_xent", "nt_xent"]
