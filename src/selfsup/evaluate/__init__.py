"""Evaluation (cookbook §3.7, §3.2, §2.6.2): one function per protocol, `evaluate_model` / `evaluate` run them all."""

from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify, knn_top1
from selfsup.evaluate.mlp_probe import mlp_probe
from selfsup.evaluate.probe import OnlineLinearProbe, linear_probe
from selfsup.evaluate.rotation import rotation_probe
from selfsup.evaluate.run import evaluate
from selfsup.evaluate.spectrum import alpha_req, lidar, rankme
from selfsup.evaluate.suite import evaluate_model

__all__ = ["OnlineLinearProbe", "alpha_req", "evaluate", "evaluate_model", "extract_features", "knn_classify",
           "knn_top1", "lidar", "linear_probe", "mlp_probe", "rankme", "rotation_probe"]
