"""Masked image modeling (cookbook §2.5): MAE; the catalog adds SimMIM, I-JEPA, data2vec."""
