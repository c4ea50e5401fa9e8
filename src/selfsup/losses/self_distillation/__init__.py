"""Self-distillation losses (cookbook §2.3): a student predicts the output of a teacher made from itself."""

from selfsup.losses.self_distillation.byol import byol_loss, renorm
from selfsup.losses.self_distillation.deepcluster import deepcluster_loss, kmeans_assign
from selfsup.losses.self_distillation.dino import (
    dino_loss,
    dino_teacher_probs,
    koleo_loss,
    sinkhorn_knopp_teacher,
)
from selfsup.losses.self_distillation.directpred import directpred_predictor, update_correlation
from selfsup.losses.self_distillation.ibot import ibot_loss, ibot_patch_loss
from selfsup.losses.self_distillation.meanshift import meanshift_loss, meanshift_neighbours
from selfsup.losses.self_distillation.simsiam import simsiam_loss

__all__ = [
    "byol_loss", "deepcluster_loss", "dino_loss", "dino_teacher_probs", "directpred_predictor", "ibot_loss",
    "ibot_patch_loss", "kmeans_assign", "koleo_loss", "meanshift_loss", "meanshift_neighbours", "renorm",
    "simsiam_loss", "sinkhorn_knopp_teacher", "update_correlation",
]
