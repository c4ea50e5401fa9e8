"""Deep-metric-learning losses (cookbook §2.2, §2.6.1) against per-sample loops written from their equations.

Everything runs in float64; TOL = 1e-10 (relative, floor 1) is summation-order noise between a Python loop and
vectorized torch. Comparisons with `nt_xent` use 1e-5, because `nt_xent` computes in float32.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning import (
    UNIFIED_FAMILY,
    dcl_loss,
    dclw_loss,
    info_nce,
    margin_contrastive_loss,
    n_pair_loss,
    nca_loss,
    npid_bank_update,
    npid_loss,
    nt_xent,
    supcon,
    supcon_loss,
    triplet_loss,
    unified_contrastive,
)

TOL = 1e-10
F32_TOL = 1e-5
LABELS = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])  # repeats, and one class (3) with a single sample


def close(a, b, tol=TOL):
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


# ---------------------------------------------------------------------------------------------- naive references


def naive_margin(z1, z2, same, m, squared):
    total = 0.0
    for b in range(len(z1)):
        d = dist(z1[b], z2[b])
        if squared:
            total += 0.5 * d ** 2 if same[b] else 0.5 * max(0.0, m - d) ** 2
        else:
            total += d if same[b] else max(0.0, m - d) ** 2
    return total / len(z1)


def naive_nca(z, y, normalization):
    n = len(z)
    y = y.tolist()
    e = [[math.exp(-dist(z[i], z[j]) ** 2) for j in range(n)] for i in range(n)]
    if normalization == "global":
        denom = sum(e[k][l] for k in range(n) for l in range(n) if k != l)
        return -sum(e[i][j] for i in range(n) for j in range(n) if i != j and y[i] == y[j]) / denom
    total = 0.0
    for i in range(n):
        denom = sum(e[i][k] for k in range(n) if k != i)
        total += sum(e[i][j] / denom for j in range(n) if j != i and y[j] == y[i])
    return -total / n


def naive_triplet(z, y, m, mining, squared=False):
    n = len(z)
    y = y.tolist()

    def d(i, j):
        return dist(z[i], z[j]) ** 2 if squared else dist(z[i], z[j])

    terms = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [k for k in range(n) if y[k] != y[a]]
        if not pos or not neg:
            continue
        if mining == "hard":
            terms.append(max(0.0, max(d(a, p) for p in pos) - min(d(a, k) for k in neg) + m))
        elif mining == "semi-hard":
            for p in pos:
                farther = [d(a, k) for k in neg if d(a, k) > d(a, p)]
                d_an = min(farther) if farther else max(d(a, k) for k in neg)
                terms.append(max(0.0, d(a, p) - d_an + m))
        else:
            terms += [max(0.0, d(a, p) - d(a, k) + m) for p in pos for k in neg]
    return sum(terms) / len(terms)


def naive_n_pair(a, p, reg):
    n = len(a)
    total = 0.0
    for i in range(n):
        total += math.log(1 + sum(math.exp(dot(a[i], p[j]) - dot(a[i], p[i])) for j in range(n) if j != i))
    penalty = 0.25 * reg * (sum(dot(x, x) for x in a) / n + sum(dot(x, x) for x in p) / n)
    return total / n + penalty


def naive_npid(z, index, bank, t):
    total = 0.0
    for i in range(len(z)):
        sims = [cos(z[i], v) / t for v in bank]
        total += -math.log(math.exp(sims[int(index[i])]) / sum(math.exp(s) for s in sims))
    return total / len(z)


def naive_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(cos(q[i], k[i]) / t)
        if queue is None:
            denom = sum(math.exp(cos(q[i], k[j]) / t) for j in range(len(k)))
        else:
            denom = pos + sum(math.exp(cos(q[i], v) / t) for v in queue)
        total += -math.log(pos / denom)
    return total / len(q)


def both_views(z1, z2):
    z = torch.cat([z1, z2])
    n = len(z1)
    return z, n, (lambda i: i + n if i < n else i - n)


def naive_dcl(z1, z2, t, sigma=None):
    z, n, partner = both_views(z1, z2)
    if sigma is not None:
        e = [math.exp(cos(z1[j], z2[j]) / sigma) for j in range(n)]
        w = [2 - n * e[j] / sum(e) for j in range(n)]
    total = 0.0
    for i in range(2 * n):
        pos = cos(z[i], z[partner(i)]) / t
        neg = math.log(sum(math.exp(cos(z[i], z[k]) / t) for k in range(2 * n) if k not in (i, partner(i))))
        weight = 1.0 if sigma is None else w[i % n]
        total += -weight * pos + neg
    return total / (2 * n)


def naive_nt_xent(z1, z2, t):
    z, n, partner = both_views(z1, z2)
    total = 0.0
    for i in range(2 * n):
        denom = sum(math.exp(cos(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(z[i], z[partner(i)]) / t) / denom)
    return total / (2 * n)


def naive_supcon(zs, y, t):
    z = torch.cat(zs)
    labels = y.tolist() * len(zs)
    terms = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(cos(z[i], z[a]) / t) for a in range(len(z)) if a != i)
        terms.append(-sum(math.log(math.exp(cos(z[i], z[p]) / t) / denom) for p in pos) / len(pos))
    return sum(terms) / len(terms)


NAIVE_PHI_PSI = {  # straight from the table of Fig. 8 / Tian 2022 Fig. 1, phi(sum_j psi(x_j))
    "infonce": (lambda s, t, e, m: t * math.log(e + s), lambda x, t, e, m: math.exp(x / t)),
    "mine": (lambda s, t, e, m: math.log(s), lambda x, t, e, m: math.exp(x)),
    "triplet": (lambda s, t, e, m: s, lambda x, t, e, m: max(0.0, x + m)),
    "soft_triplet": (lambda s, t, e, m: t * math.log(1 + s), lambda x, t, e, m: math.exp((x + m) / t)),
    "n_plus_1_tuple": (lambda s, t, e, m: math.log(1 + s), lambda x, t, e, m: math.exp(x)),
    "lifted": (lambda s, t, e, m: max(0.0, math.log(s)) ** 2, lambda x, t, e, m: math.exp(x + m)),
}


def naive_unified(z1, z2, name, tau, eps, margin):
    z, n, partner = both_views(z1, z2)
    phi, psi = NAIVE_PHI_PSI[name]
    total = 0.0
    for i in range(2 * n):
        d_pos = dist(z[i], z[partner(i)]) ** 2
        s = sum(psi(d_pos - dist(z[i], z[j]) ** 2, tau, eps, margin) for j in range(2 * n) if j not in (i, partner(i)))
        total += phi(s, tau, eps, margin)
    return total / (2 * n)


def naive_eq16(z1, z2, tau, eps):
    """Eq. (16) as printed: -tau sum_i log(e^{-d_i/tau} / (eps e^{-d_i/tau} + sum_{j != i} e^{-d_ij/tau}))."""
    z, n, partner = both_views(z1, z2)
    total = 0.0
    for i in range(2 * n):
        num = math.exp(-dist(z[i], z[partner(i)]) ** 2 / tau)
        others = sum(math.exp(-dist(z[i], z[j]) ** 2 / tau) for j in range(2 * n) if j not in (i, partner(i)))
        total += -tau * math.log(num / (eps * num + others))
    return total / (2 * n)


# ----------------------------------------------------------------------------------------- against the equations


@pytest.mark.parametrize("squared", [True, False])
def test_margin_contrastive_matches_loop(squared):
    z1, z2 = randn(8, 5, seed=1), randn(8, 5, seed=2) * 0.3
    same = LABELS % 2 == 0
    for m in (0.5, 2.0):
        got = margin_contrastive_loss(z1, z2, same, margin=m, squared=squared)
        assert close(got, naive_margin(z1, z2, same, m, squared))


@pytest.mark.parametrize("normalization", ["anchor", "global"])
def test_nca_matches_loop(normalization):
    z = randn(8, 3, seed=3)
    assert close(nca_loss(z, LABELS, normalization), naive_nca(z, LABELS, normalization))


@pytest.mark.parametrize("mining", ["hard", "semi-hard", "all"])
@pytest.mark.parametrize("squared", [False, True])
def test_triplet_matches_loop(mining, squared):
    z = randn(8, 4, seed=4)
    for m in (0.2, 1.5):
        got = triplet_loss(z, LABELS, margin=m, mining=mining, squared=squared)
        assert close(got, naive_triplet(z, LABELS, m, mining, squared))


def test_n_pair_matches_sohn_form():
    a, p = randn(6, 4, seed=5), randn(6, 4, seed=6)
    for reg in (0.0, 0.002, 0.5):
        assert close(n_pair_loss(a, p, l2_reg=reg), naive_n_pair(a, p, reg))


def test_npid_matches_loop():
    z, bank = randn(5, 4, seed=7), F.normalize(randn(12, 4, seed=8), dim=1)
    index = torch.tensor([3, 0, 11, 7, 3])
    for t in (0.07, 0.5):
        assert close(npid_loss(z, index, bank, temperature=t), naive_npid(z, index, bank, t))


def test_info_nce_matches_loop_with_queue_and_in_batch():
    q, k, queue = randn(6, 4, seed=9), randn(6, 4, seed=10), randn(15, 4, seed=11)
    assert close(info_nce(q, k, queue, temperature=0.2), naive_info_nce(q, k, queue, 0.2))
    assert close(info_nce(q, k, temperature=0.3), naive_info_nce(q, k, None, 0.3))


def test_dcl_and_dclw_match_loop():
    z1, z2 = randn(6, 5, seed=12), randn(6, 5, seed=13)
    assert close(dcl_loss(z1, z2, temperature=0.2), naive_dcl(z1, z2, 0.2))
    for sigma in (0.5, 2.0):
        assert close(dclw_loss(z1, z2, temperature=0.2, sigma=sigma), naive_dcl(z1, z2, 0.2, sigma))


@pytest.mark.parametrize("n_views", [1, 2, 3])
def test_supcon_matches_loop(n_views):
    zs = [randn(8, 4, seed=20 + v) for v in range(n_views)]
    assert close(supcon_loss(zs, LABELS, temperature=0.1), naive_supcon(zs, LABELS, 0.1))


@pytest.mark.parametrize("name", sorted(UNIFIED_FAMILY))
def test_unified_choices_match_phi_psi_loop(name):
    z1, z2 = randn(5, 3, seed=14) * 0.6, randn(5, 3, seed=15) * 0.6
    for tau, eps, margin in [(0.5, 1.0, 0.2), (1.0, 0.5, 0.7)]:
        got = unified_contrastive(z1, z2, name, tau=tau, eps=eps, margin=margin)
        assert close(got, naive_unified(z1, z2, name, tau, eps, margin)), name


def test_unified_infonce_is_equation_16():
    z1, z2 = randn(6, 4, seed=16), randn(6, 4, seed=17)
    for tau, eps in [(0.2, 1.0), (0.5, 0.0), (1.0, 0.3)]:
        assert close(unified_contrastive(z1, z2, "infonce", tau=tau, eps=eps), naive_eq16(z1, z2, tau, eps))


# ------------------------------------------------------------------------------------------------------ properties


def test_unified_on_unit_vectors_is_scaled_nt_xent_and_dcl():
    # eps = 1: tau * NT-Xent at cosine temperature tau/2; eps = 0: tau * DCL (cookbook, after eq. (16))
    z1, z2 = randn(7, 5, seed=18), randn(7, 5, seed=19)
    tau = 0.4
    got = unified_contrastive(z1, z2, "infonce", tau=tau, eps=1.0, normalize=True)
    assert close(got, tau * nt_xent(z1, z2, temperature=tau / 2), F32_TOL)
    assert close(got, tau * naive_nt_xent(z1, z2, tau / 2))
    got = unified_contrastive(z1, z2, "infonce", tau=tau, eps=0.0, normalize=True)
    assert close(got, tau * dcl_loss(z1, z2, temperature=tau / 2))


def test_unified_callables_equal_named_choice_and_named_forms_do_not_overflow():
    z1, z2 = randn(5, 3, seed=21), randn(5, 3, seed=22)
    named = unified_contrastive(z1, z2, "triplet", margin=0.3)
    custom = unified_contrastive(z1, z2, lambda s: s, lambda x: torch.relu(x + 0.3))
    assert close(named, custom)
    named = unified_contrastive(z1, z2, "infonce", tau=0.5, eps=1.0)
    custom = unified_contrastive(z1, z2, lambda s: 0.5 * torch.log(1.0 + s), lambda x: torch.exp(x / 0.5))
    assert close(named, custom)
    # squared distances ~1e4 / tau: exp overflows float64, the log-sum-exp forms do not
    big = unified_contrastive(z1 * 100, z2 * 100, "infonce", tau=0.2)
    assert torch.isfinite(big)


def test_dcl_drops_exactly_the_positive_from_the_denominator():
    # NT-Xent_i - DCL_i = log(1 + e^{s_ii'} / sum_{k != i,i'} e^{s_ik}): the only difference is the positive's term
    z1, z2 = randn(6, 4, seed=23), randn(6, 4, seed=24)
    t = 0.3
    z, n, partner = both_views(F.normalize(z1, dim=1), F.normalize(z2, dim=1))
    gap = 0.0
    for i in range(2 * n):
        neg = sum(math.exp(dot(z[i], z[k]) / t) for k in range(2 * n) if k not in (i, partner(i)))
        gap += math.log(1 + math.exp(dot(z[i], z[partner(i)]) / t) / neg)
    gap /= 2 * n
    assert close(nt_xent(z1, z2, temperature=t) - dcl_loss(z1, z2, temperature=t), gap, F32_TOL)
    assert close(naive_nt_xent(z1, z2, t) - dcl_loss(z1, z2, temperature=t), gap)


def test_dclw_is_dcl_for_flat_sigma_and_weight_gradient_is_optional():
    z1, z2 = randn(6, 4, seed=25), randn(6, 4, seed=26)
    # sigma -> infinity: every weight -> 1, DCLW -> DCL
    assert close(dclw_loss(z1, z2, 0.2, sigma=1e9), dcl_loss(z1, z2, 0.2), 1e-8)
    # the same value with the weight's gradient on or off; different gradients
    z1.requires_grad_(True)
    a = dclw_loss(z1, z2, 0.2, detach_weight=True)
    (ga,) = torch.autograd.grad(a, z1)
    b = dclw_loss(z1, z2, 0.2, detach_weight=False)
    (gb,) = torch.autograd.grad(b, z1)
    assert close(a, b) and not torch.allclose(ga, gb)


def test_supcon_distinct_labels_two_views_is_nt_xent():
    z1, z2 = randn(8, 5, seed=27), randn(8, 5, seed=28)
    got = supcon([z1, z2], torch.arange(8), temperature=0.2)
    assert close(got, nt_xent(z1, z2, temperature=0.2), F32_TOL)
    assert close(got, naive_nt_xent(z1, z2, 0.2))


def test_info_nce_in_batch_is_cross_entropy_and_moco_v3_scale():
    q, k = randn(6, 4, seed=29), randn(6, 4, seed=30)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    assert close(info_nce(q, k, temperature=0.2), F.cross_entropy(logits, torch.arange(6)))
    assert close(info_nce(q, k, temperature=0.2, scale_by_2tau=True), 0.4 * info_nce(q, k, temperature=0.2))


def test_no_gradient_through_detached_branches():
    q, k = randn(6, 4, seed=31).requires_grad_(True), randn(6, 4, seed=32).requires_grad_(True)
    queue = randn(9, 4, seed=33).requires_grad_(True)
    info_nce(q, k.detach()).backward()
    assert k.grad is None and q.grad is not None and q.grad.abs().sum() > 0
    info_nce(q, k, negatives=queue).backward()
    assert queue.grad is None and k.grad is not None
    bank = F.normalize(randn(10, 4, seed=34), dim=1).requires_grad_(True)
    npid_loss(q, torch.arange(6), bank).backward()
    assert bank.grad is None


def test_npid_bank_update_by_hand():
    rows, z = F.normalize(randn(3, 4, seed=35), dim=1), randn(3, 4, seed=36)
    new = npid_bank_update(rows, z, momentum=0.5)
    by_hand = 0.5 * rows + 0.5 * z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(new, by_hand / by_hand.norm(dim=1, keepdim=True), atol=TOL, rtol=0)
    assert torch.allclose(new.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=TOL, rtol=0)
    assert torch.allclose(npid_bank_update(rows, z, momentum=1.0), rows, atol=TOL, rtol=0)


def test_known_minima():
    # margin loss: positives coincide, negatives farther than the margin -> 0
    z1 = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 1.0], [0.0, 9.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    same = torch.tensor([True, False, True, False])
    for squared in (True, False):
        z = z1.clone().requires_grad_(True)
        loss = margin_contrastive_loss(z, z2, same, margin=2.0, squared=squared)
        loss.backward()
        assert abs(loss.item()) < TOL and torch.isfinite(z.grad).all()  # finite gradient at zero distance
    # triplet: tight classes farther apart than the margin -> 0 for every mining
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    z = centers[y] + 0.01 * randn(8, 2, seed=37)
    for mining in ("hard", "semi-hard", "all"):
        assert abs(float(triplet_loss(z, y, margin=1.0, mining=mining))) < TOL


def test_triplet_gradients_finite_with_a_lonely_class_and_duplicates():
    z = randn(8, 3, seed=38)
    z = torch.cat([z[:7], z[:1]]).requires_grad_(True)  # sample 7 duplicates sample 0 (distance exactly 0)
    for mining in ("hard", "semi-hard", "all"):
        (g,) = torch.autograd.grad(triplet_loss(z, LABELS, mining=mining), z)
        assert torch.isfinite(g).all(), mining


def _cases():
    """name -> loss(z1, z2, labels, index) for every loss, in the form the batch-order test needs."""
    bank = F.normalize(randn(8, 4, seed=39), dim=1)
    return {
        "margin": lambda a, b, y, i: margin_contrastive_loss(a, b, y % 2 == 0),
        "nca_anchor": lambda a, b, y, i: nca_loss(a, y),
        "nca_global": lambda a, b, y, i: nca_loss(a, y, "global"),
        "triplet_hard": lambda a, b, y, i: triplet_loss(a, y),
        "triplet_semi": lambda a, b, y, i: triplet_loss(a, y, mining="semi-hard"),
        "triplet_all": lambda a, b, y, i: triplet_loss(a, y, mining="all"),
        "n_pair": lambda a, b, y, i: n_pair_loss(a, b),
        "npid": lambda a, b, y, i: npid_loss(a, i, bank),
        "info_nce": lambda a, b, y, i: info_nce(a, b),
        "dcl": lambda a, b, y, i: dcl_loss(a, b),
        "dclw": lambda a, b, y, i: dclw_loss(a, b),
        "supcon": lambda a, b, y, i: supcon_loss([a, b], y),
        **{f"unified_{k}": (lambda a, b, y, i, k=k: unified_contrastive(a, b, k)) for k in UNIFIED_FAMILY},
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_invariant_to_batch_order(name):
    fn = _cases()[name]
    z1, z2, index = randn(8, 4, seed=40), randn(8, 4, seed=41), torch.arange(8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert close(fn(z1[perm], z2[perm], LABELS[perm], index[perm]), fn(z1, z2, LABELS, index))


@pytest.mark.parametrize("name", sorted(_cases()))
def test_half_precision_inputs_compute_in_float32(name):
    z1, z2 = randn(8, 4, seed=42).bfloat16(), randn(8, 4, seed=43).bfloat16()
    loss = _cases()[name](z1, z2, LABELS, torch.arange(8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -------------------------------------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_input():
    z, z_bad = randn(4, 3), randn(5, 3)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="same .batch, dim. shape"):
        dcl_loss(z, z_bad)
    with pytest.raises(ValueError, match="same .batch, dim. shape"):
        info_nce(z, z_bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        supcon_loss([z, z], y, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        npid_loss(z, torch.arange(4), F.normalize(randn(6, 3), dim=1), temperature=0.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        dclw_loss(z, z, sigma=0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        unified_contrastive(z, z, tau=0.0)
    with pytest.raises(ValueError, match="needs class labels"):
        supcon_loss([z, z], None)
    with pytest.raises(ValueError, match="needs class labels"):
        triplet_loss(z, None)
    with pytest.raises(ValueError, match="needs class labels"):
        nca_loss(z, None)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        supcon_loss([z, z], torch.arange(5))
    with pytest.raises(ValueError, match=r"zs\[1\] has"):
        supcon_loss([z, z_bad], y)
    with pytest.raises(ValueError, match="non-empty list"):
        supcon_loss([], y)
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss(z, y, mining="hardest")
    with pytest.raises(ValueError, match="margin must be > 0"):
        margin_contrastive_loss(z, z, y == 0, margin=0.0)
    with pytest.raises(ValueError, match=r"same must have shape \(4,\)"):
        margin_contrastive_loss(z, z, torch.tensor([True]))
    with pytest.raises(ValueError, match="negatives must be"):
        info_nce(z, z, negatives=randn(7, 2))
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 6\)"):
        npid_loss(z, torch.tensor([0, 1, 2, 6]), F.normalize(randn(6, 3), dim=1))
    with pytest.raises(ValueError, match="bank must be"):
        npid_loss(z, torch.arange(4), randn(6, 2))
    with pytest.raises(ValueError, match="unknown phi 'infonc'"):
        unified_contrastive(z, z, "infonc")
    with pytest.raises(ValueError, match="fixes psi"):
        unified_contrastive(z, z, "infonce", psi=torch.exp)
    with pytest.raises(ValueError, match="momentum must lie in"):
        npid_bank_update(z, z, momentum=1.5)
