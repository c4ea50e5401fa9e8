"""DeepCluster-v2: spherical k-means against a naive loop, the loss against a loop, and under the trainer the
prototypes reset to the centroids at every epoch start, one pseudo-label per training sample, exact resume from a
mid-epoch step, and equal banks, labels and prototypes on 2 DDP processes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _ddp_tiny_data, _free_port
from test_train import tiny

import selfsup.distributed
import selfsup.methods.self_distillation.deepcluster_v2 as dcv2  # noqa: F401  (registers deepcluster_v2)
from selfsup.cli import main
from selfsup.config import ConfigError, build_config
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation.deepcluster import deepcluster_loss, kmeans_assign
from selfsup.methods.base import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["model.backbone=resnet10", "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false",
         "eval.label_free=false", "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none",
         "deepcluster_v2.prototypes=[8,8,8]", "views.n_local=2", "epochs=3"]
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)
ENTRY = REGISTRY["deepcluster_v2"]


def _argv(root, out, *extra):
    return ["train", "deepcluster_v2", *[a for a in tiny(root, out, *QUIET, *extra) if not a.startswith("byol.")]]


def _cfg(*overrides):
    return build_config("deepcluster_v2", list(overrides), params_cls=ENTRY.params_cls)


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]


def _naive_kmeans(bank, k, iterations, generator):
    """The algorithm written as loops over clusters and rows."""
    c = bank[torch.randperm(bank.shape[0], generator=generator)[:k]].clone()

    def assign():
        return torch.tensor([max(range(k), key=lambda j: float(x @ c[j])) for x in bank])

    for _ in range(iterations):
        a = assign()
        for j in range(k):
            members = bank[a == j]
            if len(members):
                c[j] = members.sum(0) / members.sum(0).norm()
    return assign(), c


def _blobs():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1) * 4
    truth = torch.arange(60) % 4
    bank = F.normalize(centres[truth] + 0.1 * torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    return bank, truth


def test_kmeans_recovers_separated_clusters_and_matches_a_naive_loop():
    bank, truth = _blobs()
    for seed in range(3):
        labels, cent = kmeans_assign(bank, 4, 10, torch.Generator().manual_seed(seed))
        ref_labels, ref_cent = _naive_kmeans(bank, 4, 10, torch.Generator().manual_seed(seed))
        assert torch.equal(labels, ref_labels)
        torch.testing.assert_close(cent, ref_cent, rtol=0, atol=1e-12)  # float64, same sums in another order
        torch.testing.assert_close(cent.norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(labels, (bank @ cent.T).argmax(1))  # labels: argmax cosine to the returned centroids
    # seeded with one row of every blob, it finds the blobs exactly (up to renaming); a seed with two rows in one blob
    # may stop in a local optimum, as any k-means (no k-means++ in the reference)
    recovered = 0
    for seed in range(100):
        labels, _ = kmeans_assign(bank, 4, 10, torch.Generator().manual_seed(seed))
        if len(set((torch.randperm(60, generator=torch.Generator().manual_seed(seed))[:4] % 4).tolist())) == 4:
            recovered += 1
            assert len({(int(a), int(b)) for a, b in zip(labels, truth)}) == 4
    assert recovered >= 1
    # an empty cluster keeps its centroid: two identical seed rows, one of them gets no member
    dup = torch.cat([bank[:1], bank[:1], bank[1:]])
    g = torch.Generator().manual_seed(0)
    labels, cent = kmeans_assign(dup, 3, 5, g)
    assert cent.isfinite().all() and labels.max() < 3
    with pytest.raises(ValueError, match="needs 1 <= k <= the number of bank rows"):
        kmeans_assign(bank, 61, 10)


def test_loss_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 7, (5,), generator=g)
    ref = sum(-torch.log_softmax(s[i] / 0.1, 0)[y[i]] for s in scores for i in range(5)) / 15
    torch.testing.assert_close(deepcluster_loss(scores, y, 0.1), ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        deepcluster_loss(scores, y, 0.0)


def test_trains_resets_prototypes_each_epoch_and_resumes_exactly_mid_epoch(tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(tiny_fmnist, b, "train.max_steps=6")) == 0  # 4 steps per epoch: step 6 is mid epoch 1
    at6 = _state(b)
    assert main(_argv(tiny_fmnist, b, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(tiny_fmnist, a, "train.max_steps=4")) == 0  # end of epoch 0: the banks are full, no k-means
    at4 = _state(a)
    assert main(_argv(tiny_fmnist, a, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(tiny_fmnist, tmp_path / "c")) == 0  # uninterrupted
    sa, sb, sc = _state(a), _state(b), _state(tmp_path / "c")
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sc:  # resume at a mid-epoch step and at an epoch end: bit-identical, labels and banks included
        assert torch.equal(sa[k], sc[k]) and torch.equal(sb[k], sc[k]), k
    cfg = _cfg(*_argv(tiny_fmnist, a)[2:])
    torch.manual_seed(cfg.seed)
    fresh = ENTRY.build(cfg, INFO).state_dict()
    # epoch 0 changes no parameter (the reference's init_memory pass) and fills the banks with unit rows
    assert int(at4["clustered_epoch"]) == -1
    for k in fresh:
        if k.startswith(("encoder.", "projector.", "prototypes.")) and "running" not in k and "num_batches" not in k:
            assert torch.equal(at4[k], fresh[k]), k
    for i in range(2):
        assert not torch.equal(at4[f"banks.{i}.bank"], fresh[f"banks.{i}.bank"])
        torch.testing.assert_close(at4[f"banks.{i}.bank"].norm(dim=1), torch.ones(256), rtol=0, atol=1e-6)
    # epoch 1 (steps 4-7) clustered the banks of epoch 0: labels and centroids are k-means of those banks
    assert int(at6["clustered_epoch"]) == 1 and at6["labels"].shape == (3, 256)
    model = ENTRY.build(cfg, INFO)
    model.load_state_dict(at4)
    model.cluster(1)
    assert torch.equal(model.labels, at6["labels"])
    for h in range(3):
        torch.testing.assert_close(at6[f"prototypes.{h}.weight"], model.prototypes[h].weight, rtol=0, atol=0)
        bank = at4[f"banks.{h % 2}.bank"]
        assert torch.equal(at6["labels"][h], (bank @ at6[f"prototypes.{h}.weight"].T).argmax(1))
        torch.testing.assert_close(at6[f"prototypes.{h}.weight"].norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)
    # epoch 2 reset the prototypes again to the k-means of epoch 1's banks; encoder and projector trained
    assert int(sa["clustered_epoch"]) == 2
    assert not torch.equal(sa["prototypes.0.weight"], at6["prototypes.0.weight"])
    torch.testing.assert_close(sa["prototypes.0.weight"].norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)
    assert any(not torch.equal(sa[k], at4[k]) for k in sa if k.startswith("encoder.") and "running" not in k)
    assert any(not torch.equal(sa[k], at4[k]) for k in sa if k.startswith("projector.") and "running" not in k)


@pytest.mark.parametrize("overrides, match", [
    (["deepcluster_v2.prototypes=[300]"], "cannot make more clusters than the 256 training samples"),
    (["deepcluster_v2.prototypes=[0]"], r"deepcluster_v2.prototypes=\[0\] is out of range: it must be a list of integers >= 1"),
    (["deepcluster_v2.temperature=0"], r"deepcluster_v2.temperature=0.0 is out of range: it must be > 0"),
])
def test_bad_params_are_refused_with_a_clear_message(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ENTRY.build(_cfg("model.width=4", *overrides), INFO)


def _ddp_worker(rank, world, port, out_dir):
    from selfsup.train import train

    data, info = _ddp_tiny_data(rank, world, port)
    argv = _argv("unused", os.path.join(out_dir, "run"), "batch_size=16", "train.max_steps=10",
                 "train.online_probe=false")[2:]
    cfg = _cfg(*argv)
    torch.manual_seed(0)
    m = ENTRY.build(cfg, info)
    train(cfg, m, data, data=info)
    torch.save(m.state_dict(), os.path.join(out_dir, f"dc{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_banks_labels_and_prototypes_stay_equal_on_two_ddp_processes(tmp_path):
    """10 steps (4 per epoch: k-means at steps 4 and 8) on 2 processes, each with its own half of every batch."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"dc{r}.pt", weights_only=True) for r in range(2))
    assert int(s0["clustered_epoch"]) == 2 and s0["labels"].shape == (3, 64)
    for k in s0:
        if k.endswith(("running_mean", "running_var")):
            continue  # per-process batch-norm statistics on CPU
        assert torch.equal(s0[k], s1[k]), k


