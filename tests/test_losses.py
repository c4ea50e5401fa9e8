import math

import torch

from selfsup.losses.metric_learning import multi_view_nt_xent, nt_xent
from selfsup.losses.self_distillation import byol_loss, renorm
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher


def naive_nt_xent(z1, z2, t):
    """Per-pair loop straight from eq. (6): for each of the 2N embeddings, -log(e^{s_pos/t} / sum_{k != i} e^{s_ik/t})."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        cos = [float(torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())) for k in range(2 * n)]
        denom = sum(math.exp(cos[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos[pos] / t) / denom)
    return total / (2 * n)


def test_nt_xent_matches_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    for n, d, t in [(4, 3, 0.5), (7, 16, 0.1), (16, 8, 0.2)]:
        z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
        got = nt_xent(z1, z2, temperature=t).item()
        assert abs(got - naive_nt_xent(z1, z2, t)) < 1e-4 * max(1, abs(got))


def test_nt_xent_closed_form_perfect_alignment():
    # Orthonormal pairs with identical views: cos(pos)=1, cos(neg)=0 -> loss = -log(e^{1/t} / (e^{1/t} + 2N-2)).
    n, t = 5, 0.5
    z = torch.eye(n)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert abs(nt_xent(z, z.clone(), t).item() - expected) < 1e-5


def test_multi_view_two_views_equals_nt_xent_and_pairs_average():
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(6, 4, generator=g) for _ in range(4)]
    assert torch.allclose(multi_view_nt_xent(zs[:2], 2, 0.3), nt_xent(zs[0], zs[1], 0.3))
    # 2 globals + 2 locals: pairs (0,1), (0,2), (0,3), (1,2), (1,3)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    ref = sum(nt_xent(zs[i], zs[j], 0.3) for i, j in pairs) / 5
    assert torch.allclose(multi_view_nt_xent(zs, 2, 0.3), ref)


def test_byol_loss_is_equation_9():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    by_hand = torch.stack([((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(8)]).mean()
    assert torch.allclose(byol_loss(p, z), by_hand, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(p, z).mean()
    assert torch.allclose(byol_loss(p, z), 2 - 2 * cos, atol=1e-6)
    # stop-gradient on the target
    p.requires_grad_(True)
    z.requires_grad_(True)
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None
    assert torch.allclose(renorm(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_cosine_momentum_schedule():
    assert abs(cosine_momentum(0, 100, 0.996) - 0.996) < 1e-12
    assert abs(cosine_momentum(100, 100, 0.996) - 1.0) < 1e-12
    assert abs(cosine_momentum(50, 100, 0.996) - (1 - 0.004 * 0.5)) < 1e-12


def test_ema_update_hand_computation():
    student = torch.nn.Linear(2, 1)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(3.0)
        teacher.weight.copy_(torch.tensor([[5.0, -1.0]]))
        teacher.bias.fill_(0.0)
    ema_update(teacher, student, momentum=0.9)
    assert torch.allclose(teacher.weight, torch.tensor([[0.9 * 5 + 0.1 * 1, 0.9 * -1 + 0.1 * 2]]))
    assert torch.allclose(teacher.bias, torch.tensor([0.3]))
