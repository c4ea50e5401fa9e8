"""Label-free spectrum metrics against closed forms and independent numpy references (cookbook §3.7.2)."""

import math

import numpy as np
import pytest
import torch

from selfsup.evaluate.spectrum import (
    alpha_req,
    covariance_eigenvalues,
    lidar,
    rankme,
    singular_values,
    spectrum_summary,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen(seed), dtype=torch.float64)).Q


def entropy_rank_closed_form(p: np.ndarray, eps: float) -> float:
    p = p / p.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- RankMe


def test_rankme_of_rank_k_matrix_with_equal_singular_values_is_k():
    n, d, k, eps = 64, 32, 5, 1e-7
    z = orthonormal(n, k, 0) @ (3.0 * orthonormal(d, k, 1).T)  # singular values: k times 3, then zeros
    out = rankme(z, eps=eps)
    # closed form with eps: k terms of 1/k + eps, (min(N, D) - k) terms of eps
    p = np.array([1 / k + eps] * k + [eps] * (d - k))
    assert out["rankme"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert out["rankme"] == pytest.approx(k, abs=1e-3)
    assert (out["n_samples"], out["dim"], out["eps"]) == (n, d, eps)
    assert "raw" in out["definition"]


def test_rankme_of_generic_rank_k_matrix_is_between_1_and_k():
    k = 6
    z = torch.randn(100, k, generator=gen(2)) @ torch.randn(k, 40, generator=gen(3))
    r = rankme(z)["rankme"]
    assert 1.0 < r < k + 1e-3


def test_rankme_of_isotropic_gaussian_is_close_to_dim():
    d = 32
    r = rankme(torch.randn(2000, d, generator=gen(4)))["rankme"]
    assert 0.9 * d < r <= d + 1e-3


def test_rankme_matches_hand_computation_from_numpy_svd_and_ignores_scale():
    z = np.random.default_rng(5).normal(size=(7, 5)) + 2.0  # uncentered on purpose: the definition uses raw Z
    s = np.linalg.svd(z, compute_uv=False)
    expected = entropy_rank_closed_form(s, 1e-7)
    assert rankme(torch.from_numpy(z))["rankme"] == pytest.approx(expected, rel=1e-10)
    assert rankme(torch.from_numpy(10 * z))["rankme"] == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(singular_values(torch.from_numpy(z)).numpy(), s, rtol=1e-10)


def test_rankme_is_bounded_by_number_of_samples_and_handles_collapse():
    assert rankme(torch.randn(8, 64, generator=gen(6)))["rankme"] <= 8 + 1e-3
    constant = torch.ones(50, 10) * torch.randn(1, 10, generator=gen(7))  # every sample the same vector
    assert rankme(constant)["rankme"] == pytest.approx(1.0, abs=1e-4)
    assert rankme(torch.zeros(50, 10))["rankme"] == 0.0  # all-zero embeddings: rank 0, not NaN


def test_rankme_accepts_low_precision_input_and_computes_in_float64():
    z = torch.randn(200, 16, generator=gen(8)).to(torch.bfloat16)
    assert singular_values(z).dtype == torch.float64
    assert rankme(z)["rankme"] == pytest.approx(rankme(z.double())["rankme"], rel=1e-12)


# ---------------------------------------------------------------- covariance eigenvalues and alpha-ReQ


def test_covariance_eigenvalues_match_numpy_cov():
    z = np.random.default_rng(9).normal(size=(30, 12)) + 5.0
    expected = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    got = covariance_eigenvalues(torch.from_numpy(z))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.all(got[:-1] >= got[1:])
    few = covariance_eigenvalues(torch.randn(5, 12, generator=gen(10), dtype=torch.float64))
    assert few.shape == (12,) and few[4:].max() < 1e-12 * few[0]  # rank N - 1: the rest is zero up to round-off


def prescribed_spectrum(n: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """Embeddings whose centered covariance has exactly the given eigenvalues (in a random basis)."""
    d = eigenvalues.numel()
    g = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    q = torch.linalg.qr(g - g.mean(dim=0)).Q  # orthonormal columns, each orthogonal to the all-ones vector
    rotation = orthonormal(d, d, seed + 1)
    return (q * (eigenvalues * (n - 1)).sqrt()) @ rotation.T + 3.0


@pytest.mark.parametrize("alpha", [0.8, 1.5])
def test_alpha_req_recovers_exact_power_law(alpha):
    d = 150
    z = prescribed_spectrum(300, torch.arange(1, d + 1, dtype=torch.float64).pow(-alpha), seed=11)
    out = alpha_req(z)
    assert out["alpha"] == pytest.approx(alpha, abs=1e-8)
    assert out["r2"] == pytest.approx(1.0, abs=1e-10)
    assert out["fit_range"] == (11, 100)


@pytest.mark.parametrize("alpha", [0.8, 1.5])
def test_alpha_req_on_gaussian_samples_with_power_law_covariance(alpha):
    n, d = 8000, 128  # sampling error of alpha here is ~0.01 (20000 x 200 gives ~0.003; slower)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-alpha / 2)
    z = torch.randn(n, d, generator=gen(12), dtype=torch.float64) * scale
    out = alpha_req(z.float())
    assert out["alpha"] == pytest.approx(alpha, abs=0.05)
    assert out["r2"] > 0.99
    assert (out["n_samples"], out["dim"]) == (n, d)


def test_alpha_req_matches_numpy_polyfit_and_clips_range_to_dim():
    z = torch.randn(400, 40, generator=gen(13), dtype=torch.float64) * torch.linspace(3, 0.1, 40)
    out = alpha_req(z, fit_range=(2, 100))
    assert out["fit_range"] == (2, 40)
    lam = covariance_eigenvalues(z).numpy()[1:40]
    x, y = np.log(np.arange(2, 41)), np.log(lam)
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - ((y - (slope * x + intercept)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert out["alpha"] == pytest.approx(-slope, rel=1e-9)
    assert out["r2"] == pytest.approx(r2, rel=1e-9)


def test_alpha_req_errors_when_too_few_positive_eigenvalues():
    low_rank = torch.randn(500, 12, generator=gen(14)) @ torch.randn(12, 64, generator=gen(15))  # rank 12
    with pytest.raises(ValueError, match="at least 3 positive"):
        alpha_req(low_rank)  # indices 11..12 only
    assert alpha_req(low_rank, fit_range=(1, 100))["fit_range"] == (1, 12)
    with pytest.raises(ValueError, match="fit_range"):
        alpha_req(low_rank, fit_range=(0, 10))


# ---------------------------------------------------------------- LiDAR


def lidar_reference(v: np.ndarray, eps: float, delta: float) -> float:
    """Independent numpy LiDAR: loops over images, eigenvalues of S_w^-1 S_b (same spectrum as the whitened form)."""
    n, q, d = v.shape
    mu_x = v.mean(axis=1)
    mu = mu_x.mean(axis=0)
    s_b = sum(np.outer(m - mu, m - mu) for m in mu_x) / (n - 1)
    s_w = sum(np.outer(e - mu_x[i], e - mu_x[i]) for i in range(n) for e in v[i]) / (n * (q - 1))
    s_w += delta * np.eye(d)
    lam = np.clip(np.linalg.eigvals(np.linalg.solve(s_w, s_b)).real, 0, None)
    return entropy_rank_closed_form(lam, eps)


def identity_views(n: int, q: int, d: int, informative: int, noise: float, seed: int) -> torch.Tensor:
    """Views = per-image center (non-zero in the first `informative` dims) + isotropic view noise."""
    centers = torch.zeros(n, 1, d, dtype=torch.float64)
    centers[..., :informative] = torch.randn(n, 1, informative, generator=gen(seed), dtype=torch.float64)
    return centers + noise * torch.randn(n, q, d, generator=gen(seed + 1), dtype=torch.float64)


def test_lidar_matches_numpy_reference():
    v = torch.randn(12, 4, 6, generator=gen(16), dtype=torch.float64) * torch.tensor([3, 1, 1, 0.5, 0.2, 0.1])
    v = v + torch.randn(12, 1, 6, generator=gen(17), dtype=torch.float64)
    out = lidar(v)
    assert out["lidar"] == pytest.approx(lidar_reference(v.numpy(), 1e-8, 1e-4), rel=1e-8)
    assert (out["n_images"], out["n_views"], out["dim"], out["eps"], out["delta"]) == (12, 4, 6, 1e-8, 1e-4)


def test_lidar_counts_directions_that_separate_images():
    # identity carried by 3 of 16 dims (far above the view noise): LiDAR ~ 3, whatever D is
    assert lidar(identity_views(300, 8, 16, informative=3, noise=0.05, seed=18))["lidar"] == pytest.approx(3, rel=0.03)


def test_lidar_views_sharing_identity_beat_views_that_ignore_it():
    n, q, d = 300, 8, 16
    shared = identity_views(n, q, d, informative=d, noise=0.05, seed=19)  # identity in every direction
    # views independent of the image in all but one direction: only that one direction separates images
    ignore = identity_views(n, q, d, informative=1, noise=0.05, seed=21)
    ignore[..., 1:] = torch.randn(n, q, d - 1, generator=gen(23), dtype=torch.float64)
    shared_lidar, ignore_lidar = lidar(shared)["lidar"], lidar(ignore)["lidar"]
    assert shared_lidar > 0.9 * d
    assert ignore_lidar < 1.5
    assert shared_lidar / ignore_lidar > 3


def test_lidar_of_pure_noise_views_is_high_like_rankme():
    # documented limitation: LiDAR is scale-free, so views that ignore the image in *every* direction still span
    # D whitened directions equally (between-image scatter ~ within-image scatter / n_views in all of them)
    v = torch.randn(400, 8, 16, generator=gen(24), dtype=torch.float64)
    assert lidar(v)["lidar"] > 0.8 * 16


def test_lidar_of_perfectly_invariant_views_is_entropy_rank_of_the_centers():
    centers = torch.randn(50, 1, 6, generator=gen(25), dtype=torch.float64) * torch.tensor([4, 2, 1, 1, 0.5, 0.1])
    v = centers.expand(50, 5, 6)  # S_w = delta * I, so the whitened matrix is S_b / delta
    expected = entropy_rank_closed_form(covariance_eigenvalues(centers[:, 0]).numpy(), 1e-8)
    assert lidar(v)["lidar"] == pytest.approx(expected, rel=1e-9)
    assert lidar(torch.ones(10, 3, 4))["lidar"] == 0.0  # nothing separates images


# ---------------------------------------------------------------- summary and bad input


def test_spectrum_summary_combines_metrics_and_survives_tiny_spectra():
    z = torch.randn(300, 128, generator=gen(26))
    out = spectrum_summary(z, top=10)
    assert out["rankme"]["rankme"] == pytest.approx(rankme(z)["rankme"])
    assert out["alpha_req"]["alpha"] == pytest.approx(alpha_req(z)["alpha"])
    s = singular_values(z)
    np.testing.assert_allclose(out["singular_values"], (s[:10] / s[0]).numpy(), rtol=1e-12)
    small = spectrum_summary(torch.randn(20, 8, generator=gen(27)))
    assert small["alpha_req"] is None and "at least 3" in small["alpha_req_error"]
    assert math.isfinite(small["rankme"]["rankme"])


@pytest.mark.parametrize(
    "fn, bad, match",
    [
        (rankme, torch.randn(10), "2-D"),
        (rankme, torch.randn(4, 5, 6), "2-D"),
        (rankme, torch.randn(1, 5), "at least 2 samples"),
        (rankme, torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
        (alpha_req, torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN or Inf"),
        (covariance_eigenvalues, np.zeros((4, 3)), "torch.Tensor"),
        (lidar, torch.randn(10, 4), "3-D"),
        (lidar, torch.randn(1, 4, 3), "at least 2 images"),
        (lidar, torch.randn(5, 1, 3), "at least 2 views"),
    ],
)
def test_bad_input_raises_value_error_with_explanation(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(bad)


def test_alpha_req_with_precomputed_eigenvalues_equals_computing_them():
    from selfsup.evaluate.spectrum import covariance_eigenvalues

    z = torch.randn(400, 64, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 65).pow(-0.8)
    # The SVD behind the eigenvalues runs twice here; multi-threaded LAPACK/BLAS kernels are not bit-reproducible
    # from call to call on every CPU (1.6347129910115634 vs ...625 seen on an Intel Xeon with AVX-512), so the two
    # results must agree to 1e-9 relative, not bit for bit.
    given = alpha_req(z, (3, 40), eigenvalues=covariance_eigenvalues(z))
    computed = alpha_req(z, (3, 40))
    assert given.keys() == computed.keys()
    for key in ("alpha", "r2"):
        assert given[key] == pytest.approx(computed[key], rel=1e-9, abs=1e-12), key
    assert {k: v for k, v in given.items() if k not in ("alpha", "r2")} == \
        {k: v for k, v in computed.items() if k not in ("alpha", "r2")}
