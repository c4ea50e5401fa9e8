"""Label-free representation metrics from the embedding spectrum (cookbook §2.6.2, §3.7.2).

Three numbers that need no labels and no training, each following one named definition so that values can be
compared with the papers (peers.md "Definitions people disagree on"):

- **RankMe** (Garrido et al., 2023; cookbook eq. (17)): exp of the entropy of the normalized *singular values of the
  raw embedding matrix* (no centering, no normalization). Some tools use covariance eigenvalues instead; that is a
  different number, so it is not offered under this name.
- **alpha-ReQ** (Agrawal et al., 2022): the decay exponent ``alpha`` of the *centered feature covariance*
  eigenvalues, ``lambda_i ~ i^-alpha``, from a least-squares line in log-log space, reported with its R^2.
- **LiDAR** (Thilak et al., 2023): RankMe-style effective rank of the whitened between-image scatter
  ``S_w^-1/2 S_b S_w^-1/2``, where the "classes" are source images and the samples their augmented views.

All computations run in float64 on the CPU whatever the input dtype or device (bf16/float32 embeddings are common and
their SVD is not accurate enough for entropies of small singular values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RANKME_DEFINITION = (
    "RankMe (Garrido et al. 2023, cookbook eq. 17): exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, "
    "sigma = singular values of the raw (N, D) embedding matrix, no centering or normalization"
)
ALPHA_REQ_DEFINITION = (
    "alpha-ReQ (Agrawal et al. 2022): -slope of an unweighted least-squares fit of log(lambda_i) on log(i), "
    "lambda = eigenvalues of the centered feature covariance, i = 1-based index within fit_range"
)
LIDAR_DEFINITION = (
    "LiDAR (Thilak et al. 2023): exp(-sum p_k log p_k), p_k = lambda_k / ||lambda||_1 + eps, lambda = eigenvalues "
    "of S_w^-1/2 S_b S_w^-1/2; S_b = covariance of per-image view means, S_w = mean within-image covariance "
    "of the views + delta * I"
)


def _as_float64(x: Tensor, name: str, ndim: int, shape_hint: str) -> Tensor:
    """Detached float64 CPU copy of ``x`` after checking its rank and values."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {shape_hint}, got shape {tuple(x.shape)}. "
            + ("Flatten spatial/token dimensions or pool them first." if ndim == 2 else "")
        )
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; check the encoder output (diverged training?).")
    return x


def _embeddings(z: Tensor) -> Tensor:
    z = _as_float64(z, "z", 2, "(n_samples, dim)")
    if z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z needs at least 2 samples and 1 dimension, got shape {tuple(z.shape)}.")
    return z


def _entropy_rank(values: Tensor, eps: float) -> float:
    """exp(-sum p log p) with p = values / ||values||_1 + eps: the effective rank shared by RankMe and LiDAR.

    All-zero ``values`` (every embedding zero: complete collapse) have rank 0, and 0.0 is returned rather than
    the NaN that 0/0 would give.
    """
    total = values.abs().sum()
    if total == 0:
        return 0.0
    p = values / total + eps
    return math.exp(float(-(p * p.log()).sum()))


def singular_values(z: Tensor) -> Tensor:
    """Singular values of the raw embedding matrix ``z`` (N, D): float64, descending, length min(N, D)."""
    return torch.linalg.svdvals(_embeddings(z))