def test_the_bank_filling_pass_moves_nothing_and_runs_in_channels_last():
    """Epoch 0 (fill_banks): the global crops' normalized projections go into the banks, the loss is an exact zero
    whose gradient reaches every parameter as zeros, in channels_last too (CUDA's default memory format here)."""
    import copy
    import dataclasses

    from selfsup.methods.base import forward_views

    cfg = _cfg("deepcluster_v2.prototypes=[8,8,8]", "views.n_local=2", "views.size=16", "model.backbone=resnet10")
    torch.manual_seed(0)
    m = ENTRY.build(cfg, INFO).to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(0))
    views = dataclasses.replace(views, index=torch.arange(8).flip(0))
    twin = copy.deepcopy(m)
    with torch.no_grad():  # the same train-mode pass, written out: both global crops in one batch, then normalized
        want = [F.normalize(z, dim=1) for z in
                forward_views(twin.projector, forward_views(twin.encoder, views.crops[:views.n_global]))]
    out = m(views, Progress(0, 100, 10))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and out["clustering_on"] == 0.0
    params = [q for q in m.parameters() if q.requires_grad]
    assert all(q.grad is not None and not q.grad.any() for q in params)
    for bank, z in zip(m.banks, want, strict=True):
        assert bank.commit() == 8
        torch.testing.assert_close(bank.bank[views.index], z, rtol=1e-5, atol=1e-6)  # rows by sample, not position
