"""MSN: the loss against a naive loop, the prior-matching regularizer's minima (uniform and power-law priors), no
gradient into the target branch, 2 processes with half the batch each equal 1 process with all of it (loss and DDP
gradients; a local-only mean prediction does not), and the method under the trainer: the anchor encoder sees exactly
the kept tokens, resume is bit-identical, bad parameters are refused."""

import gc
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from test_train import tiny

import selfsup.distributed
import selfsup.methods.self_distillation.msn  # noqa: F401  (registers "msn")
from selfsup.cli import main
from selfsup.config import build_config
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.self_distillation.msn import (
    msn_loss,
    msn_probs,
    msn_target_probs,
    power_law_prior,
    prior_kl,
)
from selfsup.methods import get_method

VIT = ["model.backbone=vit_tiny", "model.patch_size=4", "views.size=16", "msn.num_prototypes=16",
       "msn.hidden_dim=32", "msn.out_dim=16", "msn.mask_ratio=0.5"]
QUIET = ["train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
         "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false", "eval.label_free=false",
         "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none", *VIT]
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)


def _probs(b=6, k=5, v=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = [torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64) * 2, 1) for _ in range(v)]
    target = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64) * 4, 1)
    return anchors, target


def _naive(anchors, target, prior, lam):
    """H(q, p) averaged over every anchor row, plus lam * KL(p_bar || prior), element by element (float64)."""
    k = target.shape[1]
    rows = [(a[i], target[i]) for a in anchors for i in range(target.shape[0])]
    ce = sum(-sum(float(q[j]) * math.log(float(p[j])) for j in range(k)) for p, q in rows) / len(rows)
    pbar = [sum(float(p[j]) for p, _ in rows) / len(rows) for j in range(k)]
    pri = [1.0 / k] * k if prior is None else [float(x) for x in prior]
    return ce + lam * sum(pbar[j] * math.log(pbar[j] / pri[j]) for j in range(k))


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("prior_tau, lam", [(None, 1.0), (None, 0.3), (0.5, 1.0)])
def test_loss_matches_a_naive_loop(prior_tau, lam):
    anchors, target = _probs()
    prior = None if prior_tau is None else power_law_prior(5, prior_tau, dtype=torch.float64)
    got = msn_loss(anchors, target, prior, lam)
    assert got.dtype == torch.float64
    assert abs(float(got) - _naive(anchors, target, prior, lam)) < 1e-12  # float64, two summation orders


def test_one_anchor_tensor_is_one_view_and_uniform_prior_is_me_max():
    anchors, target = _probs(v=1)
    torch.testing.assert_close(msn_loss(anchors[0], target), msn_loss(anchors, target), rtol=0, atol=0)
    pbar = anchors[0].mean(0)
    entropy = -(pbar * pbar.log()).sum()  # MSN's me-max: -H(p_bar) + log K, the reference's rloss
    torch.testing.assert_close(prior_kl(pbar), -entropy + math.log(5), rtol=0, atol=1e-14)
    torch.testing.assert_close(prior_kl(pbar, power_law_prior(5, 0.0, torch.float64)), prior_kl(pbar), rtol=0,
                               atol=1e-14)  # tau = 0 is the uniform prior


def test_power_law_prior_values():
    prior = power_law_prior(4, 1.0, torch.float64)
    expected = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)
    torch.testing.assert_close(prior, expected / expected.sum(), rtol=0, atol=1e-15)
    assert bool((prior[:-1] > prior[1:]).all())
    with pytest.raises(ValueError, match="tau"):
        power_law_prior(4, -1.0)


@pytest.mark.parametrize("tau", [None, 0.7])
def test_regularizer_is_minimal_at_the_prior(tau):
    """KL(p_bar || prior) is 0 at p_bar = prior and larger at 200 random perturbations on the simplex."""
    k = 8
    prior = torch.full((k,), 1 / k, dtype=torch.float64) if tau is None else power_law_prior(k, tau, torch.float64)
    arg = None if tau is None else prior
    at_prior = float(prior_kl(prior, arg))
    assert abs(at_prior) < 1e-14
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        other = torch.softmax(prior.log() + 0.3 * torch.randn(k, generator=g, dtype=torch.float64), 0)
        assert float(prior_kl(other, arg)) > at_prior
    if tau is not None:  # the uniform mean prediction is not the minimum under the power-law prior
        assert float(prior_kl(torch.full((k,), 1 / k, dtype=torch.float64), arg)) > 1e-3


def test_no_gradient_reaches_the_target_branch():
    g = torch.Generator().manual_seed(2)
    za, zt = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g, requires_grad=True)
    protos = torch.randn(5, 4, generator=g, requires_grad=True)
    target = msn_target_probs(zt, protos, use_sinkhorn=True)
    assert not target.requires_grad
    msn_loss([msn_probs(za, protos)], target).backward()
    assert za.grad is not None and za.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0
    assert zt.grad is None


def test_target_is_the_sharpened_softmax():
    g = torch.Generator().manual_seed(3)
    z, protos = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    p = msn_probs(z, protos, 0.1)
    sharp = p ** 4 / (p ** 4).sum(1, keepdim=True)  # the reference's sharpen(p, T=0.25)
    torch.testing.assert_close(msn_target_probs(z, protos, 0.1, 0.25), sharp, rtol=0, atol=1e-12)
    q = sharp.t() / sharp.sum()  # the reference's distributed_sinkhorn on the sharpened q, written out, 3 iterations
    for _ in range(3):
        q = q / q.sum(1, keepdim=True) / 5  # each prototype: mass 1/K
        q = q / q.sum(0, keepdim=True) / 6  # each sample: mass 1/B
    sk = msn_target_probs(z, protos, 0.1, 0.25, use_sinkhorn=True, sinkhorn_iterations=3)
    torch.testing.assert_close(sk, (q * 6).t(), rtol=0, atol=1e-12)  # float64, log vs linear domain


