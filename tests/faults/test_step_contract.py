"""Two properties every registered method must have, checked on all of them (the TINY recipes of tiny_methods.py).

- A forward pass changes no state but batch-norm statistics: teachers, queues, banks, centers and prototypes change
  only in ``before_optimizer_step``/``on_step_end``. This is what lets the trainer skip a step whose loss or
  gradients are NaN/Inf with nothing changed (it puts the batch-norm statistics back itself).
- ``train.deterministic=true``: the same seed gives the same run (bit-identical state after a few steps).
"""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_classes
from tiny_methods import BASE, TINY

from selfsup.config import build_config
from selfsup.contract import Progress
from selfsup.data.datasets import describe_data, from_arrays
from selfsup.methods import REGISTRY, get_method
from selfsup.runs import build_method
from selfsup.train import norm_statistics, train


def _data(method: str):
    if method == "colorization":  # colour data: random RGB squares on grey
        g = torch.Generator().manual_seed(0)
        x = torch.full((128, 3, 16, 16), 120, dtype=torch.uint8)
        x[:, :, 4:12, 4:12] = torch.randint(0, 256, (128, 3, 1, 1), generator=g, dtype=torch.uint8)
        return from_arrays(x, torch.arange(128) % 3, name="squares")
    x, y = synthetic_classes(128, seed=0, size=16)
    return from_arrays(x, y, name="bars")


def _stats_name(method: str) -> str:
    return "cifar10" if method == "colorization" else "fashion_mnist"


# State a forward pass may change because it is a pure function of committed state and the epoch, which the next
# step would compute identically if this one were skipped: DeepCluster-v2's k-means at an epoch's first step.
RECOMPUTED = {"deepcluster_v2": ("labels", "clustered_epoch", "prototypes.")}


def _config(method: str, out, *extra: str):
    args = [a for a in [*BASE, *TINY[method]] if not a.startswith(("data=", "data.image_size", "epochs="))]
    entry = get_method(method)
    if method == "wmse":  # 32 embeddings of 16 dimensions of these bars are rank-deficient without shrinkage
        args.append("wmse.eps=0.01")
    return build_config(method, [*args, "epochs=2", f"out={out}", "train.log_every=1", *extra],
                        params_cls=entry.params_cls)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_forward_pass_changes_no_state_but_batch_norm_statistics(method, tmp_path, one_thread):
    cfg = _config(method, tmp_path / "run")
    data = _data(method)
    m = build_method(cfg, describe_data(data, _stats_name(method))).train()
    stats = {id(t) for t in norm_statistics(m)}
    watched = {k: v.clone() for k, v in m.state_dict(keep_vars=True).items() if id(v) not in stats}
    idx = torch.arange(32)
    views = m.view_maker(data.images[idx], torch.Generator().manual_seed(0))
    views = type(views)(**{**views.__dict__, "labels": data.labels[idx], "index": idx})
    for step in (0, 4):  # the first step, and one in the second epoch (SwAV's queue, DeepCluster's clustering)
        out = m(views, Progress(step, 8, 4))
        out["loss"].backward()
    changed = [k for k, v in m.state_dict().items() if k in watched and not torch.equal(v, watched[k])
               and not k.startswith(RECOMPUTED.get(method, ()))]
    assert changed == [], f"{method}.forward changed {changed}: move that update to on_step_end"


@pytest.fixture
def deterministic_kernels():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_the_same_seed_gives_the_same_run(method, tmp_path, one_thread, deterministic_kernels):
    states = []
    for run in ("a", "b"):
        cfg = _config(method, tmp_path / run, "train.deterministic=true", "train.max_steps=3", "seed=7")
        data = _data(method)
        info = describe_data(data, _stats_name(method))
        train(cfg, build_method(cfg, info), data, data=info)
        states.append(torch.load(tmp_path / run / "checkpoints/last.pt", weights_only=True))
    a, b = states
    assert a["step"] == b["step"] == 3
    different = [k for k in a["method"] if not torch.equal(a["method"][k], b["method"][k])]
    assert different == [], f"{method}: the same seed gave different {different[:5]}"
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a["optimizer"]), _tensors(b["optimizer"])))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k])
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)

