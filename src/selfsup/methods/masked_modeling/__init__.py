"""Masked image modeling (cookbook §2.5): MAE, SimMIM; the catalog adds I-JEPA, data2vec."""
