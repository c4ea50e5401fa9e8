"""``train.fsdp=true`` (PyTorch's FSDP2 on 2 gloo processes): a sharded training step of every ViT method, each
process holding half the batch and half of every weight, lands on the weights of 1 process stepping on the whole
batch (float64); the CLI trains, checkpoints, resumes (sharded, and unsharded on 1 process) and evaluates a
sharded run; and the settings FSDP cannot honour are refused before any work.

The views are drawn once for the whole batch and each process takes its half (as in ``test_sync_bn_methods.py``),
so both runs see the same crops and masks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from test_sync_bn_methods import B, _overrides, _progress, _views, float64

import selfsup.distributed
from selfsup.cli import main
from selfsup.compiled import networks
from selfsup.fsdp import _blocks, shard
from selfsup.nn.sync_bn import synchronize_batchnorm

# float64: the sharded run adds the same numbers in other orders (all-gathers, reduce-scatters)
ATOL, RTOL = 1e-9, 1e-7
SGD_LR = 0.1
# every ViT method of the catalog: the models FSDP is for
METHODS = ["data2vec", "ibot", "ijepa", "mae", "msn", "simmim"]


def _build(method):
    """The tiny recipe of ``method``; data2vec with one clone per sample (its clones are rows of the same sample, so
    they would only repeat the check) and no noise on the decoder's masked inputs (drawn from the global generator,
    which differs per process in any data-parallel run)."""
    from test_sync_bn_methods import _info

    from selfsup.config import build_config
    from selfsup.methods import get_method

    extra = ["data2vec.clone_batch=1", "data2vec.mask_noise_std=0"] if method == "data2vec" else []
    cfg = build_config(method, [*_overrides(method), *extra], params_cls=get_method(method).params_cls)
    torch.manual_seed(0)
    return get_method(method).build(cfg, _info(method)).train()


def _rows(views, lo: int, hi: int):
    """Samples lo..hi of every crop and mask; masks made per view or per target block keep the batch in dim 1."""
    import dataclasses

    def cut(t):
        if t.shape[0] == B:
            return t[lo:hi]
        if t.ndim >= 2 and t.shape[1] == B:
            return t[:, lo:hi]
        raise AssertionError(f"a tensor of shape {tuple(t.shape)} for a batch of {B}: not sliceable by sample")

    return dataclasses.replace(views, crops=[cut(c) for c in views.crops], masks={k: cut(v) for k, v in views.masks.items()},
                               labels=cut(views.labels), index=cut(views.index))


def _step(raw, views, progress) -> dict:
    """Forward, backward, the method's hooks around a plain SGD step (element-wise, as FSDP needs), then the full
    (unsharded) weights and buffers: EMA teachers, centers and prototypes included."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = raw(views, progress)
    out["loss"].backward()
    raw.before_optimizer_step(progress)
    with torch.no_grad():
        for p in raw.parameters():
            if p.grad is not None:
                p.sub_(SGD_LR * p.grad)
    raw.on_step_end(progress.after())
    if dist.is_initialized():
        state = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = raw.state_dict()
    return {"loss": out["loss"].detach(), "state": {k: v.detach().clone() for k, v in state.items()}}