def rankme(z: Tensor, eps: float = 1e-7) -> dict:
    """RankMe effective rank of the embeddings ``z`` (N, D): cookbook eq. (17), Garrido et al. (2023).

    ``p_k = sigma_k / ||sigma||_1 + eps`` over the ``min(N, D)`` singular values of the *raw* matrix and
    ``RankMe = exp(-sum_k p_k log p_k)``. ``eps=1e-7`` as in Garrido et al.'s code (other tools use up to 1e-5,
which shifts small values slightly; ``eps`` is returned so numbers can be compared). The value is (up to eps
    effects) between 1 and ``min(N, D)``, so it is only comparable across runs at the same N and D. Garrido et al.
    compute it on 25,600 samples (more than the embedding dimension, so D is the bound); with fewer samples than
    dimensions, N caps the value. RankMe is a necessary condition for good features, not a sufficient one: random
    Gaussian embeddings are full rank (cookbook §3.7.2).
    """
    z = _embeddings(z)
    sigma = torch.linalg.svdvals(z)
    return {
        "rankme": _entropy_rank(sigma, eps),
        "eps": eps,
        "n_samples": z.shape[0],
        "dim": z.shape[1],
        "definition": RANKME_DEFINITION,
    }


def covariance_eigenvalues(z: Tensor) -> Tensor:
    """Eigenvalues of the centered feature covariance of ``z`` (N, D), ``Z_c^T Z_c / (N - 1)``: float64, descending.

    Computed from the singular values of the centered matrix (squared), which is more accurate than an
    eigendecomposition of the covariance and never negative. Length D: zeros beyond the rank ``N - 1``.
    """
    z = _embeddings(z)
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    eig = torch.zeros(z.shape[1], dtype=torch.float64)
    eig[: s.numel()] = s.square() / (z.shape[0] - 1)
    return eig


def _positive_count(eig: Tensor) -> int:
    """Number of eigenvalues above round-off (same relative tolerance as ``torch.linalg.matrix_rank``)."""
    if eig.numel() == 0 or eig[0] <= 0:
        return 0
    tol = eig[0] * eig.numel() * torch.finfo(torch.float64).eps
    return int((eig > tol).sum())


def alpha_req(z: Tensor, fit_range: tuple[int, int] = (11, 100), *, eigenvalues: Tensor | None = None) -> dict:
    """alpha-ReQ (Agrawal et al., 2022): eigenspectrum decay exponent of the feature covariance.

    With ``lambda_i`` the descending eigenvalues of the centered covariance of ``z`` (N, D), fit
    ``log lambda_i = c - alpha log i`` by unweighted ordinary least squares over the 1-based, inclusive index range
    ``fit_range``, clipped to the eigenvalues above round-off. Returns ``alpha``, the fit's ``r2`` and the
    ``fit_range`` actually used.

    Default range: the authors fit indices 11-100 (skipping the first ten, which carry the few dominant directions
    and bend away from a power law) with a weighted fit (peers.md). We keep their index range but use unweighted OLS,
    so values can differ slightly from theirs on spectra that are not a clean power law; check ``r2``.
    For embeddings with D < 100 the range is clipped to D. Raises ValueError if fewer than 3 points remain.
    """
    lo, hi = (int(v) for v in fit_range)
    if lo < 1 or hi < lo:
        raise ValueError(f"fit_range must be 1-based (lo, hi) with 1 <= lo <= hi, got {fit_range!r}.")
    z = _embeddings(z)
    eig = covariance_eigenvalues(z) if eigenvalues is None else eigenvalues  # callers that already have them
    hi_used = min(hi, _positive_count(eig))
    if hi_used - lo + 1 < 3:
        raise ValueError(
            f"alpha-ReQ needs at least 3 positive covariance eigenvalues in fit_range={fit_range}, but only "
            f"{max(hi_used - lo + 1, 0)} remain ({_positive_count(eig)} positive eigenvalues for N={z.shape[0]}, "
            f"D={z.shape[1]}). Use more samples, a wider embedding, or a smaller fit_range such as (1, {hi_used})."
        )
    x = torch.arange(lo, hi_used + 1, dtype=torch.float64).log()
    y = eig[lo - 1 : hi_used].log()
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    residual = y - design @ coef
    ss_tot = (y - y.mean()).square().sum()
    r2 = 1.0 - float(residual.square().sum() / ss_tot) if ss_tot > 0 else 1.0
    return {
        "alpha": float(-coef[1]),
        "r2": r2,
        "fit_range": (lo, hi_used),
        "n_samples": z.shape[0],
        "dim": z.shape[1],
        "definition": ALPHA_REQ_DEFINITION,
    }


