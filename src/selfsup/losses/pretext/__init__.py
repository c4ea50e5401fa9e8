"""Pretext-task losses (cookbook §2.1): predict a label, or pixels, the data makes for itself."""

from selfsup.losses.pretext.classification import jigsaw_loss, rotation_loss
from selfsup.losses.pretext.reconstruction import colorization_loss, inpainting_loss

__all__ = ["colorization_loss", "inpainting_loss", "jigsaw_loss", "rotation_loss"]
