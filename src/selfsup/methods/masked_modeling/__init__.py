"""Masked image modeling (cookbook §2.5): MAE, SimMIM, I-JEPA, data2vec 2.0."""