def _inverse_sqrt_psd(m: Tensor) -> Tensor:
    """M^-1/2 of a symmetric positive-definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.rsqrt()) @ vecs.T


def lidar(view_embeddings: Tensor, eps: float = 1e-8, delta: float = 1e-4) -> dict:
    """LiDAR (Thilak et al., 2023): effective rank of the linear-discriminant matrix of image identity.

    ``view_embeddings`` is (n_images, n_views, D): each source image is a class, its augmented views the samples.

    - ``S_b``: covariance of the per-image view means around the grand mean, normalized by ``n_images - 1``.
    - ``S_w``: covariance of the views around their image's mean (normalized by ``n_views - 1``), averaged over
      images, plus ``delta * I`` so it is invertible when views are (nearly) identical.
    - ``LiDAR = exp(-sum p_k log p_k)``, ``p_k = lambda_k / ||lambda||_1 + eps``, ``lambda`` the eigenvalues of
      ``S_w^-1/2 S_b S_w^-1/2``.

    Defaults ``eps=1e-8, delta=1e-4`` are this project's reading of the paper (public implementations use 1e-5 to
    1e-7 for both, and normalize the scatters slightly differently; both are returned). The authors use about
    1,000 images with 50 views each. The
    value is at most ``min(n_images - 1, D)``. Like RankMe it counts *how many* directions separate images, relative
    to the augmentation noise in each direction; it does not measure by how much, so embeddings whose views ignore
    the image altogether (isotropic noise) still score high. Returns 0.0 when no direction separates images at all
    (all views identical).
    """
    v = _as_float64(view_embeddings, "view_embeddings", 3, "(n_images, n_views, dim)")
    n, q, d = v.shape
    if n < 2 or q < 2 or d < 1:
        raise ValueError(
            f"LiDAR needs at least 2 images with at least 2 views each, got shape {tuple(v.shape)} "
            "(n_images, n_views, dim)."
        )
    means = v.mean(dim=1)
    between = means - means.mean(dim=0)
    s_b = between.T @ between / (n - 1)
    within = (v - means.unsqueeze(1)).reshape(n * q, d)
    s_w = within.T @ within / (n * (q - 1)) + delta * torch.eye(d, dtype=torch.float64)
    w = _inverse_sqrt_psd(s_w)
    lam = torch.linalg.eigvalsh(w @ s_b @ w).clamp_min(0).flip(0)
    return {
        "lidar": _entropy_rank(lam, eps),
        "eps": eps,
        "delta": delta,
        "n_images": n,
        "n_views": q,
        "dim": d,
        "definition": LIDAR_DEFINITION,
    }


def spectrum_summary(
    z: Tensor, eps: float = 1e-7, fit_range: tuple[int, int] = (11, 100), top: int = 64
) -> dict:
    """RankMe, alpha-ReQ and the ``top`` leading singular values divided by the largest, for reports and plots.

    alpha-ReQ is ``None`` (with the reason in ``alpha_req_error``) when the spectrum has too few eigenvalues for the
    fit, so a summary of a tiny or collapsed embedding never fails.
    """
    z = _embeddings(z)
    sigma = torch.linalg.svdvals(z)
    summary = {"rankme": rankme(z, eps=eps), "alpha_req": None, "alpha_req_error": None}
    try:
        summary["alpha_req"] = alpha_req(z, fit_range=fit_range)
    except ValueError as err:
        summary["alpha_req_error"] = str(err)
    scale = float(sigma[0]) if sigma.numel() and sigma[0] > 0 else 1.0
    summary["singular_values"] = (sigma[:top] / scale).tolist()
    return summary
