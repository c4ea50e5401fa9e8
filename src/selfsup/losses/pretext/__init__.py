"""Pretext-task losses (cookbook §2.1): predict a label, or pixels, the data makes for itself."""

from selfsup.losses.pretext.classification import jigsaw_loss, rotation_loss

__all__ = ["jigsaw_loss", "rotation_loss"]
