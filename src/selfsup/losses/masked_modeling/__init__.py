"""Masked image modeling losses (cookbook §2.5): reconstruct what a mask hid, in pixels or in a teacher's features."""

from selfsup.losses.masked_modeling.data2vec import data2vec_loss, data2vec_targets
from selfsup.losses.masked_modeling.ijepa import ijepa_loss, ijepa_targets
from selfsup.losses.masked_modeling.mae import mae_loss, patchify, unpatchify
from selfsup.losses.masked_modeling.simmim import simmim_loss

__all__ = ["data2vec_loss", "data2vec_targets", "ijepa_loss", "ijepa_targets", "mae_loss", "patchify", "simmim_loss",
           "unpatchify"]
