"""The optimizers the trainer builds: fused kernels where PyTorch has them, the same updates as PyTorch's default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.optim import build_optimizer, can_fuse


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # no bias straight before the batch norm: its gradient would be rounding noise (~1e-8), which Adam's
    # normalized step turns into lr-sized moves of either sign, and two paths could not be compared
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))


def _train(opt_factory, steps: int = 6) -> list[torch.Tensor]:
    model = _model()
    opt = opt_factory(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_cpu_optimizers_are_fused_and_update_as_pytorch_default(name):
    opt = build_optimizer(name, _model(), 1e-2, 0.05)
    assert all(g["fused"] is True for g in opt.param_groups)  # the kernel, not the per-tensor Python loop
    ours = _train(lambda m: build_optimizer(name, m, 1e-2, 0.05))

    def default(m):  # PyTorch's own choice (the per-tensor loop on a CPU), on the same groups
        opt = build_optimizer(name, m, 1e-2, 0.05)
        for g in opt.param_groups:
            g["fused"] = None
        return opt

    ref = _train(default)
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(ref, _model().parameters()))
    assert moved > 1e-3  # the steps changed the weights: the comparison below is not of untouched tensors
    for a, b in zip(ours, ref):  # the same formula; the fused kernel may round differently in the last bits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lars_and_unsupported_tensors_keep_their_own_path():
    assert can_fuse([torch.zeros(3, device="meta")]) is None  # a device without the kernel: PyTorch's default
    assert can_fuse([torch.zeros(3, dtype=torch.int64)]) is None
    assert can_fuse([]) is None
    assert can_fuse([nn.Parameter(torch.zeros(3))]) is True
    assert "fused" not in build_optimizer("lars", _model(), 0.1, 1e-6).param_groups[0]


def test_fused_optimizer_state_resumes_exactly():
    """Stopped after 3 steps and rebuilt from the state dicts, 3 more steps give the uninterrupted run's weights."""
    whole = _train(lambda m: build_optimizer("adamw", m, 1e-2, 0.05), steps=6)
    model = _model()
    opt = build_optimizer("adamw", model, 1e-2, 0.05)
    gen = torch.Generator().manual_seed(1)

    def step(model, opt):
        model(torch.randn(32, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step(model, opt)
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    model = _model(seed=5)
    model.load_state_dict(saved_model)
    opt = build_optimizer("adamw", model, 1e-2, 0.05)
    opt.load_state_dict(saved_opt)
    assert all(g["fused"] is True for g in opt.param_groups)
    for _ in range(3):
        step(model, opt)
    for a, b in zip(whole, model.parameters()):
        assert torch.equal(a, b)  # one machine, one kernel: resume is bit-identical
