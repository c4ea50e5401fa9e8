"""MeanShift (MSF): the loss against a naive loop and its properties (BYOL at k=1, no gradient to the target or the
bank, bank order), 2 processes with half the batch each equal 1 process with all of it, and the method under the
trainer: resume is bit-identical (bank, pointer, target network), the bank fills once per optimizer step, bad
parameters are refused with a clear message."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port
from test_train import tiny

import selfsup.distributed
import selfsup.methods.self_distillation.meanshift  # noqa: F401  (registers "meanshift")
from selfsup.cli import main
from selfsup.config import build_config
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation import byol_loss
from selfsup.losses.self_distillation.meanshift import meanshift_loss
from selfsup.methods import get_method
from selfsup.nn.queues import FeatureQueue

QUIET = ["model.backbone=resnet10", "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false",
         "eval.label_free=false", "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none",
         "meanshift.bank_size=96", "meanshift.k=2", "meanshift.predictor_hidden=32"]
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)


def _data(b=6, n=10, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    p, t = torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)
    bank = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return p, t, bank


def _naive(p, t, bank, k):
    """The MSF loss written out sample by sample, neighbour by neighbour (float64)."""
    total = 0.0
    for i in range(p.shape[0]):
        pi, ti = p[i] / p[i].norm(), t[i] / t[i].norm()
        cos = [float(ti @ bank[j]) for j in range(bank.shape[0])]
        nearest = sorted(range(bank.shape[0]), key=lambda j: -cos[j])[: k - 1]
        terms = [float(((pi - ti) ** 2).sum())] + [float(2 - 2 * (pi @ bank[j])) for j in nearest]
        total += sum(terms) / k
    return total / p.shape[0]


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("k", [1, 2, 5])
def test_loss_matches_a_naive_loop(k):
    p, t, bank = _data()
    got = meanshift_loss(p, t, bank, k)
    assert got.dtype == torch.float64
    assert abs(float(got) - _naive(p, t, bank, k)) < 1e-12  # float64: two summation orders, ~1e-15 apart


def test_k1_with_an_empty_bank_is_byol():
    p, t, _ = _data(dtype=torch.float32)
    got = meanshift_loss(p, t, torch.empty(0, 4), k=1)
    torch.testing.assert_close(got, byol_loss(p, t), rtol=0, atol=1e-6)  # float32, same formula


def test_no_gradient_reaches_the_target_or_the_bank():
    p, t, bank = _data()
    p.requires_grad_(True), t.requires_grad_(True), bank.requires_grad_(True)
    meanshift_loss(p, t, bank, 3).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert t.grad is None and bank.grad is None


def test_loss_does_not_depend_on_the_order_of_the_bank_rows():
    p, t, bank = _data(n=20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(meanshift_loss(p, t, bank[perm], 4), meanshift_loss(p, t, bank, 4), rtol=0,
                               atol=1e-12)  # the same neighbours summed in another order


def test_loss_refuses_bad_k_and_a_too_small_bank():
    p, t, bank = _data(n=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        meanshift_loss(p, t, bank, 0)
    with pytest.raises(ValueError, match="which holds 3 rows"):
        meanshift_loss(p, t, bank, 5)


# ------------------------------------------------------------------------------------------- 2 processes


def _loss_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    p, t, bank = _data(b=8, n=12)
    half = slice(rank * 4, (rank + 1) * 4)
    pr = p[half].clone().requires_grad_(True)
    loss = meanshift_loss(pr, t[half], bank, 3)
    loss.backward()
    q = FeatureQueue(12, 4, init="empty")
    q.stage(F.normalize(t[half], dim=1))
    q.commit()  # gathers both halves in rank order
    torch.save({"loss": loss.detach(), "grad": pr.grad, "bank": q.features}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_two_processes_with_half_the_batch_each_equal_one_process(tmp_path):
    """The loss is a mean of per-sample terms given the same bank: the mean of the two halves' losses is the whole
    batch's, and DDP's average of the two gradients is the whole batch's gradient; the queue then holds the targets of
    both halves in rank order, exactly as one process's commit of the whole batch."""
    p, t, bank = _data(b=8, n=12)
    p.requires_grad_(True)
    one = meanshift_loss(p, t, bank, 3)
    one.backward()
    q = FeatureQueue(12, 4, init="empty")
    q.stage(F.normalize(t, dim=1))
    q.commit()
    mp.spawn(_loss_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    # float64, the same per-sample arithmetic summed in two groups: equal to ~1e-16, 1e-12 stated
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, one.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[0]["grad"], r[1]["grad"]]) / 2, p.grad, rtol=0, atol=1e-12)
    for ri in r:  # rows are copied, not computed: bit identity is the property
        assert torch.equal(ri["bank"], q.features)


