"""DINO (cookbook eq. (12)): the loss on a hand-checkable case, the center's update and its all-reduce, the frozen
teacher, the last layer frozen in epoch 1, exact resume, a ResNet and a ViT under the trainer, every buffer equal on
2 DDP processes; DINOv2's KoLeo and Sinkhorn-Knopp against their formulas."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from test_train import _args

import selfsup.distributed
from selfsup.cli import main
from selfsup.config import Config, _set, build_config
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation import dino_loss, dino_teacher_probs, koleo_loss, sinkhorn_knopp_teacher
from selfsup.methods import get_method
from selfsup.methods.self_distillation.dino import DINOParams

SMALL = ["dino.out_dim=64", "dino.freeze_last_layer_epochs=1", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "views.n_local=2", "views.local_size=8",
         "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none", "optim.clip_grad=3.0", "eval.linear=false",
         "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false"]


def test_dino_loss_on_a_hand_checked_case():
    tau = 0.1
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[tau * math.log(3), 0.0]])]  # softmax(s1/tau) = (3/4, 1/4)
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    # pairs (teacher 0, student 1): -log(3/4); (teacher 1, student 0): -(0.5 log 1/2 + 0.5 log 1/2) = log 2
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert dino_loss(student, teacher, tau).item() == pytest.approx(expected, rel=1e-6)
    # local crops (index >= number of teacher crops) are student-only: pairs (0,1), (0,2), (1,0), (1,2)
    three = dino_loss(student + [torch.tensor([[0.0, 0.0]])], teacher, tau).item()
    assert three == pytest.approx((math.log(4 / 3) + math.log(2) + math.log(2) + math.log(2)) / 4, rel=1e-6)


def test_dino_teacher_probs_center_then_sharpen():
    logits = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(dino_teacher_probs(logits, torch.tensor([1.0, 0.0]), 0.04), torch.tensor([[0.5, 0.5]]))
    e = math.exp(2)
    torch.testing.assert_close(dino_teacher_probs(logits, torch.zeros(2), 0.5), torch.tensor([[e / (1 + e), 1 / (1 + e)]]))
    assert not dino_teacher_probs(logits.requires_grad_(), torch.zeros(2), 0.5).requires_grad  # stop-gradient


def _dino(seed=0, **params):
    """A DINO whose outputs per sample do not depend on the rest of the batch (ViT, no BN in the head)."""
    cfg = Config(method="dino", params=DINOParams(out_dim=32, hidden_dim=16, bottleneck_dim=8, **params), epochs=2)
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "views.size": 8, "views.n_local": 1,
                 "views.local_size": 4}.items():
        _set(cfg, k, v)
    torch.manual_seed(seed)
    m = get_method("dino").build(cfg, DataInfo("image", (1, 8, 8), (0.5,), (0.5,)))
    # a 1-block ViT is enough here
    for net in (m.encoder, m.teacher_encoder):
        net.blocks = net.blocks[:1]
    return m


def _images(n=8):
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_center_update_follows_its_formula_and_the_teacher_gets_no_gradient():
    m = _dino()
    views = m.view_maker(_images(), torch.Generator().manual_seed(2))
    progress = Progress(0, 10, 5)
    out = m(views, progress)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in [*m.teacher_encoder.parameters(),
                                                                *m.teacher_head.parameters()])
    assert m.encoder.patch_embed.weight.grad is not None
    with torch.no_grad():
        t = torch.cat([m.teacher_head(m.teacher_encoder(c)) for c in views.global_crops])
    m.on_step_end(progress.after())
    torch.testing.assert_close(m.center, 0.1 * t.mean(dim=0), rtol=1e-5, atol=1e-6)  # 0.9 * 0 + 0.1 * batch mean
    assert "center" in m.state_dict() and "_batch_sum" not in m.state_dict()


def _center_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = _dino()
    x = _images()
    n = len(x) // world
    views = m.view_maker(x, torch.Generator().manual_seed(2))
    half = type(views)([c[rank * n:(rank + 1) * n] for c in views.crops], views.n_global)
    with torch.no_grad():
        m(half, Progress(0, 10, 5))
    m.on_step_end(Progress(1, 10, 5))
    torch.save(m.center, os.path.join(out_dir, f"center{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_center_is_the_same_on_two_processes_with_half_batches_as_on_one(tmp_path):
    m = _dino()
    views = m.view_maker(_images(), torch.Generator().manual_seed(2))
    with torch.no_grad():
        m(views, Progress(0, 10, 5))
    m.on_step_end(Progress(1, 10, 5))
    mp.spawn(_center_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # float32; the halves' sums are added in another order
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt", weights_only=True), m.center,
                                   rtol=1e-5, atol=1e-7)


def test_teacher_temperature_warms_up_linearly():
    m = _dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=4)
    assert [round(m.teacher_temperature(e), 4) for e in range(6)] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]


def _proto(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]["head.prototypes"]


def test_last_layer_frozen_in_epoch_one_and_resume_is_exact(tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args("dino", tiny_fmnist, b, *SMALL, "train.max_steps=4")) == 0  # epoch 1 = 4 steps
    cfg = build_config("dino", _args("dino", tiny_fmnist, b, *SMALL)[2:], params_cls=DINOParams)
    torch.manual_seed(cfg.seed)
    fresh = get_method("dino").build(cfg, DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,)))
    assert torch.equal(_proto(b), fresh.head.prototypes.detach())  # unchanged through epoch 1 ...
    state = torch.load(b / "checkpoints/last.pt", weights_only=True)["method"]
    assert not torch.equal(state["head.mlp.0.weight"], fresh.head.mlp[0].weight.detach())  # ... the rest trained
    assert main(_args("dino", tiny_fmnist, b, *SMALL, "resume=auto", "train.max_steps=0")) == 0
    assert not torch.equal(_proto(b), fresh.head.prototypes.detach())  # epoch 2 trains it
    assert main(_args("dino", tiny_fmnist, a, *SMALL)) == 0
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)["method"]
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)["method"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # teacher and center included
    assert sa["center"].abs().sum() > 0
    records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_temp"] == 0.04 for r in records if "loss" in r)


@pytest.mark.parametrize("backbone", [["model.backbone=resnet10"],
                                      ["model.backbone=vit_tiny", "model.patch_size=4", "views.local_size=8"]])
def test_dino_trains_with_a_resnet_and_a_vit(tiny_fmnist, tmp_path, backbone):
    out = tmp_path / "run"
    assert main(_args("dino", tiny_fmnist, out, *SMALL, *backbone, "train.max_steps=2", "epochs=1")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and math.isfinite(s["knn_top1"])


# ------------------------------------------------------------------------------------------- DINOv2 options


def test_koleo_equals_minus_mean_log_nearest_neighbour_distance():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    u = x / x.norm(dim=1, keepdim=True)
    d = torch.cdist(u.double(), u.double()) + torch.eye(12, dtype=torch.float64) * 10  # exclude oneself
    expected = -torch.log(d.min(dim=1).values + 1e-8).mean()
    assert koleo_loss(x).item() == pytest.approx(expected.item(), rel=1e-5)
    # two points at distance 2 (antipodal): -log 2 each
    assert koleo_loss(torch.tensor([[1.0, 0.0], [-3.0, 0.0]])).item() == pytest.approx(-math.log(2), rel=1e-6)


def test_sinkhorn_knopp_rows_are_distributions_and_prototypes_share_the_batch():
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * 3
    q = sinkhorn_knopp_teacher(logits, temperature=0.5, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))  # each sample's target is a distribution
    converged = sinkhorn_knopp_teacher(logits, temperature=0.5, iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 16 / 6), rtol=1e-4, atol=1e-4)  # equipartition
    # one iteration by hand: Q = exp(l/T)^T normalized; rows / row sums / K; columns / column sums / B; x B
    e = torch.exp(logits.double() / 0.5).t()
    e = e / e.sum()
    e = e / e.sum(dim=1, keepdim=True) / 6
    e = e / e.sum(dim=0, keepdim=True) / 16
    torch.testing.assert_close(sinkhorn_knopp_teacher(logits, 0.5, 1), (e * 16).t().float(), rtol=1e-5, atol=1e-6)
    assert not sinkhorn_knopp_teacher(logits.requires_grad_(), 0.5).requires_grad


def _sk_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * 3
    n = 16 // world
    torch.save(sinkhorn_knopp_teacher(logits[rank * n:(rank + 1) * n], 0.5), os.path.join(out_dir, f"q{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_sinkhorn_knopp_on_two_processes_equals_one(tmp_path):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * 3
    whole = sinkhorn_knopp_teacher(logits, 0.5)
    mp.spawn(_sk_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    halves = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-7)


def test_dinov2_options_change_the_loss_as_their_formulas_say():
    x = _images()
    views = _dino().view_maker(x, torch.Generator().manual_seed(2))
    base = _dino()
    koleo = _dino(koleo_weight=0.1)
    out0, out1 = base(views, Progress(0, 10, 5)), koleo(views, Progress(0, 10, 5))
    assert out1["loss"].item() == pytest.approx(out0["loss"].item() + 0.1 * float(out1["koleo"]), rel=1e-5)
    sk = _dino(centering="sinkhorn_knopp")
    out2 = sk(views, Progress(0, 10, 5))
    assert math.isfinite(out2["loss"].item()) and out2["loss"].item() != pytest.approx(out0["loss"].item())
    sk.on_step_end(Progress(1, 10, 5))
    assert sk.center.abs().sum() == 0  # Sinkhorn-Knopp replaces the running center


# ------------------------------------------------------------------------------------------- DDP buffers


def _ddp_worker(rank, world, port, out_dir):
    from selfsup.data.datasets import from_arrays
    from selfsup.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    x = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    data = from_arrays(x, torch.arange(64) % 4, name="tiny/train")
    m = _dino(seed=0)
    cfg = Config(method="dino", params=m.p, out=os.path.join(out_dir, "run"), epochs=2, batch_size=16)
    for k, v in {"optim.name": "adamw", "optim.base_lr": 1e-2, "optim.lr_rule": "none", "optim.warmup_epochs": 0.0,
                 "train.max_steps": 5, "train.knn_every": 0, "train.online_probe": False, "views.size": 8}.items():
        _set(cfg, k, v)
    info = DataInfo("image", (1, 8, 8), (0.5,), (0.5,), 4, "tiny")
    train(cfg, m, data, data=info)
    torch.save(m.state_dict(), os.path.join(out_dir, f"state{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_every_buffer_and_the_teacher_stay_equal_on_two_ddp_processes(tmp_path):
    """5 steps of DINO under DDP without buffer broadcasting: the EMA teacher, the center and every other buffer
    are the same on both processes, though each saw other images and drew other views."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(2))
    assert s0.keys() == s1.keys() and "center" in s0 and any(k.startswith("teacher_") for k in s0)
    fresh = _dino(seed=0).state_dict()
    assert s0["center"].abs().sum() > 0 and not torch.equal(s0["teacher_head.mlp.0.weight"],
                                                            fresh["teacher_head.mlp.0.weight"])  # they did move
    for k in s0:  # all-reduced values are summed in one order on both ranks: equal up to float32 rounding
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
