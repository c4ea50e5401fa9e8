"""data2vec 2.0: targets = the average of instance-normed top-K teacher layers, an L2 loss on masked tokens only, one
teacher pass per image on the full image while the student sees only each clone's visible tokens, an EMA teacher
without gradient, masks from the step's generator, exact resume, the student encoder alone exported."""

import math

import pytest
import torch
from test_train import _args, _resumed_equals_uninterrupted

import selfsup.methods.masked_modeling.data2vec as d2v  # registers "data2vec"
from selfsup.cli import main
from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.masked_modeling.data2vec import data2vec_loss, data2vec_targets
from selfsup.methods import get_method
from selfsup.train import _step_seed

SMALL = ["model.backbone=vit_tiny", "model.patch_size=4", "data2vec.clone_batch=2", "data2vec.decoder_layers=2",
         "optim.name=adamw", "optim.lr_rule=none", "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0",
         "eval.init_baseline=false", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
         "eval.report=false", "eval.guillotine=false"]


def _d2v(size=28, channels=1, **params):
    cfg = Config(method="data2vec", params=d2v.Data2VecParams(**{"average_top_k_layers": 2, "clone_batch": 3,
                                                                 "decoder_layers": 2, **params}))
    for k, v in {"model.backbone": "vit_tiny", "model.patch_size": 4, "views.size": size}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    m = get_method("data2vec").build(cfg, DataInfo("image", (channels, size, size), (0.5,) * channels,
                                                   (0.25,) * channels))
    m.encoder.blocks, m.teacher.blocks = m.encoder.blocks[:2], m.teacher.blocks[:2]
    return m


def test_targets_are_the_average_of_instance_normed_top_k_layers_patch_tokens_only():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 1 + 5, 4, generator=g) * (i + 1) + i for i in range(3)]
    by_hand = torch.zeros(2, 5, 4)
    for a in layers[-2:]:  # top K = 2
        for b in range(2):
            for d in range(4):
                v = a[b, 1:, d]  # channel d over the patch tokens ([CLS] dropped)
                by_hand[b, :, d] += (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5) / 2
    torch.testing.assert_close(data2vec_targets(layers, 2, layer_norm=False), by_hand)
    ln = torch.stack([(t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5) for t in by_hand.reshape(10, 4)])
    torch.testing.assert_close(data2vec_targets(layers, 2), ln.reshape(2, 5, 4))
    changed = [a.clone() for a in layers]
    changed[0] += 50.0  # a layer below the top K
    changed[2][:, 0] += 50.0  # the [CLS] token
    torch.testing.assert_close(data2vec_targets(changed, 2), data2vec_targets(layers, 2))
    with pytest.raises(ValueError, match="average_top_k_layers"):
        data2vec_targets(layers, 4)


def test_loss_is_scaled_l2_on_masked_tokens_only_plus_the_summed_cls_term():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    by_hand = sum(((pred[b, i] - target[b, i]) ** 2).sum() / math.sqrt(8)
                  for b in range(2) for i in range(6) if mask[b, i]) / 5
    torch.testing.assert_close(data2vec_loss(pred, target, mask), by_hand)
    changed = target.clone()
    changed[~mask] += 100.0  # the visible tokens' targets
    torch.testing.assert_close(data2vec_loss(pred, changed, mask), by_hand)
    changed[1, 3] += 1.0  # a masked one
    assert not torch.allclose(data2vec_loss(pred, changed, mask), by_hand)
    cls = torch.randn(2, 8, generator=g)
    cls_hand = 0.01 * sum(((cls[b] - target[b].mean(0)) ** 2).sum() / math.sqrt(8) for b in range(2))
    torch.testing.assert_close(data2vec_loss(pred, target, mask, cls, 0.01), by_hand + cls_hand)


