"""Pretext-task losses (cookbook §2.1): predict a label the data makes for itself."""

from selfsup.losses.pretext.rotation import rotation_loss

__all__ = ["rotation_loss"]
