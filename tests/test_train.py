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


def _resumed_equals_uninterrupted(method, root, tmp_path, *extra, stop=2, exported_prefix="encoder."):
    """Train ``method`` for one epoch straight, and again stopped after ``stop`` steps then resumed; assert the two
    final checkpoints are identical (masks, noise, teachers and queues redrawn exactly) and that the exported
    backbone is the method's ``encoder`` (``exported_prefix``) and nothing else (no head, decoder, predictor or
    teacher). Returns the uninterrupted run's method state."""
    from safetensors.torch import load_file

    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(_args(method, root, a, *extra, "epochs=1")) == 0
    assert main(_args(method, root, b, *extra, "epochs=1", f"train.max_steps={stop}")) == 0
    assert main(_args(method, root, b, *extra, "epochs=1", "resume=auto", "train.max_steps=0")) == 0
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)["method"]
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)["method"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    exported = load_file(str(a / "backbone.safetensors"))
    encoder = {k[len(exported_prefix):]: v for k, v in sa.items() if k.startswith(exported_prefix)}
    assert exported.keys() == encoder.keys() and all(torch.equal(exported[k], encoder[k]) for k in encoder)
    return sa


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
    # the exported backbone loads back in one call and gives, from uint8 images, the features evaluation used
    from selfsup.data.datasets import dataset_stats
    from selfsup.evaluate.features import extract_features

    model = load_backbone(out)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = extract_features(load_backbone(out, raw=True), images, *dataset_stats("fashion_mnist", 1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        assert load_backbone(out / "init")(images).shape == (4, model.num_features)  # the untrained export too
    # `selfsup eval` re-evaluates the finished run (labels exist -> kNN and linear)
    capsys.readouterr()
    assert main(["eval", str(out), "eval.linear=false"]) == 0
    assert "kNN top-1" in capsys.readouterr().out


def test_multicrop_simclr_runs(tiny_fmnist, tmp_path):
    out = tmp_path / "mc"
    assert main(_args("simclr", tiny_fmnist, out, "views.n_local=2", "eval.linear=false", "train.knn_every=0",
                      "eval.init_baseline=false", "epochs=1")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("method, optim", [("simclr", "adamw"), ("simclr", "lars"), ("byol", "lars"),
                                           ("byol", "sgd")])
def test_resume_is_exact(method, optim, tiny_fmnist, tmp_path):
    """N steps straight == N/2 steps, stop, resume=auto, N/2 more: identical weights, optimizer and probe."""
    fast = ["eval.linear=false", "train.knn_every=0", "eval.init_baseline=false", f"optim.name={optim}"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(method, tiny_fmnist, a, *fast)) == 0
    assert main(_args(method, tiny_fmnist, b, *fast, "train.max_steps=3")) == 0
    assert torch.load(b / "checkpoints/last.pt", weights_only=True)["step"] == 3
    assert main(_args(method, tiny_fmnist, b, *fast, "resume=auto", "train.max_steps=0")) == 0
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for k in ga:  # same device for every state tensor (e.g. AdamW's step stays on the CPU after a resume)
            assert torch.as_tensor(ga[k]).device == torch.as_tensor(gb[k]).device, f"optimizer state {k} device"
    assert sa["step"] == sb["step"] == 8
    for part in ["method", "probe"]:
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            if isinstance(sa[part][k], torch.Tensor):
                assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs after resume"
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for k in ga:
            assert torch.equal(torch.as_tensor(ga[k]), torch.as_tensor(gb[k])), f"optimizer state {k} differs"
    # the metrics of the resumed run continue where the first half stopped, without duplicates
    steps = [r["step"] for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_unlabeled_folder_trains_without_classifier(tmp_path):
    """An image folder without class sub-folders: no labels, so no probe, no kNN; corrupt files are counted."""
    from conftest import synthetic_classes
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    x, _ = synthetic_classes(70, 3)
    for i, img in enumerate(x):
        Image.fromarray(img).convert("RGB").save(root / f"img{i:03d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main(_args("simclr", root, out, "data=folder", "data.image_size=16", "batch_size=32", "epochs=1")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_files"] == 1 and s["steps"] == 70 // 32
    assert "knn_top1" not in s and "online_probe_top1" not in s
    ckpt = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ckpt["probe"] is None
    assert not (out / "knn.png").exists()


def test_torchrun_two_processes(tiny_fmnist, tmp_path):
    """`torchrun --nproc_per_node=2 -m selfsup train` on CPU (gloo): one run directory, written by rank 0 only; rank 0
    fine-tunes alone after training (its copy's batch norm is not synchronized: it crashed when it was)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    from test_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "selfsup",
           *_args("simclr", tiny_fmnist, out, "eval.linear=false", "epochs=1", "train.device=cpu",
                 "eval.finetune=true", "eval.finetune_epochs=1")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and s["steps"] == 256 // 64 and s["batch_size"] == 64
    assert r.stdout.count("kNN top-1") == 1  # only rank 0 evaluates and prints
    fine_tune = json.loads((out / "eval.json").read_text())["finetune"]
    assert s["finetune_top1"] == fine_tune["top1"]  # copied into summary.json (the catalog's fine-tune column)
    assert f"fine-tune top-1 {fine_tune['top1']:.2f}%" in r.stdout


def test_labelled_folder_uses_test_subfolder_only_when_present(tmp_path, capsys):
    from conftest import synthetic_classes
    from PIL import Image

    root = tmp_path / "shop"
    for split, seed, n in [("train", 5, 64), ("test", 6, 32)]:
        x, y = synthetic_classes(n, seed)
        for i, (img, c) in enumerate(zip(x, y)):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    fast = ["data=folder", "data.image_size=16", "batch_size=32", "epochs=1", "eval.linear=false"]
    out = tmp_path / "with_test"
    assert main(_args("simclr", root, out, *fast)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "knn_top1" in s and s["dataset"] == "folder/train"
    # without a test sub-folder a stratified 10% of each class is held out and not trained on
    capsys.readouterr()
    out2 = tmp_path / "no_test"
    assert main(_args("simclr", root / "train", out2, *fast)) == 0
    s = json.loads((out2 / "summary.json").read_text())
    assert "knn_top1" in s and s["steps"] == (64 - 6) // 32  # 6 of 64 images (10% of each class, rounded) held out
    assert "images (0.1 of each class, seed 0) are held out" in capsys.readouterr().out
    # data.holdout=0: every image trained on, no test accuracy reported
    out3 = tmp_path / "no_holdout"
    assert main(_args("simclr", root / "train", out3, *fast, "data.holdout=0")) == 0
    assert "knn_top1" not in json.loads((out3 / "summary.json").read_text())
    assert "label-based evaluation is skipped" in capsys.readouterr().out


def test_step_seeds_differ_across_processes_and_seeds_on_the_cpu_generator():
    """PyTorch's CPU generator uses only the low 32 bits of a seed: the step seed must differ there, or every
    process (and every seed) draws the same augmentations."""
    from selfsup.train import _OTHER_STREAM, _step_seed

    def draw(seed, rank, step, salt=0):
        return torch.rand(4, generator=torch.Generator().manual_seed(_step_seed(seed, rank, step) ^ salt))

    assert torch.equal(draw(0, 0, 7), draw(0, 0, 7))
    assert not torch.equal(draw(0, 0, 7), draw(0, 1, 7)) and not torch.equal(draw(0, 0, 7), draw(1, 0, 7))
    assert not torch.equal(draw(0, 0, 7), draw(0, 0, 7, _OTHER_STREAM))  # dropout's stream is not the views'
    assert _step_seed(0, 0, 123) == 123  # single-process seed-0 runs keep their earlier draws
    assert len({_step_seed(s, r, t) for s in range(3) for r in range(4) for t in range(2000)}) == 3 * 4 * 2000
