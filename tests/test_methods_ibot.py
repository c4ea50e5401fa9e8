"""iBOT: the masked-patch term against a naive loop (only masked patches count, unmasked samples count as 0), the
total against DINO's [CLS] term plus the patch term, the shared and separate heads, iBOT's block masks (per crop,
half the crops unmasked), the student never sees a masked patch's pixels, the teacher gets no gradient, both centers
follow their formula once per optimizer step (also under gradient accumulation) and are the same on 2 processes with
half the batch each as on 1 (not without the all-reduce), and the method under the trainer: resume is exact."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from test_train import tiny

import selfsup.distributed
from selfsup import distributed as du
from selfsup.cli import main
from selfsup.config import Config, _set, build_config
from selfsup.contract import Progress, Views
from selfsup.data.types import DataInfo
from selfsup.data.views import BlockMaskViews, simclr_views
from selfsup.losses.self_distillation import dino_loss, ibot_loss, ibot_patch_loss
from selfsup.methods import get_method
from selfsup.methods.self_distillation.ibot import IBOTParams
from selfsup.nn.heads import IBOTHead

# ------------------------------------------------------------------------------------------- the loss


def _naive_patch(student, teacher, mask, tau):
    """Per sample: -sum_k t log softmax(s / tau) summed over its masked patches / max(count, 1); batch mean."""
    b, n, k = student.shape
    total = 0.0
    for i in range(b):
        rows = [j for j in range(n) if mask[i, j]]
        acc = 0.0
        for j in rows:
            logits = [float(student[i, j, c]) / tau for c in range(k)]
            lse = math.log(sum(math.exp(v) for v in logits))
            acc += -sum(float(teacher[i, j, c]) * (logits[c] - lse) for c in range(k))
        total += acc / max(len(rows), 1)
    return total / b


def _patch_case(seed=0, b=4, n=6, k=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, k, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(b, n, k, generator=g, dtype=torch.float64) * 3, -1)
    mask = torch.rand(b, n, generator=g) < 0.5
    mask[0] = False  # a sample with nothing masked: contributes 0, still counted in the mean
    mask[1, 0] = True
    return s, t, mask


def test_patch_loss_matches_a_naive_loop_and_ignores_unmasked_patches():
    s, t, mask = _patch_case()
    got = ibot_patch_loss(s, t, mask, 0.1)
    assert got.item() == pytest.approx(_naive_patch(s, t, mask, 0.1), rel=1e-10)
    # changing the targets (or student outputs) of unmasked patches changes nothing
    t2 = torch.where(mask[..., None], t, torch.softmax(torch.randn_like(t), -1))
    s2 = torch.where(mask[..., None], s, torch.randn_like(s))
    torch.testing.assert_close(ibot_patch_loss(s2, t2, mask, 0.1), got, rtol=0, atol=1e-12)
    # ... and of a masked one does
    t3 = t.clone()
    i, j = mask.nonzero()[0].tolist()
    t3[i, j] = t3[i, j].flip(0)
    assert abs(ibot_patch_loss(s, t3, mask, 0.1).item() - got.item()) > 1e-6
    with pytest.raises(ValueError, match="mask must be bool"):
        ibot_patch_loss(s, t, mask.float(), 0.1)


def test_total_is_lambda_weighted_cls_and_mean_patch_terms():
    s_a, t_a, m_a = _patch_case(1)
    s_b, t_b, m_b = _patch_case(2)
    g = torch.Generator().manual_seed(3)
    cls_s = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]  # 2 global + 1 local
    cls_t = [torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1) for _ in range(2)]
    loss, c, p = ibot_loss(cls_s, cls_t, [s_a, s_b], [t_a, t_b], [m_a, m_b], 0.1, lambda_cls=0.7, lambda_patch=2.0)
    want_c = dino_loss(cls_s, cls_t, 0.1)
    want_p = (_naive_patch(s_a, t_a, m_a, 0.1) + _naive_patch(s_b, t_b, m_b, 0.1)) / 2
    assert c.item() == pytest.approx(want_c.item(), rel=1e-12) and p.item() == pytest.approx(want_p, rel=1e-10)
    assert loss.item() == pytest.approx(0.7 * want_c.item() + 2.0 * want_p, rel=1e-10)
    with pytest.raises(ValueError, match="one student patch output"):
        ibot_loss(cls_s, cls_t, [s_a], [t_a, t_b], [m_a, m_b])


# ------------------------------------------------------------------------------------------- head and masks


def test_shared_head_uses_the_cls_prototypes_for_patches_and_separate_heads_their_own():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 4, 16)
    shared = IBOTHead(16, 32, 32, 24, 8, norm_last_layer=False, shared=True)
    cls, patch = shared(x)
    torch.testing.assert_close(cls, shared.cls(x[:, 0]))  # the [CLS] token through DINO's head
    torch.testing.assert_close(patch, shared.cls(x[:, 1:].reshape(-1, 16)).view(3, 4, 32))
    assert len(shared.last_layer) == 2  # prototypes and their gain
    sep = IBOTHead(16, 32, 12, 24, 8, norm_last_layer=True, shared=False)
    cls, patch = sep(x)
    assert cls.shape == (3, 32) and patch.shape == (3, 4, 12) and len(sep.last_layer) == 2
    z = torch.nn.functional.normalize(sep.cls.mlp(x[:, 1:]), dim=-1)
    torch.testing.assert_close(patch, z @ torch.nn.functional.normalize(sep.patch_prototypes, dim=-1).t())
    with pytest.raises(ValueError, match="shared head has one set"):
        IBOTHead(16, 32, 12, shared=True)


def test_block_masks_cover_half_the_crops_with_ratios_in_range():
    inner = simclr_views(16, (0.5,), (0.5,), channels=1)
    maker = BlockMaskViews(inner, (8, 8), (0.1, 0.5), probability=0.5)
    assert maker.min_block == 4  # iBOT's (min(h, w) // 3) ** 2
    x = torch.randint(0, 256, (400, 1, 16, 16), dtype=torch.uint8)
    views = maker(x, torch.Generator().manual_seed(0))
    masks = views.masks["block"]
    assert masks.shape == (2, 400, 64) and masks.dtype == torch.bool
    counts = masks.sum(-1).float()
    masked = counts > 0
    # each crop of each sample independently: 800 Bernoulli(0.5) draws -> 0.5 +- 0.018 (1 sd); 4 sd stated
    assert abs(masked.float().mean().item() - 0.5) < 0.075
    assert not torch.equal(masked[0], masked[1])  # the two crops draw their own masks
    # a masked crop has at most round(0.5 * 64) = 32 patches and at least one block (>= min_block)
    assert counts.max() <= 32 and counts[masked].min() >= 4
    assert counts[masked].mean().item() == pytest.approx(0.3 * 64, rel=0.15)  # U(0.1, 0.5) mean, BEiT undershoots
    again = maker(x, torch.Generator().manual_seed(0)).masks["block"]
    assert torch.equal(again, masks)  # from the step's generator only
    none = BlockMaskViews(inner, (8, 8), (0.1, 0.5), probability=0.0)(x[:8], torch.Generator().manual_seed(0))
    assert not none.masks["block"].any()


# ------------------------------------------------------------------------------------------- the method


def _ibot(seed=0, **params):
    cfg = Config(method="ibot", params=IBOTParams(out_dim=32, hidden_dim=16, bottleneck_dim=8, **params), epochs=2)
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "views.size": 16, "views.n_local": 1,
                 "views.local_size": 8}.items():
        _set(cfg, k, v)
    torch.manual_seed(seed)
    m = get_method("ibot").build(cfg, DataInfo("image", (1, 16, 16), (0.5,), (0.5,)))
    for net in (m.encoder, m.teacher_encoder):  # a 1-block ViT is enough here
        net.blocks = net.blocks[:1]
    return m


def _images(n=8):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _views(m, n=8, seed=2):
    return m.view_maker(_images(n), torch.Generator().manual_seed(seed))


def test_student_never_sees_masked_pixels_and_the_teacher_gets_no_gradient():
    m = _ibot(mask_probability=1.0)
    views = _views(m)
    masks = views.masks["block"]
    assert masks.any(-1).all()  # probability 1: every crop of every sample is masked
    out = m(views, Progress(0, 10, 5))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in [*m.teacher_encoder.parameters(),
                                                                *m.teacher_head.parameters()])
    assert m.encoder.mask_token.grad is not None and m.encoder.mask_token.grad.abs().sum() > 0
    # replace the pixels of every masked patch (4x4 pixels on a 4x4 grid): the student's outputs do not move
    m.zero_grad()
    pix = masks[0].view(8, 1, 4, 1, 4, 1).expand(8, 1, 4, 4, 4, 4).reshape(8, 1, 16, 16)
    feats = m.encoder.forward_features(views.crops[0], masks=masks[0])["tokens"]
    noisy = torch.where(pix, torch.randn_like(views.crops[0]), views.crops[0])
    torch.testing.assert_close(m.encoder.forward_features(noisy, masks=masks[0])["tokens"], feats,
                               rtol=0, atol=1e-5)
    assert not torch.allclose(m.encoder.forward_features(noisy)["tokens"], m.encoder.forward_features(
        views.crops[0])["tokens"], atol=1e-3)  # unmasked, the same pixels do matter
    assert {"ibot_cls", "ibot_patch", "teacher_temp", "masked_fraction"} <= out.keys()


def _teacher_outputs(m, views):
    with torch.no_grad():
        f = m.teacher_encoder.forward_features(torch.cat(views.global_crops))
        return m.teacher_head(torch.cat([f["cls"][:, None], f["tokens"]], 1))


def test_centers_follow_their_formula_once_per_optimizer_step():
    """Two micro-batches then one on_step_end (gradient accumulation) give the centers of one step on their union:
    c <- 0.9 c + 0.1 mean_b t_cls[b], and for patches the batch mean of each image's mean over its patches."""
    m = _ibot()
    views = _views(m)
    t_cls, t_patch = _teacher_outputs(m, views)
    halves = [Views([c[i:i + 4] for c in views.crops], views.n_global,
                    masks={"block": views.masks["block"][:, i:i + 4]}) for i in (0, 4)]
    with torch.no_grad():
        for h in halves:
            m(h, Progress(0, 10, 5))
    assert m.center.abs().sum() == 0  # nothing moves before the optimizer step ends
    m.on_step_end(Progress(1, 10, 5))
    torch.testing.assert_close(m.center, 0.1 * t_cls.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.patch_center, 0.1 * t_patch.mean(1).mean(0), rtol=1e-5, atol=1e-7)
    assert {"center", "patch_center"} <= m.state_dict().keys() and "_cls_sum" not in m.state_dict()


