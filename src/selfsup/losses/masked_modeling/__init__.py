"""Masked image modeling losses (cookbook §2.5): reconstruct what a mask hid."""

from selfsup.losses.masked_modeling.mae import mae_loss, patchify, unpatchify

__all__ = ["mae_loss", "patchify", "unpatchify"]
