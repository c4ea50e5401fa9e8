"""I-JEPA: the loss against a hand computation, a context encoder that sees only the context block, targets that are
the layer-normed EMA encoder's tokens of the full image at the target blocks, the linear EMA schedule, masks from the
step's generator, exact resume, and the target encoder exported (the paper evaluates it)."""

import pytest
import torch
import torch.nn.functional as F
from test_train import _args, _resumed_equals_uninterrupted

import selfsup.methods.masked_modeling.ijepa  # noqa: F401  (registers "ijepa")
from selfsup.cli import main
from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.masked_modeling.ijepa import ijepa_loss, ijepa_targets
from selfsup.methods import get_method
from selfsup.methods.masked_modeling.ijepa import IJEPAParams
from selfsup.train import _step_seed

SMALL = ["model.backbone=vit_tiny", "model.patch_size=4", "ijepa.predictor_dim=24", "ijepa.predictor_depth=1",
         "ijepa.min_keep=4", "optim.name=adamw", "optim.lr_rule=none", "optim.base_lr=1e-3", "eval.linear=false",
         "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false"]


def _ijepa(size=28, channels=1, **params):
    p = IJEPAParams(**{"predictor_dim": 24, "predictor_depth": 1, "min_keep": 4, **params})
    cfg = Config(method="ijepa", params=p)
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "model.pool": "mean", "views.size": size}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("ijepa").build(cfg, DataInfo("image", (channels, size, size), (0.5,) * channels,
                                                (0.25,) * channels))
    m.encoder.blocks = m.encoder.blocks[:2]
    m.teacher_encoder.blocks = m.teacher_encoder.blocks[:2]
    return m


def _batch(channels=1, size=28, b=4):
    return torch.randint(0, 256, (b, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(7))


def test_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 4, generator=g) * 2, torch.randn(2, 3, 5, 4, generator=g)
    d = (pred - target).abs()
    huber = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).sum() / d.numel()  # smooth l1, beta 1, over every element
    torch.testing.assert_close(ijepa_loss(pred, target), huber)
    torch.testing.assert_close(ijepa_loss(pred, target, "l2"), ((pred - target) ** 2).sum() / d.numel())
    # the same as the mean over target blocks of each block's loss (equal block sizes)
    per_block = torch.stack([ijepa_loss(pred[i], target[i]) for i in range(2)]).mean()
    torch.testing.assert_close(ijepa_loss(pred, target), per_block)
    with pytest.raises(ValueError, match="unknown"):
        ijepa_loss(pred, target, "l1")
    with pytest.raises(ValueError, match="same shape"):
        ijepa_loss(pred, target[:, :, :4])


def test_targets_are_layer_normed_tokens_at_the_target_indices():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 9, 6, generator=g) * 3 + 1
    targets = torch.tensor([[[0, 1, 3], [4, 5, 8]], [[2, 5, 6], [0, 7, 8]]])  # (T=2, B=2, Kt=3)
    out = ijepa_targets(tokens.requires_grad_(), targets)
    assert out.shape == (2, 2, 3, 6) and not out.requires_grad
    for t in range(2):
        for b in range(2):
            for j in range(3):
                v = tokens[b, targets[t, b, j]].detach()
                torch.testing.assert_close(out[t, b, j], (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5))


def test_context_encoder_sees_only_the_context_and_the_target_encoder_the_whole_image():
    m = _ijepa()
    seen, teacher_seen = [], []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    m.teacher_encoder.blocks[0].register_forward_hook(lambda mod, inp, out: teacher_seen.append(inp[0].shape))
    views = m.view_maker(_batch(), torch.Generator().manual_seed(1))
    ctx, targets = views.masks["context"], views.masks["targets"]
    kc = ctx.shape[1]
    assert targets.shape[:2] == (4, 4) and 4 <= kc < 49
    hit = torch.zeros(4, 49, dtype=torch.bool).scatter_(1, ctx, True)
    assert not any(hit.gather(1, t).any() for t in targets)  # context and targets are disjoint
    out = m(views, Progress(0, 10, 5))
    assert seen == [(4, 1 + kc, m.encoder.embed_dim)]  # [cls] + the context patches, nothing else
    assert teacher_seen == [(4, 1 + 49, m.encoder.embed_dim)]
    assert out["context_tokens"] == kc and out["target_tokens"] == targets.shape[-1]
    assert set(m.exports()) == {"backbone"} and m.exports()["backbone"] is m.teacher_encoder  # the paper's A.1
    assert m.guillotine_head is None