def _center_worker(rank, world, port, out_dir, reduce):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if not reduce:  # negative control: the all-reduce removed
        du.all_reduce_sum_ = lambda t: t
    m = _ibot()
    views = _views(m)
    n = 8 // world
    half = Views([c[rank * n:(rank + 1) * n] for c in views.crops], views.n_global,
                 masks={"block": views.masks["block"][:, rank * n:(rank + 1) * n]})
    with torch.no_grad():
        loss = m(half, Progress(0, 10, 5))["loss"]
    m.on_step_end(Progress(1, 10, 5))
    torch.save({"center": m.center, "patch_center": m.patch_center, "loss": loss},
               os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


@pytest.mark.parametrize("reduce", [True, False])
def test_centers_and_loss_on_two_processes_with_half_batches_equal_one(tmp_path, reduce):
    m = _ibot()
    with torch.no_grad():
        loss = m(_views(m), Progress(0, 10, 5))["loss"]
    m.on_step_end(Progress(1, 10, 5))
    mp.spawn(_center_worker, args=(2, _free_port(), str(tmp_path), reduce), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    # per-sample means: the two halves' losses average to the whole batch's (DDP averages gradients the same way)
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    for ri in r:  # float32 sums added in another order: 1e-5 relative stated
        same = all(torch.allclose(ri[k], getattr(m, k), rtol=1e-5, atol=1e-7) for k in ("center", "patch_center"))
        assert same == reduce


def test_teacher_temperatures_warm_up_linearly():
    m = _ibot(warmup_teacher_temp_epochs=4, teacher_temp=0.07, teacher_patch_temp=0.06)
    assert [tuple(round(t, 4) for t in m.temperatures(e)) for e in (0, 1, 3, 9)] == [
        (0.04, 0.04), (0.05, 0.0467), (0.07, 0.06), (0.07, 0.06)]


# ------------------------------------------------------------------------------------------- under the trainer

SMALL = ["model.backbone=vit_tiny", "model.patch_size=4", "views.size=16", "views.n_local=1", "views.local_size=8",
         "ibot.out_dim=32", "ibot.hidden_dim=16", "ibot.bottleneck_dim=8", "ibot.freeze_last_layer_epochs=1",
         "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
         "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false", "eval.label_free=false",
         "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none"]


def _argv(root, out, *extra):
    return ["train", "ibot", *[a for a in tiny(root, out, *SMALL, *extra)
                               if not a.startswith(("byol.", "model.backbone=resnet"))]]


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]


def test_ibot_trains_freezes_its_prototypes_in_epoch_one_and_resumes_exactly(tiny_fmnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["epochs=2", "train.accumulate=2"]  # 256 images / 64: 4 steps per epoch, 2 micro-batches each
    assert main(_argv(tiny_fmnist, b, *extra, "train.max_steps=4")) == 0
    entry = get_method("ibot")
    cfg = build_config("ibot", [a for a in _argv(tiny_fmnist, b, *extra)[2:]], params_cls=entry.params_cls)
    torch.manual_seed(cfg.seed)
    fresh = entry.build(cfg, DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,))).state_dict()
    mid = _state(b)
    assert torch.equal(mid["head.cls.prototypes"], fresh["head.cls.prototypes"])  # frozen through epoch 1
    assert main(_argv(tiny_fmnist, b, *extra, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(tiny_fmnist, a, *extra)) == 0
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit identity is the property (teacher and both centers included)
        assert torch.equal(sa[k], sb[k]), k
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert {"center", "patch_center", "head.cls.prototypes", "encoder.mask_token"} <= moved
    assert any(k.startswith("teacher_encoder.") for k in moved)


@pytest.mark.parametrize("overrides, match", [
    (["ibot.mask_ratio_low=0.6"], "need 0 <= low <= high < 1"),
    (["ibot.mask_probability=1.5"], r"must be in \[0, 1\]"),
    (["ibot.patch_out_dim=64"], "set ibot.shared_head=false"),
    (["model.backbone=resnet10"], "needs a ViT"),
])
def test_ibot_refuses_bad_params_with_a_clear_message(overrides, match):
    entry = get_method("ibot")
    with pytest.raises(ValueError, match=match):  # refused by the config's range rules or at build time
        cfg = build_config("ibot", ["batch_size=8", *SMALL, *overrides], params_cls=entry.params_cls)
        entry.build(cfg, DataInfo("image", (1, 16, 16), (0.5,), (0.5,)))


def test_a_bad_parameter_found_at_build_time_exits_2_like_any_config_error(tiny_fmnist, tmp_path, capsys):
    # low > high passes every single-value rule and is found when the method is built
    assert main(_argv(tiny_fmnist, tmp_path / "r", "ibot.mask_ratio_low=0.6")) == 2
    assert "config error: ibot.mask_ratio_low=0.6" in capsys.readouterr().err
