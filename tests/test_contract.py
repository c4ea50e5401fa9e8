"""Method contract v2: a method that needs masks, a schedule, a pre-step hook and a buffer runs under the trainer,
which knows none of it (selfsup.contract)."""

from dataclasses import dataclass

import pytest
import torch
from conftest import synthetic_classes
from torch import nn

from selfsup.config import Config, _set
from selfsup.contract import Method, Progress, Views
from selfsup.data.datasets import from_arrays
from selfsup.data.masking import random_mask
from selfsup.data.types import DataInfo
from selfsup.data.views import simclr_views
from selfsup.methods.base import REGISTRY, MethodEntry, forward_views
from selfsup.nn.backbones import build_backbone
from selfsup.pipeline import pretrain
from selfsup.train import train


@dataclass
class ToyParams:
    mask_ratio: float = 0.5


class MaskedViews:
    """A view maker that adds a per-sample patch mask, drawn from the step's generator, to SimCLR's views."""

    def __init__(self, inner, patches: int, ratio: float):
        self.inner, self.patches, self.ratio = inner, patches, ratio

    def __call__(self, batch, generator=None) -> Views:
        views = self.inner(batch, generator)
        views.masks["patches"] = random_mask(batch.shape[0], self.patches, self.ratio, generator).mask
        return views

    def describe(self) -> list[dict]:
        return [{**d, "mask_ratio": self.ratio} for d in self.inner.describe()]

    def global_views(self):
        return self.inner.global_views()


class Toy(Method):
    """Zeroes the masked 4x4 patches of each crop, pulls the two views together; a "last layer" frozen in epoch 0
    through the pre-step hook; a running center of the features (a buffer) updated after each step."""

    log: list = []  # (where, progress) of every call, for the test to read
    rows: list = []  # (labels, index) the views of every forward carried

    def __init__(self, view_maker):
        super().__init__()
        self.view_maker = view_maker
        self.encoder = build_backbone("resnet10", in_chans=1, width=4, stem="small")
        self.projector = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
        self.register_buffer("center", torch.zeros(8))
        self.last_z = None

    def forward(self, views: Views, progress: Progress) -> dict:
        Toy.log.append(("forward", progress, views.masks["patches"].clone()))
        Toy.rows.append((views.labels, views.index))
        m = views.masks["patches"].view(-1, 1, 4, 4).float()
        keep = 1 - nn.functional.interpolate(m, scale_factor=4)  # 16x16 crops, 4x4 patches
        feats = forward_views(self.encoder, [c * keep for c in views.crops])
        z = forward_views(self.projector, feats)
        self.last_z = torch.cat(z).detach()
        loss = (nn.functional.normalize(z[0]) - nn.functional.normalize(z[1])).pow(2).sum(1).mean()
        return {"loss": loss, "features": feats[0]}

    def before_optimizer_step(self, progress: Progress) -> None:
        Toy.log.append(("before_step", progress, self.projector[2].weight.grad is not None))
        if progress.epoch == 0:
            self.projector[2].weight.grad = None  # the DINO pattern: last layer frozen in the first epoch

    def on_step_end(self, progress: Progress) -> dict:
        Toy.log.append(("step_end", progress, None))
        self.center.mul_(0.9).add_(0.1 * self.last_z.mean(0))
        return {"center_norm": float(self.center.norm())}


def _build(cfg, data):
    views = simclr_views(16, data.mean, data.std, channels=data.channels)
    return Toy(MaskedViews(views, 16, cfg.params.mask_ratio))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", MethodEntry("toy", _build, ToyParams, "test", "-", "toy"))
    Toy.log, Toy.rows = [], []
    return Toy


def _config(out, **over) -> Config:
    cfg = Config(method="toy", params=ToyParams(), out=str(out), epochs=2, batch_size=32, seed=3)
    for key, value in {"optim.name": "adamw", "optim.base_lr": 1e-3, "optim.lr_rule": "none",
                       "optim.warmup_epochs": 0.0, "optim.clip_grad": 1.0, "views.size": 16, "train.knn_every": 0,
                       "eval.linear": False, "eval.mlp": False, "eval.rotation": False, "eval.lidar_images": 0,
                       "eval.report": False, "eval.init_baseline": False, **over}.items():
        _set(cfg, key, value)
    return cfg


def _data():
    x, y = synthetic_classes(96, 0)
    return from_arrays(x, y, name="toy/train"), None


def test_a_method_with_masks_schedule_hooks_and_a_buffer_runs_under_the_trainer(toy, tmp_path):
    summary = pretrain(_config(tmp_path / "run"), *_data())
    steps = 2 * (96 // 32)
    assert summary["steps"] == steps
    forwards = [p for where, p, _ in toy.log if where == "forward"]
    befores = [(p, had_grad) for where, p, had_grad in toy.log if where == "before_step"]
    ends = [p for where, p, _ in toy.log if where == "step_end"]
    # progress: forward and the pre-step hook see the steps done so far, on_step_end one more
    assert [p.step for p in forwards] == [p.step for p, _ in befores] == list(range(steps))
    assert [p.step for p in ends] == list(range(1, steps + 1))
    assert [p.epoch for p in forwards] == [0, 0, 0, 1, 1, 1] and all(p.total_steps == steps for p in forwards)
    assert all(had_grad for _, had_grad in befores)  # called after backward
    masks = [m for where, _, m in toy.log if where == "forward"]
    assert all(m.shape == (32, 16) and int(m.sum()) == 32 * 8 for m in masks)  # ratio 0.5 of 16 patches
    assert not torch.equal(masks[0], masks[1])  # a new draw every step
    # the views carry the batch's labels and its rows in the training set (SupCon, NPID's memory bank)
    train_set, _ = _data()
    for epoch in range(2):
        seen = torch.cat([index for _, index in toy.rows[3 * epoch:3 * epoch + 3]])
        assert sorted(seen.tolist()) == list(range(96))  # every sample once per epoch
    for labels, index in toy.rows:
        assert torch.equal(labels, train_set.labels[index])
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["method"]["center"].abs().sum() > 0  # the buffer was updated and saved
    # config.yaml records what the view maker says it does, without the trainer reading its internals
    import yaml

    resolved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())["resolved_views"]
    assert len(resolved) == 2 and all(v["mask_ratio"] == 0.5 for v in resolved)


