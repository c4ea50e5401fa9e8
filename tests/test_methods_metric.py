"""The deep-metric-learning methods under the trainer (MoCo v2/v3, NNCLR, DCL/DCLW, SupCon, NPID): a few steps on
tiny data change the state they should (queue and pointer, momentum encoder, memory bank), resume restores it
exactly, the states stay equal on 2 DDP processes, and shuffled BN is the same on 2 processes as on 1."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _ddp_tiny_data, _free_port
from test_train import tiny
from torch import nn

import selfsup.distributed
from selfsup.cli import main
from selfsup.config import build_config
from selfsup.data.types import DataInfo
from selfsup.methods import get_method
from selfsup.nn.shuffle_bn import shuffled_bn_forward

QUIET = ["model.backbone=resnet10", "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false",
         "eval.label_free=false", "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none"]
PARAMS = {
    "moco_v2": ["moco_v2.queue_size=96", "moco_v2.shuffle_bn_groups=4"],
    "moco_v3": ["moco_v3.predictor_hidden=32"],
    "nnclr": ["nnclr.queue_size=96", "nnclr.predictor_hidden=32"],
    "dcl": ["dcl.weighting=vmf"],
    "supcon": [],
    "npid": ["npid.dim=16"],
}
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)


def _argv(method, root, out, *extra):
    return ["train", method, *[a for a in tiny(root, out, *QUIET, *PARAMS[method], *extra)
                               if not a.startswith("byol.")]]


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]


def _fresh(method, root, out):
    cfg = build_config(method, _argv(method, root, out)[2:], params_cls=get_method(method).params_cls)
    torch.manual_seed(cfg.seed)
    return get_method(method).build(cfg, INFO).state_dict()


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_method_trains_moves_its_state_and_resumes_exactly(method, tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(method, tiny_fmnist, b, "train.max_steps=3")) == 0  # 256 images / 64: 4 steps per epoch
    assert main(_argv(method, tiny_fmnist, b, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(method, tiny_fmnist, a)) == 0
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit-identical, queues, banks and momentum encoders included
        assert torch.equal(sa[k], sb[k]), k
    fresh = _fresh(method, tiny_fmnist, a)
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert "encoder.stem.0.weight" in moved or any(k.startswith("encoder.") for k in moved)
    if method == "moco_v2":
        assert int(sa["queue.ptr"]) == (8 * 64) % 96  # 8 steps of 64 keys in a 96-key ring
        assert "queue.features" in moved and any(k.startswith("key_encoder.") for k in moved)
        torch.testing.assert_close(sa["queue.features"].norm(dim=1), torch.ones(96))  # keys are unit vectors
    if method == "moco_v3":
        assert any(k.startswith("key_encoder.") for k in moved) and any(k.startswith("predictor.") for k in moved)
    if method == "nnclr":
        assert int(sa["support.count"]) == 96 and int(sa["support.ptr"]) == (8 * 64) % 96
    if method == "npid":
        assert "bank.bank" in moved
        changed = (sa["bank.bank"] != fresh["bank.bank"]).any(dim=1)
        assert int(changed.sum()) == 256  # 2 epochs over the 256 images: every row was written
    s = json.loads((a / "summary.json").read_text())
    assert s["steps"] == 8


def test_moco_v2_enqueues_once_per_optimizer_step_under_gradient_accumulation(tiny_fmnist, tmp_path):
    out = tmp_path / "acc"
    argv = _argv("moco_v2", tiny_fmnist, out, "train.accumulate=2", "train.max_steps=3", "moco_v2.queue_size=100",
                 "moco_v2.shuffle_bn_groups=2")
    assert main(argv) == 0
    state = _state(out)
    assert int(state["queue.ptr"]) == 3 * 64 % 100  # 3 steps of 2 micro-batches of 32: 64 keys a step
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["queue_ptr"] for r in records if "queue_ptr" in r] == [64, 28, 92]


def test_moco_v3_keeps_a_vit_patch_projection_random_and_out_of_the_optimizer():
    overrides = ["model.backbone=vit_tiny", "model.patch_size=4", "views.size=16", "moco_v3.predictor_hidden=32",
                 "model.projector_hidden=32", "model.projector_out=16"]
    entry = get_method("moco_v3")
    m = entry.build(build_config("moco_v3", overrides, params_cls=entry.params_cls), INFO)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("encoder.patch_embed.") or n.startswith("key_") for n in frozen)
    in_groups = {id(p) for g in m.param_groups(0.1) for p in g["params"]}
    assert all(id(p) not in in_groups for p in m.encoder.patch_embed.parameters())
    trainable = build_config("moco_v3", [*overrides, "moco_v3.freeze_patch_embed=false"], params_cls=entry.params_cls)
    assert all(p.requires_grad for p in entry.build(trainable, INFO).encoder.patch_embed.parameters())


def test_supcon_without_labels_is_refused_with_a_clear_message():
    cfg = build_config("supcon", [], params_cls=get_method("supcon").params_cls)
    with pytest.raises(ValueError, match="needs labels"):
        get_method("supcon").build(cfg, DataInfo("image", (1, 16, 16), (0.5,), (0.5,), None, "unlabelled"))


def test_moco_v2_refuses_a_queue_smaller_than_the_batch():
    cfg = build_config("moco_v2", ["moco_v2.queue_size=16", "batch_size=64"],
                       params_cls=get_method("moco_v2").params_cls)
    with pytest.raises(ValueError, match="queue_size=16 is smaller than batch_size=64"):
        get_method("moco_v2").build(cfg, INFO)


# ------------------------------------------------------------------------------------------- shuffled BN


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()


def test_shuffled_bn_normalizes_each_key_with_its_random_group():
    net, x = _bn_net(), torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = shuffled_bn_forward(net, x, groups=3, seed=7)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    want = torch.empty(12, 3, dtype=torch.float64)
    for group in perm.chunk(3):  # each group of 4 through the net on its own
        want[group] = net(x[group])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert not torch.allclose(out, net(x), atol=1e-3)  # whole-batch statistics would give other keys
    with pytest.raises(ValueError, match="groups of >= 2"):
        shuffled_bn_forward(net, x, groups=5, seed=0)


def _sbn_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = shuffled_bn_forward(_bn_net(), x[rank * 6:(rank + 1) * 6], groups=2, seed=7)
    torch.save(out, os.path.join(out_dir, f"keys{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_shuffled_bn_on_two_processes_equals_one(tmp_path):
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = shuffled_bn_forward(_bn_net(), x, groups=2, seed=7)
    mp.spawn(_sbn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # each process encodes one group: the same arithmetic as on one process
        got = torch.load(tmp_path / f"keys{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, one[rank * 6:(rank + 1) * 6], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- DDP state


def _ddp_worker(rank, world, port, out_dir):
    from selfsup.train import train

    data, info = _ddp_tiny_data(rank, world, port)
    for method in ("moco_v2", "nnclr", "npid"):
        argv = _argv(method, "unused", os.path.join(out_dir, method), "batch_size=16", "train.max_steps=5",
                     "train.online_probe=false", *(["moco_v2.shuffle_bn_groups=2"] if method == "moco_v2" else []),
                     *(["npid.first_visit=write"] if method == "npid" else []))  # + which rows hold data
        cfg = build_config(method, argv[2:], params_cls=get_method(method).params_cls)
        torch.manual_seed(0)
        m = get_method(method).build(cfg, info)
        train(cfg, m, data, data=info)
        torch.save(m.state_dict(), os.path.join(out_dir, f"{method}{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_queues_banks_and_momentum_encoders_stay_equal_on_two_ddp_processes(tmp_path):
    """5 steps under DDP (no buffer broadcast): each process saw other images and drew other views, yet the queue,
    the support set, the memory bank and the momentum encoder are the same on both."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for method, key in (("moco_v2", "queue.features"), ("nnclr", "support.features"), ("npid", "bank.bank")):
        s0, s1 = (torch.load(tmp_path / f"{method}{r}.pt", weights_only=True) for r in range(2))
        assert s0.keys() == s1.keys() and s0[key].abs().sum() > 0
        for k in s0:  # gathered rows are copied, parameters all-reduced in one order: equal up to float32 rounding
            if k.startswith(("key_encoder.", "key_projector.")) and k.endswith(("running_mean", "running_var")):
                continue  # MoCo v2's shuffled-BN key encoder: each process's groups (local_batchnorm); not read
            torch.testing.assert_close(s0[k], s1[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k, n=method: f"{n} {k}: {m}")
