"""Deep metric learning losses (cookbook §2.2): pull views of one sample together, push other samples apart.

- :mod:`.contrastive` — NT-Xent / InfoNCE of SimCLR (eq. (6), Fig. 3), multi-crop NT-Xent.
- :mod:`.ancestors` — the history of Fig. 2: margin contrastive loss (eq. (1)), NCA (eq. (2)), triplet loss with
  batch-hard / semi-hard / all mining (eq. (3)), (N+1)-tuple / N-pair loss (eq. (4)).
- :mod:`.npid` — NPID's non-parametric softmax over a memory bank (eq. (5)) and its momentum update.
- :mod:`.infonce` — InfoNCE between queries and keys (eq. (6)): MoCo v2 queue negatives or MoCo v3 in-batch keys.
- :mod:`.dcl` — DCL and DCLW (Fig. 3): the positive pair leaves the denominator.
- :mod:`.supcon` — supervised contrastive loss, L^sup_out (Khosla et al. 2020).
- :mod:`.unified` — Tian's phi/psi family (eqs. (15)-(16), Fig. 8).

Every loss that uses other samples of the batch gathers them with gradient across processes, so W processes with
1/W of the batch each give the loss and gradients of one process on the whole batch.
"""

from selfsup.losses.metric_learning.ancestors import (
    margin_contrastive_loss,
    n_pair_loss,
    nca_loss,
    triplet_loss,
)
from selfsup.losses.metric_learning.contrastive import multi_view_nt_xent, nt_xent
from selfsup.losses.metric_learning.dcl import dcl_loss, dclw_loss
from selfsup.losses.metric_learning.infonce import info_nce
from selfsup.losses.metric_learning.npid import npid_bank_update, npid_loss
from selfsup.losses.metric_learning.supcon import supcon, supcon_loss
from selfsup.losses.metric_learning.unified import UNIFIED_FAMILY, unified_contrastive

__all__ = [
    "UNIFIED_FAMILY",
    "dcl_loss",
    "dclw_loss",
    "info_nce",
    "margin_contrastive_loss",
    "multi_view_nt_xent",
    "n_pair_loss",
    "nca_loss",
    "npid_bank_update",
    "npid_loss",
    "nt_xent",
    "supcon",
    "supcon_loss",
    "triplet_loss",
    "unified_contrastive",
]