def test_the_pre_step_hook_freezes_the_last_layer_during_epoch_0_only(toy, tmp_path):
    run = tmp_path / "run"
    pretrain(_config(run, **{"train.max_steps": 3}), *_data())  # exactly epoch 0
    init = torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]
    torch.manual_seed(3)  # the trainer seeds before building: same initial weights
    toy_init = _build(_config(run), DataInfo("image", (1, 16, 16), (0.5,), (0.5,)))
    frozen, moved = "projector.2.weight", "projector.0.weight"
    assert torch.equal(init[frozen], toy_init.state_dict()[frozen])
    assert not torch.equal(init[moved], toy_init.state_dict()[moved])
    pretrain(_config(run, **{"resume": "auto"}), *_data())  # epoch 1: it trains
    after = torch.load(run / "checkpoints/last.pt", weights_only=True)["method"]
    assert not torch.equal(after[frozen], init[frozen])


def test_masks_and_buffers_are_reproduced_on_resume(toy, tmp_path):
    pretrain(_config(tmp_path / "a"), *_data())
    straight = [m for where, _, m in toy.log if where == "forward"]
    Toy.log = []
    pretrain(_config(tmp_path / "b", **{"train.max_steps": 4}), *_data())
    pretrain(_config(tmp_path / "b", **{"resume": "auto"}), *_data())
    resumed = [m for where, _, m in toy.log if where == "forward"]
    assert len(resumed) == len(straight) and all(torch.equal(a, b) for a, b in zip(straight, resumed))
    a = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_clipping_is_a_trainer_option(toy, tmp_path):
    import json

    pretrain(_config(tmp_path / "run", **{"optim.clip_grad": 1e-3, "train.log_every": 1}), *_data())
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    assert len(norms) == 6 and all(n > 1e-3 for n in norms)  # the norm before clipping is logged
    assert all("center_norm" in r for r in records if "loss" in r)  # hook scalars reach the log


def test_views_read_as_their_crops_and_check_n_global():
    a, b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    v = Views([a, b], n_global=1)
    assert len(v) == 2 and list(v) == [a, b] and v[1] is b and v.global_crops == [a] and v.local_crops == [b]
    assert v.map_crops(lambda c: c + 1)[0].sum() == 32
    with pytest.raises(ValueError, match="n_global"):
        Views([a], n_global=2)
    p = Progress(7, 20, 3)
    assert p.epoch == 2 and p.fraction == pytest.approx(0.35) and p.after().step == 8


def test_the_trainer_takes_a_built_method_it_never_looked_up(tmp_path):
    """No registry entry: the trainer gets the module itself and trains it (it imports nothing from methods/)."""
    x, y = synthetic_classes(96, 0)
    data = from_arrays(x, y, name="toy/train")
    info = DataInfo("image", data.image_shape, (0.5,), (0.5,), 2, "toy")
    cfg = _config(tmp_path / "run", method="not-registered")
    torch.manual_seed(0)
    toy = Toy(MaskedViews(simclr_views(16, info.mean, info.std, channels=1), 16, 0.5))
    before = toy.projector[0].weight.detach().clone()
    trained = train(cfg, toy, data, data=info)
    assert trained.summary["steps"] == 6 and not torch.equal(before, toy.projector[0].weight)
    assert (tmp_path / "run/backbone.safetensors").exists() and not (tmp_path / "run/eval.json").exists()


def test_no_import_cycles_and_the_trainer_imports_no_method():
    """Every module imports on its own in a fresh interpreter state (a cycle fails in some import order), and
    importing the trainer loads nothing from selfsup.methods."""
    import subprocess
    import sys

    code = """
import importlib, pkgutil, sys
import selfsup
names = sorted(m.name for m in pkgutil.walk_packages(selfsup.__path__, "selfsup.") if m.name != "selfsup.__main__")
for name in names:
    for loaded in [m for m in sys.modules if m == "selfsup" or m.startswith("selfsup.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
    if name == "selfsup.train":
        assert not [m for m in sys.modules if m.startswith("selfsup.methods")], "selfsup.train imports methods"
print(len(names))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 40


def test_adamw_betas_and_the_weight_decay_schedule_are_trainer_options(toy, tmp_path):
    from selfsup.optim import warmup_cosine

    run = tmp_path / "run"
    pretrain(_config(run, **{"optim.betas": [0.9, 0.95], "optim.weight_decay": 0.04,
                             "optim.weight_decay_end": 0.4}), *_data())
    groups = torch.load(run / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    decayed = [g["weight_decay"] for g in groups if g["weight_decay"] > 0]
    # the last of 6 steps set it: cosine from 0.04 to 0.4 (DINO's schedule); biases and norms keep 0
    assert decayed == [pytest.approx(warmup_cosine(5, 6, 0, 0.04, 0.4))] and decayed[0] > 0.35
    assert any(g["weight_decay"] == 0.0 for g in groups)
