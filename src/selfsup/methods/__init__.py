"""Methods, one small file each, in one sub-package per family of the cookbook (§2), registered by name.

Importing this package registers all of them:

- ``metric_learning/``: deep metric learning (§2.2) — SimCLR, MoCo v2, MoCo v3, NNCLR, DCL/DCLW, SupCon, NPID
- ``self_distillation/``: self-distillation (§2.3) — BYOL, DINO, iBOT, SimSiam, DirectPred, MeanShift, DeepCluster-v2, MSN
- ``canonical_correlation/``: canonical correlation (§2.4) — VICReg, Barlow Twins, W-MSE, SwAV
- ``masked_modeling/``: masked image modeling (§2.5) — MAE, SimMIM, I-JEPA, data2vec 2.0
- ``pretext/``: the pretext tasks (§2.1) — RotNet, jigsaw, inpainting, colorization
- ``reference/``: the supervised ceiling (cross-entropy on the labels) the catalog's gap closed is measured against
"""

from selfsup.methods import canonical_correlation  # noqa: F401  (registration side effect)
from selfsup.methods.base import REGISTRY, Method, MethodEntry, forward_views
from selfsup.methods.masked_modeling import data2vec, ijepa, mae, simmim  # noqa: F401
from selfsup.methods.metric_learning import dcl, moco_v2, moco_v3, nnclr, npid, simclr, supcon  # noqa: F401
from selfsup.methods.pretext import colorization, inpainting, jigsaw, rotnet  # noqa: F401
from selfsup.methods.reference import supervised  # noqa: F401
from selfsup.methods.self_distillation import (  # noqa: F401
    byol,
    deepcluster_v2,
    dino,
    directpred,
    ibot,
    meanshift,
    msn,
    simsiam,
)
from selfsup.names import did_you_mean


def get_method(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}.{did_you_mean(name, REGISTRY)} Available: "
                       f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "MethodEntry", "forward_views", "get_method"]
