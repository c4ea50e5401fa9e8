"""``train.compile=true``: each network of a method is compiled in place; a compiled training step computes what the
eager one does (float tolerance), and checkpoints keep their keys, so a run resumes with or without compilation.

Compiling takes tens of seconds per network on a CPU, so CI compiles two methods (a contrastive one and one with a
predictor and an EMA teacher); ``benchmarks/compile_all.py`` runs a few compiled steps of every method.
"""

import copy

import pytest
import torch

from selfsup.compiled import compile_networks, networks
from selfsup.config import build_config
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.methods import get_method
from selfsup.optim import build_optimizer
from selfsup.train import train_step

INFO = DataInfo("image", (1, 16, 16), (0.5,), (0.25,), 4, "tiny", 64)
SMALL = {"simclr": [], "byol": ["byol.predictor_hidden=32"]}
# inductor fuses and reorders float32 arithmetic: one SGD step of a tiny ResNet lands within ~1e-6 of eager
# (observed); a step that did not run the compiled networks' backward, or another batch, moves weights by > 1e-2
ATOL = 1e-4


def _build(method):
    over = ["model.backbone=resnet10", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
            "views.size=16", *SMALL[method]]
    cfg = build_config(method, over, params_cls=get_method(method).params_cls)
    torch.manual_seed(0)
    return get_method(method).build(cfg, INFO).train()


def test_the_networks_are_the_children_with_parameters():
    assert list(networks(_build("simclr"))) == ["encoder", "projector"]
    byol = networks(_build("byol"))
    assert {"encoder", "projector", "predictor"} <= set(byol) and "view_maker" not in byol
    assert any("teacher" in name or "target" in name for name in byol)  # the EMA copies are networks too


def _two_steps(m):
    opt = build_optimizer("sgd", m, 0.1, 0.0, 0.9)
    x = (torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for step in range(2):
        progress = Progress(step, 10, 5)
        r = train_step(m, m, opt, None, x, None, gen, 1, torch.device("cpu"), None, False, progress)
        m.on_step_end(progress.after())
        losses.append(r.loss)
    return losses, {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_compiled_step_equals_the_eager_step(method):
    torch.set_num_threads(1)
    eager = _build(method)
    compiled = copy.deepcopy(eager)
    assert compile_networks(compiled) == list(networks(eager))
    eager_losses, eager_state = _two_steps(eager)
    compiled_losses, compiled_state = _two_steps(compiled)
    assert compiled_state.keys() == eager_state.keys()  # checkpoints and exports keep their names
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager_losses, compiled_losses))
    moved = max(float((eager_state[k] - _build(method).state_dict()[k]).abs().max())
                for k in eager_state if eager_state[k].is_floating_point())
    assert moved > 1e-2  # the two steps move the weights by far more than the tolerance
    worst = max(float((eager_state[k] - compiled_state[k]).abs().max())
                for k in eager_state if eager_state[k].is_floating_point())
    assert worst < ATOL
