"""Canonical-correlation losses (cookbook §2.4) against loops written from their equations, closed forms, properties.

Everything runs in float64. TOL bounds the gap between a vectorized loss and a per-entry Python loop computing the same
sums in another order (observed ~1e-15); the whitening comparisons allow CLOSE, for the conditioning of a Cholesky.
"""

import math
from itertools import combinations

import pytest
import torch

from selfsup.losses.canonical_correlation import (
    barlow_twins_loss,
    sinkhorn_knopp,
    swav_loss,
    vicreg_covariance,
    vicreg_invariance,
    vicreg_loss,
    vicreg_variance,
    whiten,
    wmse_loss,
)
from selfsup.losses.self_distillation import sinkhorn_knopp_teacher

TOL = 1e-12
CLOSE = 1e-9


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hadamard_design(n=8):
    """Columns 1.. of a Sylvester-Hadamard matrix: entries +-1, every column zero-mean, columns orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h[:, 1:]


def col(z, j):
    return [float(v) for v in z[:, j]]


def mean(xs):
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------------------------------ VICReg


def naive_variance(z, gamma, eps):
    n, d = z.shape
    total = 0.0
    for j in range(d):
        c = col(z, j)
        var = sum((x - mean(c)) ** 2 for x in c) / (n - 1)
        total += max(0.0, gamma - math.sqrt(var + eps))
    return total / d


def naive_covariance(z):
    n, d = z.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                ci, cj = col(z, i), col(z, j)
                cov = sum((a - mean(ci)) * (b - mean(cj)) for a, b in zip(ci, cj)) / (n - 1)
                total += cov ** 2
    return total / d


def test_vicreg_terms_match_per_entry_loops():
    for n, d, gamma in [(5, 3, 1.0), (16, 6, 1.0), (9, 4, 2.5)]:
        z1, z2 = randn(n, d, seed=n) * 0.7, randn(n, d, seed=n + 1)
        inv = sum((float(a) - float(b)) ** 2 for a, b in zip(z1.flatten(), z2.flatten())) / (n * d)
        assert abs(vicreg_invariance(z1, z2).item() - inv) < TOL
        assert abs(vicreg_variance(z1, gamma, 1e-4).item() - naive_variance(z1, gamma, 1e-4)) < TOL
        assert abs(vicreg_covariance(z1).item() - naive_covariance(z1)) < TOL
        # total = 25 s + 25 (v1 + v2) / 2 + 1 (c1 + c2), the reference's weights and averaging
        v = (naive_variance(z1, gamma, 1e-4) + naive_variance(z2, gamma, 1e-4)) / 2
        c = naive_covariance(z1) + naive_covariance(z2)
        total, terms = vicreg_loss(z1, z2, gamma=gamma, return_terms=True)
        assert abs(total.item() - (25 * inv + 25 * v + c)) < 1e-10
        assert abs(terms["invariance"].item() - inv) < TOL
        assert abs(terms["variance"].item() - v) < TOL and abs(terms["covariance"].item() - c) < TOL
        weighted = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gamma=gamma)
        assert abs(weighted.item() - (2 * inv + 3 * v + 0.5 * c)) < 1e-10


def test_vicreg_properties_on_closed_form_designs():
    h = hadamard_design(8)  # (8, 7): zero-mean, orthogonal columns, unbiased std sqrt(8/7)
    z = 2 * h  # every std 2 sqrt(8/7) > gamma = 1: the hinge is inactive
    assert vicreg_variance(z).item() == 0.0  # relu of negative numbers: exactly 0
    assert vicreg_covariance(z).item() < TOL  # decorrelated dimensions
    assert vicreg_loss(z, z.clone()).item() < TOL
    # below the target: the hinge is gamma - sqrt(var + eps) in every dimension
    assert abs(vicreg_variance(z, gamma=3.0).item() - (3 - math.sqrt(4 * 8 / 7 + 1e-4))) < TOL
    # collapse: zero variance in every dimension gives gamma - sqrt(eps)
    assert abs(vicreg_variance(torch.full((8, 3), 5.0, dtype=torch.float64)).item() - (1 - 0.01)) < TOL
    # batch order does not matter: every term is a statistic of the set of pairs
    z1, z2 = randn(12, 5, seed=1), randn(12, 5, seed=2)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert abs(vicreg_loss(z1[perm], z2[perm]).item() - vicreg_loss(z1, z2).item()) < TOL


def test_vicreg_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(randn(4, 3), randn(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        vicreg_invariance(randn(4, 3), randn(5, 3))
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        vicreg_variance(randn(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_covariance(randn(1, 3))


# ------------------------------------------------------------------------------------------------------ Barlow Twins


def naive_barlow(z1, z2, lambd, eps):
    n, d = z1.shape

    def standardized(z, j):
        c = col(z, j)
        var = sum((x - mean(c)) ** 2 for x in c) / n  # biased, as BatchNorm in training mode
        return [(x - mean(c)) / math.sqrt(var + eps) for x in c]

    a = [standardized(z1, j) for j in range(d)]
    b = [standardized(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(x * y for x, y in zip(a[i], b[j])) / n  # divided by the WHOLE batch size
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2
    return loss


def test_barlow_matches_per_entry_loop():
    for n, d, lambd, eps in [(6, 3, 5e-3, 1e-5), (16, 5, 0.1, 1e-5), (10, 4, 5e-3, 0.0)]:
        z1, z2 = randn(n, d, seed=n) * 3 + 1, randn(n, d, seed=n + 1)
        got = barlow_twins_loss(z1, z2, lambd=lambd, eps=eps).item()
        assert abs(got - naive_barlow(z1, z2, lambd, eps)) < 1e-10 * max(1.0, got)


def test_barlow_closed_forms():
    h = hadamard_design(8)  # standardized already: biased variance 1, decorrelated
    eps = 1e-5
    # z1 == z2 with decorrelated dims: C = I / (1 + eps), so only the eps of the standardization is left
    assert abs(barlow_twins_loss(h, h).item() - 7 * (eps / (1 + eps)) ** 2) < TOL
    assert barlow_twins_loss(h, h.clone(), eps=0.0).item() < TOL
    # opposite views: C = -I / (1 + eps)
    assert abs(barlow_twins_loss(h, -h).item() - 7 * (1 + 1 / (1 + eps)) ** 2) < 1e-10
    # two dimensions swapped: C_ii = 0 on those two, C_ij = C_ji = 1
    swapped = h[:, [1, 0, 2, 3, 4, 5, 6]]
    assert abs(barlow_twins_loss(h, swapped, lambd=0.25, eps=0.0).item() - (2 + 0.25 * 2)) < TOL
    # C is a correlation (divided by N, biased variances): identical views give C_ii = 1 for any data
    z = randn(13, 6, seed=3)
    assert barlow_twins_loss(z, z.clone(), lambd=0.0, eps=0.0).item() < TOL
    # standardization makes the loss blind to a per-dimension affine map and to batch order
    z1, z2 = randn(12, 4, seed=4), randn(12, 4, seed=5)
    scale, shift = torch.tensor([0.5, 2.0, 7.0, 1.5], dtype=torch.float64), randn(4, seed=6)
    base = barlow_twins_loss(z1, z2, eps=0.0).item()
    assert abs(barlow_twins_loss(z1 * scale + shift, z2, eps=0.0).item() - base) < 1e-10
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert abs(barlow_twins_loss(z1[perm], z2[perm], eps=0.0).item() - base) < 1e-10


def test_barlow_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(randn(4, 3), randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(randn(1, 3), randn(1, 3))


# ------------------------------------------------------------------------------------------------------------- W-MSE


def naive_whiten(z, eps=0.0):
    """Loops: unbiased covariance, Cholesky-Banachiewicz, forward substitution L y = z - mean."""
    n, d = z.shape
    m = [mean(col(z, j)) for j in range(d)]
    zc = [[float(z[i, j]) - m[j] for j in range(d)] for i in range(n)]
    cov = [[sum(zc[k][i] * zc[k][j] for k in range(n)) / (n - 1) for j in range(d)] for i in range(d)]
    cov = [[(1 - eps) * cov[i][j] + (eps if i == j else 0.0) for j in range(d)] for i in range(d)]
    low = [[0.0] * d for _ in range(d)]
    for i in range(d):
        for j in range(i + 1):
            s = sum(low[i][k] * low[j][k] for k in range(j))
            low[i][j] = math.sqrt(cov[i][i] - s) if i == j else (cov[i][j] - s) / low[j][j]
    out = []
    for row in zc:
        y = [0.0] * d
        for i in range(d):
            y[i] = (row[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def test_whiten_matches_loop_and_gives_zero_mean_identity_covariance():
    mix = randn(4, 4, seed=1) + 2 * torch.eye(4, dtype=torch.float64)
    z = randn(20, 4, seed=2) @ mix + torch.tensor([3.0, -1.0, 0.5, 10.0], dtype=torch.float64)
    out = whiten(z)
    torch.testing.assert_close(out, naive_whiten(z), rtol=0, atol=CLOSE)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=CLOSE)
    torch.testing.assert_close(out.T @ out / 19, torch.eye(4, dtype=torch.float64), rtol=0, atol=CLOSE)
    torch.testing.assert_close(whiten(z, eps=0.3), naive_whiten(z, eps=0.3), rtol=0, atol=CLOSE)
    # a stack of sub-batches is whitened group by group
    groups = z.view(2, 10, 4)
    stacked = whiten(groups)
    for g in range(2):
        torch.testing.assert_close(stacked[g], naive_whiten(groups[g]), rtol=0, atol=CLOSE)


def naive_wmse(zs, w, iterations, seed):
    g = torch.Generator().manual_seed(seed)
    n = zs[0].shape[0]
    pairs = list(combinations(range(len(zs)), 2))
    total = 0.0
    for _ in range(iterations):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, w):
            idx = perm[start:start + w]
            white = [naive_whiten(z[idx]) for z in zs]
            for a, b in pairs:
                for r in range(w):
                    u, v = white[a][r], white[b][r]
                    total += 2 - 2 * float(u @ v) / (float(u.norm()) * float(v.norm()))
    return total / (n * iterations * len(pairs))


def test_wmse_matches_loop_over_permuted_sub_batches():
    base = randn(24, 3, seed=7)
    zs = [base + 0.5 * randn(24, 3, seed=8 + v) for v in range(3)]  # 3 views: 3 pairs
    for w, iterations in [(8, 2), (12, 1), (24, 3)]:
        got = wmse_loss(zs, w=w, iterations=iterations, generator=torch.Generator().manual_seed(5)).item()
        assert abs(got - naive_wmse(zs, w, iterations, seed=5)) < CLOSE


def test_wmse_properties():
    z = randn(16, 3, seed=1)
    assert wmse_loss([z, z.clone()], w=8, generator=torch.Generator().manual_seed(0)).item() < TOL
    z2 = randn(16, 3, seed=2)
    loss = wmse_loss([z, z2], w=8, generator=torch.Generator().manual_seed(0)).item()
    assert 0.0 < loss < 4.0  # 2 - 2 cos lies in [0, 4]
    # one whitening group holding the whole batch: the loss no longer depends on batch order or on the draw
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    a = wmse_loss([z, z2], w=16, generator=torch.Generator().manual_seed(0)).item()
    b = wmse_loss([z[perm], z2[perm]], w=16, generator=torch.Generator().manual_seed(9)).item()
    assert abs(a - b) < CLOSE


def test_wmse_rejects_bad_input():
    z = randn(16, 3)
    with pytest.raises(ValueError, match="multiple of the whitening sub-batch size"):
        wmse_loss([z, z], w=6)
    with pytest.raises(ValueError, match="multiple of the whitening sub-batch size"):
        wmse_loss([z, z], w=32)  # batch smaller than w
    with pytest.raises(ValueError, match="must exceed the embedding dimension"):
        wmse_loss([randn(16, 8), randn(16, 8)], w=8)
    with pytest.raises(ValueError, match="at least 2 views"):
        wmse_loss([z], w=8)
    with pytest.raises(ValueError, match="same shape"):
        wmse_loss([z, randn(16, 4)], w=8)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        wmse_loss([z, z], w=8, iterations=0)
    with pytest.raises(ValueError, match="more samples than dimensions"):
        whiten(randn(4, 4))
    with pytest.raises(ValueError, match="not positive definite"):
        whiten(torch.cat([z, z[:, :1]], dim=1))  # a repeated dimension
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        whiten(z, eps=-0.1)


# -------------------------------------------------------------------------------------------------------------- SwAV


def naive_sinkhorn(scores, epsilon, iterations):
    """Scaling form Q = Diag(a) exp(S / eps) Diag(b): b makes each prototype's mass 1/K, then a each sample's 1/B."""
    bsz, k = scores.shape
    p = [[math.exp(float(scores[i, j]) / epsilon) for j in range(k)] for i in range(bsz)]
    a, b = [1.0] * bsz, [1.0] * k
    for _ in range(iterations):
        b = [1 / (k * sum(a[i] * p[i][j] for i in range(bsz))) for j in range(k)]
        a = [1 / (bsz * sum(p[i][j] * b[j] for j in range(k))) for i in range(bsz)]
    return torch.tensor([[bsz * a[i] * p[i][j] * b[j] for j in range(k)] for i in range(bsz)], dtype=torch.float64)


def test_sinkhorn_matches_scaling_loop_and_is_doubly_stochastic():
    s = randn(12, 5, seed=1)
    for epsilon, iterations in [(0.5, 1), (0.5, 3), (0.05, 3), (1.0, 10)]:
        expected = naive_sinkhorn(s, epsilon, iterations)
        torch.testing.assert_close(sinkhorn_knopp(s, epsilon, iterations), expected, rtol=1e-10, atol=TOL)
    q = sinkhorn_knopp(s, epsilon=0.5, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64), rtol=0, atol=TOL)  # samples: 1
    converged = sinkhorn_knopp(s, epsilon=0.5, iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((5,), 12 / 5, dtype=torch.float64), rtol=0, atol=1e-9)
    # a per-prototype shift of the scores is cancelled by the first prototype normalization; batch order permutes rows
    shifted = s + torch.tensor([0.3, -2.0, 1.0, 0.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_knopp(shifted, 0.5, 3), q, rtol=1e-10, atol=TOL)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sinkhorn_knopp(s[perm], 0.5, 3), q[perm], rtol=1e-10, atol=TOL)
    # scores / epsilon spanning thousands: exp overflows, and after a max shift whole rows underflow to 0 (0/0)
    sharp = sinkhorn_knopp(s * 100, epsilon=0.05)
    assert torch.isfinite(sharp).all()
    torch.testing.assert_close(sharp.sum(dim=1), torch.ones(12, dtype=torch.float64), rtol=0, atol=TOL)
    assert not sinkhorn_knopp(s.clone().requires_grad_(), 0.5).requires_grad
    # DINOv2's teacher is the same Sinkhorn, with the temperature as epsilon, in float32
    logits = s.float()
    torch.testing.assert_close(sinkhorn_knopp_teacher(logits, 0.5, 3), sinkhorn_knopp(logits, 0.5, 3))


def naive_swav(scores, n_global, temperature, epsilon, iterations, queue=None):
    bsz = scores[0].shape[0]
    loss = 0.0
    for i in range(n_global):
        s = scores[i].detach() if queue is None else torch.cat([queue[i], scores[i].detach()])
        q = naive_sinkhorn(s, epsilon, iterations)[-bsz:]
        sub = 0.0
        for v in range(len(scores)):
            if v == i:
                continue
            for b in range(bsz):
                logits = [float(x) / temperature for x in scores[v][b]]
                log_z = math.log(sum(math.exp(x) for x in logits))
                sub += -sum(float(q[b, k]) * (logits[k] - log_z) for k in range(len(logits))) / bsz
        loss += sub / (len(scores) - 1)
    return loss / n_global


def test_swav_loss_matches_loop_with_multi_crop_and_queue():
    scores = [randn(6, 5, seed=v) for v in range(4)]  # 2 global + 2 local crops
    for kwargs in [dict(temperature=0.1, epsilon=0.05, iterations=3), dict(temperature=0.5, epsilon=0.3, iterations=1)]:
        got = swav_loss(scores, n_global=2, **kwargs).item()
        assert abs(got - naive_swav(scores, 2, **kwargs)) < 1e-10 * max(1.0, got)
    queue = [randn(4, 5, seed=10), randn(4, 5, seed=11)]
    got = swav_loss(scores, n_global=2, temperature=0.2, epsilon=0.1, queue_scores=queue).item()
    assert abs(got - naive_swav(scores, 2, 0.2, 0.1, 3, queue)) < 1e-10 * max(1.0, got)
    assert abs(got - swav_loss(scores, 2, 0.2, 0.1).item()) > 1e-6  # the queue changes the codes
    single = swav_loss(scores, n_global=1).item()
    assert abs(single - naive_swav(scores, 1, 0.1, 0.05, 3)) < 1e-10 * max(1.0, single)


def test_swav_codes_get_no_gradient_and_batch_order_does_not_matter():
    s0, s1 = randn(6, 5, seed=1).requires_grad_(), randn(6, 5, seed=2).requires_grad_()
    tau = 0.3
    swav_loss([s0, s1], n_global=2, temperature=tau, epsilon=0.2).backward()
    q0, q1 = sinkhorn_knopp(s0, 0.2, 3), sinkhorn_knopp(s1, 0.2, 3)
    # only the prediction branch: d/ds_v of the mean cross-entropy is (softmax(s_v / tau) - q) / (tau B), halved
    # by the average over the 2 codes; a gradient through the codes would add terms
    expected1 = (torch.softmax(s1.detach() / tau, dim=1) - q0) / (tau * 6) / 2
    expected0 = (torch.softmax(s0.detach() / tau, dim=1) - q1) / (tau * 6) / 2
    torch.testing.assert_close(s1.grad, expected1, rtol=0, atol=TOL)
    torch.testing.assert_close(s0.grad, expected0, rtol=0, atol=TOL)
    scores = [randn(6, 5, seed=v) for v in range(3)]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert abs(swav_loss([s[perm] for s in scores]).item() - swav_loss(scores).item()) < 1e-10


def test_swav_and_sinkhorn_reject_bad_input():
    s = randn(6, 5)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn_knopp(s, epsilon=0.0)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        sinkhorn_knopp(s, iterations=0)
    with pytest.raises(ValueError, match=r"\(batch, prototypes\)"):
        sinkhorn_knopp(s[0])
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss([s])
    with pytest.raises(ValueError, match="n_global must be in"):
        swav_loss([s, s], n_global=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        swav_loss([s, s], temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        swav_loss([s, randn(6, 4)])
    with pytest.raises(ValueError, match="one tensor per global crop"):
        swav_loss([s, s], queue_scores=[s])
    with pytest.raises(ValueError, match=r"must be \(Q, 5\)"):
        swav_loss([s, s], queue_scores=[randn(3, 4), randn(3, 4)])
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        swav_loss([s, s], epsilon=-1.0)
