"""Supervised references: what the same backbone, data, views and compute reach with the labels (the ceiling the
self-supervised methods' "gap closed" is measured against; issue 14)."""
