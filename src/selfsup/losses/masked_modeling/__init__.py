"""Masked image modeling losses (cookbook §2.5): reconstruct what a mask hid."""

from selfsup.losses.masked_modeling.mae import mae_loss, patchify, unpatchify
from selfsup.losses.masked_modeling.simmim import simmim_loss

__all__ = ["mae_loss", "patchify", "simmim_loss", "unpatchify"]
