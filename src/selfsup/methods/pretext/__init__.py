"""Pretext tasks (cookbook §2.1): RotNet, jigsaw, inpainting, colorization."""