def test_forward_regresses_the_layer_normed_teacher_tokens_at_the_targets():
    m = _ijepa()
    with torch.no_grad():  # make the teacher differ from the student, so a mix-up would show
        for prm in m.teacher_encoder.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    views = m.view_maker(_batch(), torch.Generator().manual_seed(2))
    x, ctx, targets = views.crops[0], views.masks["context"], views.masks["targets"]
    loss = m(views, Progress(0, 10, 5))["loss"]
    with torch.no_grad():
        h = m.teacher_encoder.forward_features(x)["tokens"]
        want = torch.stack([torch.stack([F.layer_norm(h[b, t[b]], (h.shape[-1],)) for b in range(4)])
                            for t in targets])
        pred = m.predictor(m.encoder.forward_features(x, keep=ctx)["tokens"], ctx, targets)
    torch.testing.assert_close(loss.detach(), F.smooth_l1_loss(pred, want))


def test_only_the_online_modules_get_gradients_and_the_teacher_follows_the_linear_ema():
    m = _ijepa()
    m(m.view_maker(_batch(), torch.Generator().manual_seed(3)), Progress(0, 10, 5))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher_encoder.parameters())
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and m.predictor.mask_token.grad.abs().sum() > 0
    with torch.no_grad():  # stands for the optimizer step
        for prm in m.encoder.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    before = [t.clone() for t in m.teacher_encoder.parameters()]
    logs = m.on_step_end(Progress(3, 10, 5))  # the third step is done: i = 2 in the reference's schedule
    mom = 0.996 + 2 * (1.0 - 0.996) / 10
    assert logs["ema_momentum"] == pytest.approx(mom)
    for t0, t, s in zip(before, m.teacher_encoder.parameters(), m.encoder.parameters()):
        torch.testing.assert_close(t, mom * t0 + (1 - mom) * s)
    assert m.momentum(0, 10) == pytest.approx(0.996) and m.momentum(10, 10) == pytest.approx(1.0)
    m.p.ipe_scale = 1.25  # a stretched schedule never reaches 1 within the run
    assert m.momentum(10, 10) == pytest.approx(0.996 + 0.004 / 1.25)


def test_masks_differ_across_processes_and_steps_and_repeat_for_the_same_step():
    m = _ijepa()
    x = _batch()

    def masks(rank, step):
        views = m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step)))
        return torch.cat([views.masks["context"].flatten(), views.masks["targets"].flatten()])

    assert torch.equal(masks(0, 5), masks(0, 5))
    assert not torch.equal(masks(0, 5), masks(1, 5)) and not torch.equal(masks(0, 5), masks(0, 6))


def test_a_mask_config_that_cannot_fit_the_grid_fails_at_build():
    with pytest.raises(ValueError, match="min_keep"):
        _ijepa(min_keep=60)


def test_ijepa_needs_a_vit(tiny_fmnist, tmp_path, capsys):
    assert main(_args("ijepa", tiny_fmnist, tmp_path / "r", *SMALL, "model.backbone=resnet10")) == 2
    assert "needs a ViT" in capsys.readouterr().err


def test_ijepa_trains_resumes_exactly_and_exports_the_target_encoder(tiny_fmnist, tmp_path, one_thread):
    state = _resumed_equals_uninterrupted("ijepa", tiny_fmnist, tmp_path, *SMALL, "batch_size=128", stop=1,
                                          exported_prefix="teacher_encoder.")  # 2 steps; the paper evaluates it
    assert any(k.startswith("predictor.") for k in state)
    assert not torch.equal(state["teacher_encoder.pos_embed"], state["encoder.pos_embed"])  # the teacher lags behind
