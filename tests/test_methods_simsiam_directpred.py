"""SimSiam and DirectPred (cookbook §2.3): their pure functions against their formulas, SimSiam's constant predictor
lr under the trainer, DirectPred's running correlation once per optimizer step and equal on 2 processes as on 1, and
exact resume of both."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port
from test_train import tiny
from torch import nn

import selfsup.distributed
import selfsup.methods.self_distillation.directpred  # noqa: F401  (registers "directpred")
import selfsup.methods.self_distillation.simsiam  # noqa: F401  (registers "simsiam")
from selfsup.cli import main
from selfsup.config import build_config
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation.directpred import directpred_predictor, update_correlation
from selfsup.losses.self_distillation.simsiam import simsiam_loss
from selfsup.methods import get_method
from selfsup.methods.base import Progress
from selfsup.optim import build_optimizer, set_lr

QUIET = ["model.backbone=resnet10", "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false",
         "eval.label_free=false", "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none"]
PARAMS = {"simsiam": ["simsiam.predictor_hidden=8"], "directpred": []}
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)


def _argv(method, root, out, *extra):
    return ["train", method, *[a for a in tiny(root, out, *QUIET, *PARAMS[method], *extra)
                               if not a.startswith("byol.")]]


def _ckpt(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)


def _build(method, *overrides):
    entry = get_method(method)
    cfg = build_config(method, ["model.backbone=resnet10", "model.width=4", "model.projector_hidden=32",
                                "model.projector_out=16", "views.size=16", *PARAMS[method], *overrides],
                       params_cls=entry.params_cls)
    torch.manual_seed(0)
    return entry.build(cfg, INFO)


# ------------------------------------------------------------------------------------------- SimSiam


def test_simsiam_loss_is_eq_11_and_relates_to_the_negative_cosine():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    loop = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(6)) / 6
    torch.testing.assert_close(simsiam_loss(p, z).double(), loop, rtol=1e-6, atol=1e-6)  # computed in float32
    neg_cos = -F.cosine_similarity(p, z, dim=-1).mean()  # Chen and He's D(p, z)
    torch.testing.assert_close(simsiam_loss(p, z).double(), 2 + 2 * neg_cos, rtol=1e-6, atol=1e-6)


def test_simsiam_target_branch_gets_no_gradient():
    p = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    simsiam_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None  # the stop-gradient: nothing flows back through the target
    m = _build("simsiam")
    x = torch.randn(8, 1, 16, 16)
    views = m.view_maker(x, torch.Generator().manual_seed(0))
    m(views, Progress(0, 10, 5))["loss"].backward()
    assert all(q.grad is not None for q in m.predictor.parameters())


def test_simsiam_loss_of_two_views_is_the_papers_plus_one():
    m = _build("simsiam").eval()
    x = torch.randn(8, 1, 16, 16)
    views = m.view_maker(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = m(views, Progress(0, 10, 5))["loss"]
        z = [m.projector(m.encoder(v)) for v in views.crops]
        p = [m.predictor(zi) for zi in z]
        paper = -(F.cosine_similarity(p[0], z[1]).mean() + F.cosine_similarity(p[1], z[0]).mean()) / 2
    torch.testing.assert_close(loss, 1 + paper, rtol=1e-5, atol=1e-5)


def test_set_lr_keeps_constant_lr_groups_at_the_peak():
    w, b, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.5},
                           {"params": [q], "lr_scale": 0.5, "constant_lr": True}], lr=1.0)
    set_lr(opt, 0.1, peak_lr=2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05, 1.0], rel=1e-12)
    opt2 = torch.optim.SGD([{"params": [w]}], lr=1.0)
    set_lr(opt2, 0.3)  # no constant group: peak_lr not needed, as before
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.3, rel=1e-12)
    with pytest.raises(ValueError, match="pass peak_lr"):
        set_lr(opt, 0.1)


def test_simsiam_puts_the_predictor_in_constant_lr_groups_with_the_decay_split():
    m = _build("simsiam")
    groups = m.param_groups(0.1)
    pred = {id(p) for p in m.predictor.parameters()}
    fixed = [g for g in groups if g.get("constant_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == pred
    assert all(id(p) not in pred for g in groups if not g.get("constant_lr") for p in g["params"])
    assert sorted(g["weight_decay"] for g in fixed) == [0.0, 0.1]  # weights decayed, biases / BN not
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])
    plain = _build("simsiam", "simsiam.fix_predictor_lr=false").param_groups(0.1)
    assert not any(g.get("constant_lr") for g in plain)
    build_optimizer("sgd", m, 0.1, 0.1, groups=groups)  # the flag travels through build_optimizer


def test_simsiam_predictor_lr_stays_at_the_peak_under_the_trainer(tiny_fmnist, tmp_path):
    out = tmp_path / "run"
    assert main(_argv("simsiam", tiny_fmnist, out, "train.max_steps=3")) == 0
    groups = _ckpt(out)["optimizer"]["param_groups"]
    peak = 1e-3  # optim.base_lr with lr_rule none
    # 8 steps, 4 warm-up steps: the last set_lr (step index 2) gave the others 3/4 of the peak
    for g in groups:
        want = peak * g["lr_scale"] * (1.0 if g.get("constant_lr") else 3 / 4)
        assert g["lr"] == pytest.approx(want, rel=1e-9), g.get("constant_lr")
    assert any(g.get("constant_lr") for g in groups) and not all(g.get("constant_lr") for g in groups)


# ------------------------------------------------------------------------------------------- DirectPred


def test_update_correlation_follows_eq_19():
    g = torch.Generator().manual_seed(0)
    z, prev = torch.randn(10, 4, generator=g), torch.randn(4, 4, generator=g, dtype=torch.float64)
    batch = sum(torch.outer(r, r) for r in z.double()) / 10
    torch.testing.assert_close(update_correlation(None, z, 0.3), batch, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update_correlation(prev, z, 0.3), 0.3 * prev + 0.7 * batch, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rho"):
        update_correlation(prev, z, 1.0)


def test_directpred_predictor_follows_eq_18():
    s = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    p = (s / 4).sqrt() + 0.1  # 1.1, 0.6, 0.35, 0.1
    torch.testing.assert_close(directpred_predictor(torch.diag(s), 0.1), torch.diag(p), rtol=0, atol=1e-12)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rotated = q @ torch.diag(s) @ q.T
    # the zero eigenvalue comes back as +-1e-16: its square root (~1e-8) bounds the agreement
    torch.testing.assert_close(directpred_predictor(rotated, 0.1), q @ torch.diag(p) @ q.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(directpred_predictor(torch.zeros(3, 3), 0.1), 0.1 * torch.eye(3))
    with pytest.raises(ValueError, match="eps"):
        directpred_predictor(rotated, -0.1)


def test_directpred_updates_once_per_step_from_all_micro_batches():
    m = _build("directpred", "directpred.freq=2")
    assert torch.equal(m.predictor_weight, torch.eye(16))
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    m.stage(z1)
    m.stage(z2)  # two micro-batches, one optimizer step
    m.on_step_end(Progress(1, 10, 5))
    want = update_correlation(None, torch.cat([z1, z2]), 0.3)
    torch.testing.assert_close(m.corr, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.predictor_weight, directpred_predictor(want, 0.01).float(), rtol=0, atol=1e-6)
    assert int(m.corr_updates) == 1 and not m._staged
    z3 = torch.randn(6, 16)
    m.stage(z3)
    w_before = m.predictor_weight.clone()
    m.on_step_end(Progress(2, 10, 5))  # step index 1: freq=2 keeps the predictor, F still moves
    torch.testing.assert_close(m.corr, update_correlation(want, z3, 0.3), rtol=0, atol=1e-12)
    assert torch.equal(m.predictor_weight, w_before)
    assert not any(n == "predictor_weight" for n, _ in m.named_parameters())  # a buffer: never trained


def test_directpred_step_under_accumulation(tiny_fmnist, tmp_path):
    out = tmp_path / "acc"
    assert main(_argv("directpred", tiny_fmnist, out, "train.accumulate=2", "train.max_steps=3")) == 0
    state = _ckpt(out)["method"]
    assert int(state["corr_updates"]) == 3  # 3 optimizer steps of 2 micro-batches: 3 updates, not 6
    torch.testing.assert_close(state["predictor_weight"], directpred_predictor(state["corr"], 0.01).float(),
                               rtol=0, atol=1e-6)


def _dp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = _build("directpred")
    z = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    for step in (1, 2):
        half = z[rank * 6:(rank + 1) * 6] * step
        m.stage(half[:3])
        m.stage(half[3:])
        m.on_step_end(Progress(step, 10, 5))
    torch.save({"corr": m.corr, "w": m.predictor_weight}, os.path.join(out_dir, f"dp{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_directpred_on_two_processes_equals_one(tmp_path):
    z = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    one = _build("directpred")
    for step in (1, 2):
        one.stage(z * step)
        one.on_step_end(Progress(step, 10, 5))
    mp.spawn(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # the same rows in another order: equal up to float64 summation rounding
        got = torch.load(tmp_path / f"dp{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["corr"], one.corr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["w"], one.predictor_weight, rtol=1e-6, atol=1e-6)
    local = update_correlation(update_correlation(None, z[:6], 0.3), z[:6] * 2, 0.3)  # negative control
    assert (local - one.corr).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- both: resume


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_method_trains_moves_its_state_and_resumes_exactly(method, tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(method, tiny_fmnist, b, "train.max_steps=3")) == 0  # 256 images / 64: 4 steps per epoch
    assert main(_argv(method, tiny_fmnist, b, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(method, tiny_fmnist, a)) == 0
    sa, sb = _ckpt(a)["method"], _ckpt(b)["method"]
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit-identical, F and W_p included
        assert torch.equal(sa[k], sb[k]), k
    fresh = _build(method).state_dict()
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("projector.") for k in moved)
    if method == "simsiam":
        assert any(k.startswith("predictor.") for k in moved) and not any(k.startswith("teacher") for k in sa)
    if method == "directpred":
        assert {"corr", "predictor_weight"} <= moved and int(sa["corr_updates"]) == 8
        assert any(k.startswith("teacher_encoder.") for k in moved)
        torch.testing.assert_close(sa["predictor_weight"], directpred_predictor(sa["corr"], 0.01).float(),
                                   rtol=0, atol=1e-6)
    s = json.loads((a / "summary.json").read_text())
    assert s["steps"] == 8
