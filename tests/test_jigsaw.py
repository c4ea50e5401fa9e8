"""Jigsaw: the permutation set follows Noroozi & Favaro's Algorithm 1, tiles are cut from the right cells in the
permuted order and normalized one by one, the loss is the permutation cross-entropy, training resumes exactly."""

import itertools

import pytest
import torch
from test_train import _resumed_equals_uninterrupted

from selfsup.config import Config, _set
from selfsup.contract import Progress
from selfsup.data.pretext import hamming_permutations, jigsaw_tiles
from selfsup.data.types import DataInfo
from selfsup.losses.pretext import jigsaw_loss
from selfsup.methods import get_method
from selfsup.methods.pretext.jigsaw import JigsawParams
from selfsup.train import _step_seed

SMALL = ["model.backbone=resnet10", "model.width=8", "model.stem=small", "optim.name=adamw", "optim.lr_rule=none",
         "optim.base_lr=1e-3", "eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", "eval.mlp=false",
         "eval.rotation=false", "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false",
         "jigsaw.permutations=10", "jigsaw.tile_dim=8", "jigsaw.hidden=16"]


def _naive_maximal_set(count, tiles, first):
    """Algorithm 1 of Noroozi & Favaro (2016), written plainly: add the permutation of largest summed distance."""
    every = list(itertools.permutations(range(tiles)))
    chosen = [every[first]]
    while len(chosen) < count:
        scores = [(-1 if p in chosen else sum(sum(a != b for a, b in zip(p, q)) for q in chosen), -i)
                  for i, p in enumerate(every)]
        chosen.append(every[-max(scores)[1]])
    return torch.tensor(chosen)


def test_permutation_set_is_algorithm_1_of_the_paper():
    got = hamming_permutations(6, tiles=4, seed=3)
    assert torch.equal(got, _naive_maximal_set(6, 4, list(itertools.permutations(range(4))).index(tuple(got[0].tolist()))))
    big = hamming_permutations(100, 9, 0)
    assert len({tuple(r) for r in big.tolist()}) == 100 and torch.equal(big.sort(1).values, torch.arange(9).expand(100, 9))
    d = (big[:, None] != big[None]).sum(-1).float()
    assert d.sum() / (100 * 99) > 8.0  # the paper's Table 2: average Hamming distance 8.00 for its maximal sets
    with pytest.raises(ValueError, match="count"):
        hamming_permutations(25, tiles=4)  # 4! = 24


def test_tiles_come_from_their_cells_in_the_permuted_order_and_are_normalized():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 9, 9, generator=g) * 5 + 3
    offsets = torch.zeros(2, 9, 2, dtype=torch.long)
    offsets[1, 4] = torch.tensor([1, 0])  # sample 1, centre cell: tile 1 px lower
    order = torch.stack([torch.arange(9), torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])])
    t = jigsaw_tiles(x, 3, 2, offsets, order)
    assert t.shape == (2, 9, 1, 2, 2)

    def norm(a):
        return (a - a.mean()) / (a.std() + 1e-5)

    torch.testing.assert_close(t[0, 5, 0], norm(x[0, 0, 3:5, 6:8]))  # cell 5 = row 1, col 2
    torch.testing.assert_close(t[1, 0, 0], norm(x[1, 0, 6:8, 6:8]))  # position 0 shows cell 8
    torch.testing.assert_close(t[1, 4, 0], norm(x[1, 0, 4:6, 3:5]))  # centre cell, offset (1, 0)
    with pytest.raises(ValueError, match="must fit"):
        jigsaw_tiles(x, 3, 4, offsets, order)


def test_jigsaw_loss_is_the_permutation_cross_entropy():
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    by_hand = -(torch.log_softmax(logits, 1)[0, 1] + torch.log_softmax(logits, 1)[1, 0]) / 2
    torch.testing.assert_close(jigsaw_loss(logits, torch.tensor([1, 0])), by_hand)
    with pytest.raises(ValueError, match="permutation indices"):
        jigsaw_loss(logits, torch.tensor([3, 0]))


def _jigsaw():
    cfg = Config(method="jigsaw", params=JigsawParams(permutations=10, tile_dim=8, hidden=16))
    for k, v in {"model.backbone": "resnet10", "model.width": 8, "model.stem": "small", "views.size": 28}.items():
        _set(cfg, k, v)
    torch.manual_seed(0)
    return get_method("jigsaw").build(cfg, DataInfo("image", (1, 28, 28), (0.5,), (0.25,)))


def test_the_encoder_sees_each_shuffled_tile_and_the_draws_follow_the_step_generator():
    m = _jigsaw()
    seen = []
    m.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    views = m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, 0, 5)))
    out = m(views, Progress(0, 10, 5))
    expected = jigsaw_tiles(views.crops[0], 3, 8, views.masks["jigsaw_offsets"],
                            m.permutation_set[views.masks["jigsaw_perm"]])
    assert m.view_maker.tile == 8 and seen[0].shape == (27, 1, 8, 8)  # 9-px cells, 64/75 of them
    torch.testing.assert_close(seen[0], expected.flatten(0, 1))
    out["loss"].backward()
    assert out["features"].shape == (3, m.encoder.num_features) and m.head[0].weight.grad.abs().sum() > 0

    def draw(rank, step):
        v = m.view_maker(x, torch.Generator().manual_seed(_step_seed(0, rank, step)))
        return torch.cat([v.masks["jigsaw_perm"], v.masks["jigsaw_offsets"].flatten()])

    assert torch.equal(draw(0, 5), draw(0, 5)) and not torch.equal(draw(0, 5), draw(1, 5))


def test_jigsaw_trains_resumes_exactly_and_exports_the_encoder_only(tiny_fmnist, tmp_path):
    state = _resumed_equals_uninterrupted("jigsaw", tiny_fmnist, tmp_path, *SMALL)
    assert any(k.startswith("head.") for k in state) and any(k.startswith("tile_head.") for k in state)