def test_inverse_block_mask_keeps_a_fixed_count_in_blocks():
    g = torch.Generator().manual_seed(0)
    m = d2v.inverse_block_mask(500, (14, 14), 0.8, 3, 0.07, g)
    assert m.dtype == torch.bool and m.sum(1).tolist() == [196 - int(196 * 0.2)] * 500  # 39 kept, 157 masked
    kept = (~m).view(500, 1, 14, 14).float()
    cross = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float).view(1, 1, 3, 3)
    has_kept_neighbour = (torch.nn.functional.conv2d(kept, cross, padding=1) > 0).float()
    clustered = (has_kept_neighbour * kept).sum() / kept.sum()
    assert clustered > 0.9  # blocks; a uniform random mask gives about 1 - 0.8^4 = 0.59
    assert torch.equal(m, d2v.inverse_block_mask(500, (14, 14), 0.8, 3, 0.07, torch.Generator().manual_seed(0)))


def test_teacher_runs_once_on_the_full_image_and_the_student_on_each_clones_visible_tokens():
    m = _d2v()
    teacher_in, student_in = [], []
    m.teacher.blocks[0].register_forward_hook(lambda mod, inp, out: teacher_in.append(inp[0]))
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: student_in.append(inp[0]))
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(1))
    out = m(views, Progress(0, 10, 5))
    kept = 49 - (49 - int(49 * 0.2))  # 9 of 49 patches
    assert [t.shape for t in teacher_in] == [(4, 1 + 49, 192)]  # one pass, every patch, no clone
    assert [t.shape for t in student_in] == [(12, 1 + kept, 192)]  # 3 clones x [CLS] + the visible patches
    keep = views.masks["keep"]
    assert keep.shape == (12, kept) and not torch.equal(keep[0], keep[1])  # clones are masked differently
    with torch.no_grad():  # the student's tokens are exactly the visible patches of its image
        xs = views.crops[0].repeat_interleave(3, 0)
        emb = m.encoder.patch_embed(xs).flatten(2).transpose(1, 2) + m.encoder.pos_embed[:, 1:]
        torch.testing.assert_close(student_in[0][:, 1:], torch.gather(emb, 1, keep[..., None].expand(-1, -1, 192)))
    assert torch.equal(views.masks["mask"].gather(1, keep), torch.zeros_like(keep, dtype=torch.bool))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["d2v_cls"] > 0
    assert all(p.grad is None for p in m.teacher.parameters()) and not any(p.requires_grad
                                                                            for p in m.teacher.parameters())
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and m.decoder.proj.weight.grad is not None
    assert set(m.exports()) == {"backbone"} and m.exports()["backbone"] is m.encoder and m.guillotine_head is None
    assert out["features"].shape == (4, 192)


def test_teacher_follows_the_ema_formula_with_the_annealed_decay():
    assert d2v.ema_decay(0, 1000, 0.9998, 0.99999, 0.25) == 0.9998
    assert math.isclose(d2v.ema_decay(125, 1000, 0.9998, 0.99999, 0.25), (0.9998 + 0.99999) / 2)
    assert d2v.ema_decay(250, 1000, 0.9998, 0.99999, 0.25) == d2v.ema_decay(900, 1000, 0.9998, 0.99999, 0.25) \
        == 0.99999
    m = _d2v(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_fraction=0.5)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(torch.randn_like(p))  # as an optimizer step would
    before = [t.clone() for t in m.teacher.parameters()]
    logs = m.on_step_end(Progress(5, 20, 5))
    mom = 0.9 + (0.99 - 0.9) * 5 / 10
    assert math.isclose(logs["ema_momentum"], mom)
    for t0, t, s in zip(before, m.teacher.parameters(), m.encoder.parameters()):
        torch.testing.assert_close(t, mom * t0 + (1 - mom) * s)


def test_masks_differ_across_processes_and_steps_and_repeat_for_the_same_step():
    m = _d2v()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)

    def mask(rank, step):
        return m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step))).masks["mask"]

    assert torch.equal(mask(0, 5), mask(0, 5))
    assert not torch.equal(mask(0, 5), mask(1, 5)) and not torch.equal(mask(0, 5), mask(0, 6))


def test_data2vec_needs_a_vit(tiny_fmnist, tmp_path, capsys):
    assert main(_args("data2vec", tiny_fmnist, tmp_path / "r", *SMALL, "model.backbone=resnet10")) == 2
    assert "needs a ViT" in capsys.readouterr().err


def test_data2vec_trains_resumes_exactly_and_exports_the_student_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("data2vec", tiny_fmnist, tmp_path, *SMALL)  # masks, noise, EMA redrawn
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("decoder.") for k in state)
