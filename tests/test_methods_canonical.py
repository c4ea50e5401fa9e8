"""The canonical-correlation methods under the trainer (VICReg, Barlow Twins, W-MSE, SwAV): a few steps on tiny data
change the state they should (SwAV's prototypes stay put while frozen and unit-norm always, its queue fills after its
start epoch), resume restores it exactly, the states stay equal on 2 DDP processes, SwAV's queue shares give the
codes of 1 process, and `optim.no_decay_lr_scale` (Barlow Twins' bias lr) reaches the optimizer groups."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _ddp_tiny_data, _free_port
from test_train import tiny
from torch import nn

import selfsup.distributed
import selfsup.methods  # noqa: F401
import selfsup.methods.canonical_correlation  # noqa: F401  (registers vicreg, barlow_twins, wmse, swav)
from selfsup.cli import main
from selfsup.config import ConfigError, build_config, load_recipe, recipe_names
from selfsup.contract import Progress
from selfsup.data.types import DataInfo
from selfsup.losses.canonical_correlation import swav_loss
from selfsup.methods import get_method
from selfsup.methods.common import make_views
from selfsup.optim import LARS, build_optimizer, param_groups, set_lr

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: 2 threads only wait on each other

QUIET = ["model.backbone=resnet10", "train.knn_every=0", "eval.linear=false", "eval.mlp=false", "eval.rotation=false",
         "eval.lidar_images=0", "eval.report=false", "eval.init_baseline=false", "eval.guillotine=false",
         "eval.label_free=false", "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none"]
# tiny(): width 4, projector 32 -> 16, batch 64 (4 steps per epoch of the 256 fixture images), 2 epochs
CASES = {
    "vicreg": ("vicreg", []),
    "barlow_twins": ("barlow_twins", ["optim.no_decay_lr_scale=0.024"]),
    "wmse": ("wmse", ["wmse.w=32"]),
    "wmse4": ("wmse", ["wmse.w=32", "wmse.views=4"]),
    "swav": ("swav", ["swav.prototypes=16", "swav.queue_length=128", "swav.queue_start_epoch=1", "views.n_local=2"]),
}
INFO = DataInfo("image", (1, 16, 16), (0.2860,), (0.3530,), 10, "tiny", 256)


def _argv(method, root, out, *extra):
    return ["train", method, *[a for a in tiny(root, out, *QUIET, *extra) if not a.startswith("byol.")]]


def _cfg(method, *overrides):
    return build_config(method, list(overrides), params_cls=get_method(method).params_cls)


def _state(run):
    return torch.load(run / "checkpoints/last.pt", weights_only=True)


def _fresh(method, argv):
    cfg = _cfg(method, *argv[2:])
    torch.manual_seed(cfg.seed)
    return get_method(method).build(cfg, INFO).state_dict()


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_trains_moves_its_state_and_resumes_exactly(case, tiny_fmnist, tmp_path):
    method, extra = CASES[case]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(method, tiny_fmnist, b, *extra, "train.max_steps=3")) == 0
    at3 = _state(b)["method"]
    assert main(_argv(method, tiny_fmnist, b, *extra, "resume=auto", "train.max_steps=0")) == 0
    assert main(_argv(method, tiny_fmnist, a, *extra)) == 0
    ca, cb = _state(a), _state(b)
    sa, sb = ca["method"], cb["method"]
    assert sa.keys() == sb.keys()
    for k in sa:  # resume on one machine: bit-identical, prototypes and queues included
        assert torch.equal(sa[k], sb[k]), k
    fresh = _fresh(method, _argv(method, tiny_fmnist, a, *extra))
    moved = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], fresh[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("projector.") for k in moved)
    assert json.loads((a / "summary.json").read_text())["steps"] == 8
    if method == "barlow_twins":  # biases and norms at 0.024 x the weights' lr, excluded from decay
        groups = ca["optimizer"]["param_groups"]
        assert [g["lr_scale"] for g in groups] == [1.0, 0.024] and groups[1]["weight_decay"] == 0.0
        assert groups[1]["lr"] == pytest.approx(0.024 * groups[0]["lr"], rel=1e-12) and groups[0]["lr"] > 0
    if case == "wmse4":
        cfg = _cfg("wmse", *_argv("wmse", tiny_fmnist, a, *extra)[2:])
        assert get_method("wmse").build(cfg, INFO).view_maker.n_global == 4
    if method == "swav":
        w0 = F.normalize(fresh["prototypes.weight"], dim=1)
        assert torch.allclose(fresh["prototypes.weight"].norm(dim=1), torch.ones(16), atol=1e-6)  # from the start
        # frozen in epoch 0 (steps 0-3): only re-normalized; then trained, and unit rows after every step
        torch.testing.assert_close(at3["prototypes.weight"], w0, rtol=0, atol=1e-6)
        assert (sa["prototypes.weight"] - w0).abs().max() > 1e-3
        torch.testing.assert_close(sa["prototypes.weight"].norm(dim=1), torch.ones(16), rtol=0, atol=1e-6)
        for i in range(2):  # one queue per global crop: empty before epoch 1, then 4 steps x 64 rows in a 128 ring
            assert int(at3[f"queues.{i}.count"]) == 0 and not at3[f"queues.{i}.features"].any()
            assert int(sa[f"queues.{i}.count"]) == 128 and int(sa[f"queues.{i}.ptr"]) == (4 * 64) % 128
            torch.testing.assert_close(sa[f"queues.{i}.features"].norm(dim=1), torch.ones(128))  # unit projections
        records = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
        used = [r["queue_in_use"] for r in records if "queue_in_use" in r]
        assert used == [0.0] * 6 + [1.0] * 2  # full after steps 4 and 5 (2 x 64 rows): used at steps 6 and 7
    if method == "vicreg":
        records = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
        assert all({"invariance", "variance", "covariance"} <= r.keys() for r in records if "loss" in r)


def test_swav_prototype_gradient_is_dropped_only_while_frozen():
    cfg = _cfg("swav", "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "swav.prototypes=8",
               "swav.freeze_prototypes_epochs=2")
    m = get_method("swav").build(cfg, INFO)
    for step, kept in ((7, False), (8, True)):  # 4 steps per epoch: step 8 is the first of epoch 2
        m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
        m.encoder.stem[0].weight.grad = torch.ones_like(m.encoder.stem[0].weight)
        m.before_optimizer_step(Progress(step, 100, 4))
        assert (m.prototypes.weight.grad is not None) == kept and m.encoder.stem[0].weight.grad is not None


def test_swav_queue_scores_use_the_current_prototypes_once_full():
    cfg = _cfg("swav", "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "swav.prototypes=8",
               "swav.queue_length=300", "batch_size=100")
    m = get_method("swav").build(cfg, INFO)
    z = F.normalize(torch.randn(100, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    for n in range(3):
        assert m.queue_scores() is None  # not full yet: the reference waits for a full queue
        for q in m.queues:
            q.stage(z + n)
            q.commit()
    scores = m.queue_scores()
    assert [tuple(s.shape) for s in scores] == [(300, 8)] * 2
    torch.testing.assert_close(scores[0], m.queues[0].features @ m.prototypes.weight.T)


# ------------------------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("overrides, match", [
    (["wmse.w=48", "batch_size=64"], r"wmse.w=48 must divide the batch of each forward \(64 = batch_size / "
                                     r"train.accumulate\): change batch_size or wmse.w"),
    (["wmse.w=64", "batch_size=128", "model.projector_out=64"], "must exceed the embedding size "
                                                                "model.projector_out=64"),
    (["wmse.views=1"], "wmse needs views >= 2"),
    (["views.n_local=2"], "set views.n_local=0"),
])
def test_wmse_refuses_bad_settings_with_a_clear_message(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_method("wmse").build(_cfg("wmse", "model.width=4", *overrides), INFO)


@pytest.mark.parametrize("method, overrides, match", [
    ("swav", ["swav.queue_length=32", "batch_size=64"], "swav.queue_length=32 is smaller than batch_size=64"),
    ("swav", ["swav.temperature=0"], r"swav.temperature=0.0 is out of range: it must be > 0"),
    ("swav", ["swav.queue_length=-1"], "must be >= 0"),
    ("vicreg", ["vicreg.var_weight=-1"], r"vicreg.var_weight=-1.0 is out of range: it must be >= 0"),
    ("vicreg", ["views.n_local=2"], "set views.n_local=0"),
    ("barlow_twins", ["barlow_twins.lambd=-0.1"], r"barlow_twins.lambd=-0.1 is out of range: it must be >= 0"),
])
def test_bad_params_are_refused_with_a_clear_message(method, overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_method(method).build(_cfg(method, "model.width=4", *overrides), INFO)


def test_wmse_batch_error_reaches_the_command_line_before_training(tiny_fmnist, tmp_path, capsys):
    assert main(_argv("wmse", tiny_fmnist, tmp_path / "run", "wmse.w=48")) != 0
    assert "wmse.w=48 must divide" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------- optim.no_decay_lr_scale


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2, bias=False))


def test_no_decay_lr_scale_sets_the_lr_of_biases_and_norms():
    groups = param_groups(_net(), 1e-6, no_decay_lr_scale=0.024)
    assert [(g["lr_scale"], g["lars"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1.0, True, 1e-6, 2), (0.024, False, 0.0, 3)]  # two weights; the bias, BN weight and BN bias
    opt = build_optimizer("lars", None, 0.4, 1e-6, groups=groups)
    assert [g["lr"] for g in opt.param_groups] == [0.4, pytest.approx(0.4 * 0.024)]  # before any set_lr
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.012)]
    plain = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))]}], lr=0.1)  # groups without lr_scale: 1
    set_lr(plain, 0.3)
    assert plain.param_groups[0]["lr"] == 0.3
    assert [g["lr_scale"] for g in param_groups(_net(), 1e-6)] == [1.0, 1.0]  # the default changes nothing
    with pytest.raises(ValueError, match="no_decay_lr_scale must be >= 0"):
        param_groups(_net(), 1e-6, no_decay_lr_scale=-1.0)


def test_lars_adapts_the_weights_and_takes_plain_scaled_steps_on_biases_and_norms():
    net, lr, wd, scale = _net(), 0.5, 1e-2, 0.024
    opt = LARS(param_groups(net, wd, no_decay_lr_scale=scale), lr=lr)
    set_lr(opt, lr)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for n, p in net.named_parameters():
        w, grad = before[n], p.grad
        if p.ndim == 1:  # no decay, no trust ratio: SGD at lr x scale (first momentum step = the gradient)
            want = w - lr * scale * grad
        else:
            d = grad + wd * w
            want = w - lr * (0.001 * w.norm() / d.norm()) * d
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=n)


def test_no_decay_lr_scale_is_validated_by_the_config():
    assert _cfg("barlow_twins").optim.no_decay_lr_scale == 1.0
    assert _cfg("barlow_twins", "recipe=imagenet").optim.no_decay_lr_scale == 0.024
    with pytest.raises(ConfigError, match=r"optim.no_decay_lr_scale=-0.5 is out of range: it must be >= 0"):
        _cfg("barlow_twins", "optim.no_decay_lr_scale=-0.5")


# ------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("method", ["vicreg", "barlow_twins", "wmse", "swav"])
def test_every_recipe_loads_and_states_its_source(method):
    names = recipe_names(method)
    assert {"default", "imagenet"} <= set(names)
    for name in names:
        tree = load_recipe(method, name)
        assert tree.get("description") and tree.get("cookbook"), name
        cfg = _cfg(method, f"recipe={name}")
        assert cfg.recipe == name and cfg.params is not None
        if name in ("default", "10min") or name.startswith("fmnist"):  # the Fashion-MNIST recipes (fmnist-long:
            # run longer; 10min: the default's epochs fitted by a training budget)
            assert cfg.data.name == "fashion_mnist" and cfg.model.backbone == "resnet10" and cfg.model.width == 32
            assert (cfg.train.budget == "7.5m") == (name == "10min"), name
        else:
            assert cfg.data.name == "folder" and cfg.views.size == 224
    imagenet = {m: _cfg(m, "recipe=imagenet") for m in ("vicreg", "barlow_twins", "swav", "wmse")}
    assert imagenet["vicreg"].model.projector_layers == 3 and imagenet["vicreg"].model.projector_hidden == 8192
    assert imagenet["barlow_twins"].optim.name == "lars" and imagenet["barlow_twins"].batch_size == 2048
    assert imagenet["swav"].params.prototypes == 3000 and imagenet["swav"].views.n_local == 6
    assert _cfg("swav", "recipe=imagenet-bs256").params.queue_length == 3840
    assert imagenet["wmse"].params.views == 4 and imagenet["wmse"].params.w == 256


def test_imagenet_recipes_make_the_papers_views():
    info = DataInfo("image", (3, 256, 256), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1000, "imagenet", 1281167)
    swav = make_views(_cfg("swav", "recipe=imagenet"), "multicrop", info).describe()  # what SwAV's build uses
    assert [d["size"] for d in swav] == [224] * 2 + [96] * 6
    assert [d["scale"] for d in swav[1:3]] == [[0.14, 1.0], [0.05, 0.14]]
    assert all((d["blur_p"], d["solarize_p"], d["brightness"], d["hue"]) == (0.5, 0.0, 0.8, 0.2) for d in swav)
    wmse = get_method("wmse").build(_cfg("wmse", "recipe=imagenet"), info).view_maker.describe()
    assert len(wmse) == 4 and all((d["size"], d["blur_p"], d["gray_p"]) == (224, 0.5, 0.2) for d in wmse)
    for method in ("vicreg", "barlow_twins"):  # BYOL's asymmetric pair, as both references
        pair = make_views(_cfg(method, "recipe=imagenet"), "byol", info).describe()
        assert [(d["blur_p"], d["solarize_p"]) for d in pair] == [(1.0, 0.0), (0.1, 0.2)]


# ------------------------------------------------------------------------------------------- DDP


DDP_CASES = {
    "swav": ["swav.prototypes=16", "swav.queue_length=32", "swav.queue_start_epoch=0", "views.n_local=2"],
    "barlow_twins": ["optim.no_decay_lr_scale=0.024"],
    "vicreg": [],
    "wmse": ["wmse.w=16", "model.projector_out=8"],
}


def _ddp_argv(method, out):
    return _argv(method, "unused", out, "batch_size=16", "train.max_steps=5", "train.online_probe=false",
                 *DDP_CASES[method])[2:]


def _queue_setup():
    """A SwAV whose 12-row queues are full, and the prototype scores of 3 crops of a batch of 8 (float64)."""
    cfg = _cfg("swav", "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "swav.prototypes=8",
               "swav.queue_length=12", "batch_size=8")
    torch.manual_seed(0)
    m = get_method("swav").build(cfg, INFO).double()
    g = torch.Generator().manual_seed(5)
    for q in m.queues:
        q.features.copy_(F.normalize(torch.randn(12, 16, generator=g, dtype=torch.float64), dim=1))
        q.count.fill_(12)
    return m, [torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(3)]


def _queue_check(rank, out_dir):
    """SwAV's loss on this process's half of the batch, with its share of the queue (the method's) and, as a negative
    control, with the whole queue on every process."""
    m, scores = _queue_setup()
    local = [s[rank * 4:(rank + 1) * 4] for s in scores]
    whole_queue = [q.features @ m.prototypes.weight.T for q in m.queues]
    torch.save({"shared": swav_loss(local, 2, 0.1, 0.05, 3, m.queue_scores()),
                "repeated": swav_loss(local, 2, 0.1, 0.05, 3, whole_queue)}, os.path.join(out_dir, f"queue{rank}.pt"))


def _ddp_worker(rank, world, port, out_dir):
    from selfsup.train import train

    data, info = _ddp_tiny_data(rank, world, port)
    for method in DDP_CASES:
        cfg = _cfg(method, *_ddp_argv(method, os.path.join(out_dir, method)))
        torch.manual_seed(0)
        m = get_method(method).build(cfg, info)
        train(cfg, m, data, data=info)
        torch.save(m.state_dict(), os.path.join(out_dir, f"{method}{rank}.pt"))
    _queue_check(rank, out_dir)
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_states_stay_equal_on_two_ddp_processes_and_swav_queue_shares_equal_one_process(tmp_path):
    """5 steps under DDP (no buffer broadcast, 16 images per step, 4 steps per epoch): each process saw other images
    and drew other views, yet every parameter, SwAV's prototypes and queues included, is the same on both."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for method in DDP_CASES:
        s0, s1 = (torch.load(tmp_path / f"{method}{r}.pt", weights_only=True) for r in range(2))
        assert s0.keys() == s1.keys()
        # batch norm is synchronized (GlobalBatchNorm on gloo): its running statistics are the same on both too
        assert any(k.endswith("running_mean") for k in s0)
        for k in s0.keys():  # reduced gradients and statistics are the same on both: bit-identical updates
            assert torch.equal(s0[k], s1[k]), f"{method} {k}"
    s = torch.load(tmp_path / "swav0.pt", weights_only=True)
    assert int(s["queues.0.count"]) == 32 and int(s["queues.0.ptr"]) == (5 * 16) % 32  # every process's rows
    # the queue split across processes (rows rank::world) gives the whole-batch, whole-queue loss of 1 process
    m, scores = _queue_setup()
    one = swav_loss(scores, 2, 0.1, 0.05, 3, m.queue_scores()).item()
    got = [torch.load(tmp_path / f"queue{r}.pt", weights_only=True) for r in range(2)]
    shared = sum(float(d["shared"]) for d in got) / 2  # DDP averages the per-process means of equal halves
    repeated = sum(float(d["repeated"]) for d in got) / 2
    assert abs(shared - one) < 1e-10 * max(1.0, abs(one))  # float64: the processes differ only in summation order
    assert abs(repeated - one) > 1e-4  # the whole queue on every process counts it twice in Sinkhorn