# ------------------------------------------------------------------------------------------- 2 processes


def _setup():
    g = torch.Generator().manual_seed(4)
    xa = torch.randn(8, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(8, 3, generator=g, dtype=torch.float64)
    protos = torch.randn(6, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    return xa, xt, protos, lin


def _loss(lin, xa, xt, protos):
    anchors = [msn_probs(lin(xa), protos), msn_probs(lin(xa.flip(1)), protos)]  # two anchor views
    with torch.no_grad():
        target = msn_target_probs(lin(xt), protos)
    return anchors, target


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xa, xt, protos, lin = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    half = slice(rank * 4, (rank + 1) * 4)
    anchors, target = _loss(ddp, xa[half], xt[half], protos)
    prior = power_law_prior(6, 0.5, torch.float64)
    loss = msn_loss(anchors, target, prior)
    with torch.no_grad():  # negative control: the mean prediction of this process's rows only
        local = sum(torch.sum(-target * a.log(), 1).mean() for a in anchors) / 2
        local = local + prior_kl(torch.cat(anchors).mean(0), prior)
    loss.backward()
    grads = {n: p.grad for n, p in lin.named_parameters()}
    torch.save({"loss": loss.detach(), "local": local, "grads": grads}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    del loss, anchors, ddp  # their autograd graph holds DDP's reducer: it goes before the group (test_distributed)
    gc.collect()  # DDP sits in reference cycles: free its reducer before the group (test_distributed)
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_two_processes_with_half_the_batch_each_equal_one_process(tmp_path):
    """The cross-entropy is a per-row mean (DDP averages the halves) and the prior KL uses the mean prediction of
    the whole batch on both processes, with gradients to both halves: the mean of the two losses and DDP's
    gradients equal one process's on the whole batch. A mean prediction over one process's rows does not."""
    xa, xt, protos, lin = _setup()
    anchors, target = _loss(lin, xa, xt, protos)
    one = msn_loss(anchors, target, power_law_prior(6, 0.5, torch.float64))
    one.backward()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    # float64, the same arithmetic grouped differently: ~1e-16 apart, 1e-12 stated
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, one.detach(), rtol=0, atol=1e-12)
    for n, p in lin.named_parameters():
        for ri in r:  # DDP leaves the averaged gradient on every process
            torch.testing.assert_close(ri["grads"][n], p.grad, rtol=0, atol=1e-12)
    assert abs(float((r[0]["local"] + r[1]["local"]) / 2 - one.detach())) > 1e-6  # negative control


# ------------------------------------------------------------------------------------------- under the trainer


def _argv(root, out, *extra):
    return ["train", "msn", *[a for a in tiny(root, out, *QUIET, *extra)
                              if not a.startswith(("byol.", "model.backbone=resnet"))]]


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]


def _build(*overrides):
    entry = get_method("msn")
    cfg = build_config("msn", ["batch_size=8", *QUIET, *overrides], params_cls=entry.params_cls)
    torch.manual_seed(cfg.seed)  # as the trainer seeds before building
    return entry.build(cfg, INFO)


def test_anchor_encoder_sees_exactly_the_kept_tokens():
    method = _build()
    views = method.view_maker(torch.rand(4, 1, 16, 16), torch.Generator().manual_seed(0))
    keep = views.masks["keep"]
    assert keep.shape == (4, 8)  # 16 patches of 4x4 pixels, half dropped
    seen = []
    hook = method.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    feats = method.anchor_features(views)
    hook.remove()
    assert seen == [(4, 1 + 8, method.encoder.embed_dim)]  # [cls] + the kept patches only
    # the hidden patches' pixels do not matter, the kept ones do
    crop = views.crops[1].clone()
    hidden = views.masks["mask"].view(4, 1, 4, 1, 4, 1).expand(4, 1, 4, 4, 4, 4).reshape(4, 1, 16, 16)
    views.crops[1] = torch.where(hidden, torch.randn_like(crop), crop)
    torch.testing.assert_close(method.anchor_features(views)[0], feats[0], rtol=0, atol=1e-5)
    views.crops[1] = torch.where(hidden, crop, torch.randn_like(crop))
    assert not torch.allclose(method.anchor_features(views)[0], feats[0], atol=1e-3)
    out = method(views, Progress(0, 10, 5))
    assert out["loss"].requires_grad and {"ce", "prior_kl", "prototypes_used"} <= out.keys()


def test_msn_trains_and_resumes_exactly(tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["epochs=1", "msn.prior=power_law"]  # 256 images / 64: 4 steps
    assert main(_argv(tiny_fmnist, b, *extra, "train.max_steps=3")) == 0
    assert main(_argv(tiny_fmnist, b, *extra, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(tiny_fmnist, a, *extra)) == 0
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit identity is the property (target encoder and prototypes included)
        assert torch.equal(sa[k], sb[k]), k
    fresh = _build(*extra).state_dict()
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert "prototypes" in moved and any(k.startswith("encoder.") for k in moved)
    assert any(k.startswith("teacher_encoder.") for k in moved) and any(k.startswith("teacher_head.") for k in moved)


@pytest.mark.parametrize("overrides, match", [
    (["msn.prior=zipf"], "not one of uniform, power_law"),
    (["msn.mask_ratio=1.0"], "must be in"),
    (["model.backbone=resnet10"], "needs a ViT"),
])
def test_msn_refuses_bad_params_with_a_clear_message(overrides, match):
    with pytest.raises(ValueError, match=match):
        _build(*overrides)
