"""Evaluation protocols on frozen features (cookbook §3.7.1): kNN (DINO protocol), linear probes, plots."""

from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify, knn_top1
from selfsup.evaluate.probe import OnlineLinearProbe, linear_probe

__all__ = ["OnlineLinearProbe", "extract_features", "knn_classify", "knn_top1", "linear_probe"]
