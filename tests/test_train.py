"""End-to-end: train + eval on tiny data through the CLI, run-directory contents, and exact resume."""

import json

import pytest
import torch

from selfsup import load_backbone
from selfsup.cli import main


def tiny(root, out, *extra):
    return [f"data.root={root}", f"out={out}", "epochs=2", "batch_size=64", "model.backbone=resnet18",
            "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "views.size=16",
            "views.local_size=8", "optim.warmup_epochs=1", "train.log_every=1", "train.knn_every=1",
            "train.knn_monitor_size=128", "eval.linear_epochs=5", "byol.predictor_hidden=32", *extra]


def _args(method, root, out, *extra):
    return ["train", method, *[a for a in tiny(root, out, *extra) if not a.startswith(
        "byol." if method != "byol" else "simclr.")]]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_train_and_eval_end_to_end(method, tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(method, tiny_fmnist, out)) == 0
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "backbone.safetensors", "backbone.json",
                 "checkpoints/last.pt", "loss.png", "lr.png", "knn.png", "init/backbone.safetensors"]:
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ["method", "epochs", "steps", "train_seconds", "samples_per_second", "knn_top1", "linear_top1",
                "knn_top1_init", "online_probe_top1"]:
        assert key in s, key
    assert s["method"] == method and s["steps"] == 2 * (256 // 64)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in records) and all(r["loss"] == r["loss"] for r in records if "loss" in r)
    # the exported backbone loads back in one call and gives the encoder's features
    model = load_backbone(out)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, model.num_features)
    # `selfsup eval` re-evaluates the finished run (labels exist -> kNN and linear)
    capsys.readouterr()
    assert main(["eval", str(out), "eval.linear=false"]) == 0
    assert "kNN top-1" in capsys.readouterr().out


def test_multicrop_simclr_runs(tiny_fmnist, tmp_path):
    out = tmp_path / "mc"
    assert main(_args("simclr", tiny_fmnist, out, "views.n_local=2", "eval.linear=false", "train.knn_every=0",
                      "eval.init_baseline=false", "epochs=1")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_is_exact(method, tiny_fmnist, tmp_path):
    """N steps straight == N/2 steps, stop, resume=auto, N/2 more: identical weights, optimizer and probe."""
    fast = ["eval.linear=false", "train.knn_every=0", "eval.init_baseline=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(method, tiny_fmnist, a, *fast)) == 0
    assert main(_args(method, tiny_fmnist, b, *fast, "train.max_steps=3")) == 0
    assert torch.load(b / "checkpoints/last.pt", weights_only=True)["step"] == 3
    assert main(_args(method, tiny_fmnist, b, *fast, "resume=auto")) == 0
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 8
    for part in ["method", "probe"]:
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            if isinstance(sa[part][k], torch.Tensor):
                assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs after resume"
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["momentum_buffer"], gb["momentum_buffer"])
    # the metrics of the resumed run continue where the first half stopped, without duplicates
    steps = [json.loads(ln)["step"] for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8
