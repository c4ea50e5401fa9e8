"""Tian's unified contrastive family L_{phi,psi} (cookbook §2.6.1, eqs. (15)-(16), Fig. 8; Tian 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import check_pair, check_positive, gather, local_offset, upcast

# name -> (phi, psi) as written in Tian 2022 Fig. 1 (right), reproduced as the cookbook's Fig. 8 (right). The cookbook's
# text states only the InfoNCE row (eq. (16)); the other rows come from the figure's table, whose text is not in the
# cookbook's extracted text, so their exact forms (where the margin sits) are our reading of Tian 2022.
UNIFIED_FAMILY: dict[str, tuple[str, str]] = {
    "infonce": ("tau * log(eps + x)", "exp(x / tau)"),                 # cookbook eq. (16); Oord et al. 2018
    "mine": ("log(x)", "exp(x)"),                                     # Belghazi et al. 2018
    "triplet": ("x", "[x + margin]_+"),                               # Schroff et al. 2015 (all negatives)
    "soft_triplet": ("tau * log(1 + x)", "exp((x + margin) / tau)"),  # Tian et al. 2020: -> max_j [x_j + m]_+ as tau->0
    "n_plus_1_tuple": ("log(1 + x)", "exp(x)"),                       # Sohn 2016
    "lifted": ("[log(x)]_+^2", "exp(x + margin)"),                    # Oh Song et al. 2016 (one-sided)
}


def _lse(x: torch.Tensor, mask: torch.Tensor, const: float | None = None) -> torch.Tensor:
    """log(const + sum_j e^{x_j}) over the unmasked j of each row, without overflow (const=None: no constant)."""
    x = x.masked_fill(~mask, float("-inf"))
    if const is not None:
        x = torch.cat([x, torch.full_like(x[:, :1], math.log(const) if const > 0 else float("-inf"))], dim=1)
    return torch.logsumexp(x, dim=1)


def _named(name: str, x: torch.Tensor, mask: torch.Tensor, tau: float, eps: float, margin: float) -> torch.Tensor:
    if name == "infonce":
        return tau * _lse(x / tau, mask, eps)
    if name == "mine":
        return _lse(x, mask)
    if name == "triplet":
        return (F.relu(x + margin) * mask).sum(1)
    if name == "soft_triplet":
        return tau * _lse((x + margin) / tau, mask, 1.0)
    if name == "n_plus_1_tuple":
        return _lse(x, mask, 1.0)
    return F.relu(_lse(x + margin, mask)).pow(2)  # lifted


def unified_contrastive(z1: torch.Tensor, z2: torch.Tensor, phi: str | Callable = "infonce",
                        psi: Callable | None = None, tau: float = 0.2, eps: float = 1.0, margin: float = 0.2,
                        normalize: bool = False) -> torch.Tensor:
    """Tian's family of contrastive losses (cookbook eq. (15); Tian 2022, "Understanding deep contrastive learning via
    coordinate-wise optimization"):

        L_{phi,psi} = 1/(2N) sum_i phi( sum_{j != i, i'} psi( ||z_i - z_i'||^2 - ||z_i - z_j||^2 ) )

    over the 2N embeddings of both views (i' is the other view of i; j runs over the 2N - 2 others, as in Tian's
    code). phi="infonce" gives eq. (16):

        L_nce = -tau/(2N) sum_i log( e^{-d_ii'/tau} / (eps e^{-d_ii'/tau} + sum_{j != i, i'} e^{-d_ij/tau}) ),
        d = squared Euclidean distance

    Named choices (`UNIFIED_FAMILY`): "infonce" (the one the cookbook's text states), and from the table of Fig. 8 /
    Tian 2022 Fig. 1, "mine", "triplet", "soft_triplet", "n_plus_1_tuple", "lifted"; the cookbook's text is silent
    on these and on the margin's place in them (see `UNIFIED_FAMILY`). The named forms are computed as log-sum-exps,
    which do not overflow; custom monotone callables phi(x) and psi(x) (both given) are applied literally.
    The equation sums over i; we average, so the scale does not grow with the batch.
    Defaults: `eps=1.0` ("eps = 1 has been used in He et al. 2020b, Tian et al. 2020a", cookbook after eq. (16);
    eps = 0 gives DCL). `tau=0.2`: on unit vectors d_i - d_ij = 2(cos_ij - cos_ii'), so tau acts as a cosine
    temperature tau/2 = 0.1 (SimCLR Table 5); with normalize=True and eps=1 the loss is tau * NT-Xent(tau/2).
    `margin=0.2`: FaceNet's alpha on squared distances of unit vectors (Schroff et al. 2015). `normalize=False`:
    eq. (15) is written on raw z.

    Distributed: both views gathered with gradient; each process scores its own 2n anchors against all 2N (index of
    i' and self offset by rank * n); the mean over processes is the one-process loss.
    """
    fn = "unified_contrastive"
    check_pair(z1, z2, fn)
    check_positive(tau, "tau", fn)
    if eps < 0 or margin < 0:
        raise ValueError(f"{fn}: eps and margin must be >= 0, got eps={eps}, margin={margin}")
    if isinstance(phi, str):
        if phi not in UNIFIED_FAMILY:
            raise ValueError(f"{fn}: unknown phi {phi!r}; named choices: {sorted(UNIFIED_FAMILY)}, or pass callables")
        if psi is not None:
            raise ValueError(f"{fn}: phi={phi!r} fixes psi (= {UNIFIED_FAMILY[phi][1]}); pass psi only with a callable "
                             "phi")
    elif not (callable(phi) and callable(psi)):
        raise ValueError(f"{fn}: give phi as one of {sorted(UNIFIED_FAMILY)}, or both phi and psi as callables")
    z1, z2 = upcast(z1), upcast(z2)
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    k1, k2 = gather(z1), gather(z2)
    total = k1.shape[0]
    if total < 2:
        raise ValueError(f"{fn} needs at least 2 samples in the (gathered) batch: with one there is no negative")
    anchors = torch.cat([z1, z2])
    d_neg = torch.cdist(anchors, torch.cat([k1, k2]), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    d_pos = (z1 - z2).pow(2).sum(1).repeat(2)
    local = torch.arange(n, device=z1.device) + local_offset(n)
    rows = torch.arange(2 * n, device=z1.device)
    mask = torch.ones_like(d_neg, dtype=torch.bool)
    mask[rows, torch.cat([local, local + total])] = False  # i itself
    mask[rows, torch.cat([local + total, local])] = False  # its other view i'
    x = d_pos[:, None] - d_neg
    if isinstance(phi, str):
        per_anchor = _named(phi, x, mask, tau, eps, margin)
    else:
        per_anchor = phi((psi(x.masked_fill(~mask, 0.0)) * mask).sum(1))
    return per_anchor.mean()