def _worker(rank, world, port, out_dir, methods):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    half = B // world
    for method in methods:
        with float64():
            raw = _build(method)
        views = _rows(_views(method, raw), rank * half, (rank + 1) * half)
        synchronize_batchnorm(raw, "cpu")  # as the trainer does on several processes (MSN's head has batch norm)
        sharded = shard(raw, networks(raw))
        blocks = sum(len(_blocks(m)) for m in networks(raw).values())
        local = next(raw.parameters())
        result = _step(raw, views, _progress(method))
        result.update(sharded=sharded, blocks=blocks, dtensor=type(local).__name__)
        torch.save(result, os.path.join(out_dir, f"{method}-{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, _free_port(), str(out), METHODS), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_a_sharded_step_equals_one_process(two_processes, method):
    with float64():
        raw = _build(method)
    ref = _step(raw, _views(method, raw), _progress(method))
    r = torch.load(two_processes / f"{method}-0.pt", weights_only=True)
    assert r["dtensor"] == "DTensor" and r["blocks"] > 0 and "encoder" in r["sharded"]  # it did shard
    assert r["state"].keys() == ref["state"].keys()
    moved = 0.0
    for k, v in ref["state"].items():
        torch.testing.assert_close(r["state"][k], v, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{method} {k}: {m}")
    for k, v in _build_state(method).items():
        if v.is_floating_point():
            moved = max(moved, float((ref["state"][k] - v).abs().max()))
    assert moved > 1e-4  # the step changed the weights: the comparison above is not of two initial states


def _build_state(method):
    with float64():
        return _build(method).state_dict()


# ----------------------------------------------------------------------------------------------------------- CLI

def _args(root, out, *extra):
    return ["train", "mae", f"data.root={root}", f"out={out}", "epochs=2", "batch_size=32", "model.backbone=vit_tiny",
            "model.patch_size=4", "views.size=16", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2",
            "optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none", "optim.warmup_epochs=1",
            "optim.clip_grad=1.0", "train.device=cpu", "train.log_every=1", "train.knn_every=1",
            "train.knn_monitor_size=64", "eval.linear_epochs=2", "eval.mlp=false", "eval.rotation=false",
            "eval.lidar_images=0", "eval.report=false", "eval.guillotine=false", *extra]


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "selfsup", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import synthetic_classes, write_idx

    root = tmp_path_factory.mktemp("data")
    write_idx(root, "train", *synthetic_classes(128, 0))  # 4 steps of 32 per epoch
    write_idx(root, "t10k", *synthetic_classes(64, 1))
    return root


def test_a_sharded_run_trains_resumes_and_evaluates(data, tmp_path):
    from safetensors.torch import load_file

    plain, run = tmp_path / "plain", tmp_path / "fsdp"
    assert main(_args(data, plain, "train.max_steps=3", "eval=false")) == 0
    log = _torchrun(_args(data, run, "train.fsdp=true", "train.max_steps=3", "eval=false"))
    assert "train.fsdp: encoder" in log and "sharded over 2 processes" in log
    sharded_ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    plain_ckpt = torch.load(plain / "checkpoints/last.pt", weights_only=True)
    # the checkpoint format does not change: full tensors under the same names, the optimizer state by position
    assert sharded_ckpt["method"].keys() == plain_ckpt["method"].keys()
    for k, v in plain_ckpt["method"].items():
        assert sharded_ckpt["method"][k].shape == v.shape and not hasattr(sharded_ckpt["method"][k], "to_local")
    assert sharded_ckpt["optimizer"]["state"].keys() == plain_ckpt["optimizer"]["state"].keys()
    assert [len(g["params"]) for g in sharded_ckpt["optimizer"]["param_groups"]] == \
        [len(g["params"]) for g in plain_ckpt["optimizer"]["param_groups"]]
    for i, s in plain_ckpt["optimizer"]["state"].items():
        assert sharded_ckpt["optimizer"]["state"][i]["exp_avg"].shape == s["exp_avg"].shape
    # resumed sharded to step 6, then on 1 process without FSDP to the end, then evaluated
    log = _torchrun(_args(data, run, "resume=auto", "train.max_steps=6", "eval=false"))
    assert "resumed at step 3" in log
    assert main(_args(data, run, "resume=auto", "train.max_steps=0", "train.fsdp=false", "eval=true")) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 8 and [g["processes"] for g in s["segments"]] == [2, 2, 1]
    assert s["knn_top1"] > 25 and s["linear_top1"] > 25  # 4 classes: above chance
    exported = load_file(str(run / "backbone.safetensors"))
    encoder = {k[len("encoder."):]: v for k, v in torch.load(run / "checkpoints/last.pt",
                                                              weights_only=True)["method"].items()
               if k.startswith("encoder.")}
    assert exported.keys() == encoder.keys() and all(torch.equal(exported[k], encoder[k]) for k in encoder)


def test_a_sharded_run_evaluates_on_rank_zero(data, tmp_path):
    """Trained and evaluated in one sharded command: rank 0 evaluates an unsharded copy of the trained weights."""
    out = tmp_path / "one"
    _torchrun(_args(data, out, "train.fsdp=true", "epochs=1"))
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and "knn_top1" in s and "linear_top1" in s


@pytest.mark.parametrize("extra, message", [
    (["optim.name=lars"], "element-wise optimizer"),
    (["train.compile=true"], "train.compile"),
    (["train.budget=1m"], "train.budget"),
])
def test_what_fsdp_cannot_honour_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_args(data, tmp_path / "r", "train.fsdp=true", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_one_process_is_refused(data, tmp_path, capsys):
    assert main(_args(data, tmp_path / "r", "train.fsdp=true")) == 2
    assert "several processes" in capsys.readouterr().err