# ------------------------------------------------------------------------------------------- under the trainer


def _argv(root, out, *extra):
    return ["train", "meanshift", *[a for a in tiny(root, out, *QUIET, *extra) if not a.startswith("byol.")]]


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]


def test_meanshift_trains_moves_its_state_and_resumes_exactly(tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(tiny_fmnist, b, "train.max_steps=3")) == 0  # 256 images / 64: 4 steps per epoch
    assert main(_argv(tiny_fmnist, b, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(tiny_fmnist, a)) == 0
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit-identical, bank, pointer and target network included
        assert torch.equal(sa[k], sb[k]), k
    cfg = build_config("meanshift", _argv(tiny_fmnist, a)[2:], params_cls=get_method("meanshift").params_cls)
    torch.manual_seed(cfg.seed)
    fresh = get_method("meanshift").build(cfg, INFO).state_dict()
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("predictor.") for k in moved)
    assert any(k.startswith("teacher_encoder.") for k in moved) and any(k.startswith("teacher_projector.") for k in moved)
    assert int(sa["bank.ptr"]) == (8 * 64) % 96 and int(sa["bank.count"]) == 96  # 8 steps of 64 targets, 96 rows
    assert bool((sa["bank.features"] != fresh["bank.features"]).any(dim=1).all())  # 512 > 96: every row written
    torch.testing.assert_close(sa["bank.features"].norm(dim=1), torch.ones(96))  # targets are unit vectors
    assert json.loads((a / "summary.json").read_text())["steps"] == 8


def test_meanshift_writes_the_bank_once_per_optimizer_step_under_gradient_accumulation(tiny_fmnist, tmp_path):
    out = tmp_path / "acc"
    assert main(_argv(tiny_fmnist, out, "train.accumulate=2", "train.max_steps=3", "meanshift.bank_size=100")) == 0
    assert int(_state(out)["bank.ptr"]) == 3 * 64 % 100  # 3 steps of 2 micro-batches of 32: 64 targets a step
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bank_ptr"] for r in records if "bank_ptr" in r] == [64, 28, 92]


def _build(*overrides):
    entry = get_method("meanshift")
    return entry.build(build_config("meanshift", ["batch_size=64", *QUIET, *overrides], params_cls=entry.params_cls),
                       INFO)


def test_meanshift_views_are_strong_online_and_weak_target():
    cfgs = _build().view_maker.global_cfgs
    assert cfgs[0].jitter_p == 0.8 and cfgs[1].jitter_p == 0.0 and cfgs[1].gray_p == 0.0
    assert cfgs[0].scale == cfgs[1].scale  # the same crop distribution for both
    weak = _build("meanshift.augmentation=weak/weak").view_maker.global_cfgs
    assert weak[0] == weak[1]


@pytest.mark.parametrize("overrides, match", [
    (["meanshift.k=0"], r"meanshift.k=0 is out of range: it must be >= 1"),
    (["meanshift.bank_size=16"], "bank_size=16 is smaller than batch_size=64"),
    (["meanshift.augmentation=strong"], "must be one of weak/strong"),
    (["views.n_local=2"], "set views.n_local=0"),
])
def test_meanshift_refuses_bad_params_with_a_clear_message(overrides, match):
    with pytest.raises(ValueError, match=match):
        _build(*overrides)
