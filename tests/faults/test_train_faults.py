"""Faults during training: NaN/Inf losses and gradients, preemption signals, and what a resume must restore.

NaN is injected by wrapping one method instance's forward (or a gradient hook) at chosen steps; preemption by
sending SIGUSR1/SIGTERM to a real `selfsup train` process. Each test checks the outcome against an uninterrupted
run on the same machine, where bit identity is the property (the same steps, the same order, the same kernels).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_classes, write_idx

from selfsup.config import build_config
from selfsup.data.datasets import describe_data, from_arrays
from selfsup.methods import get_method
from selfsup.runs import build_method, resume_state
from selfsup.train import Preempted, save_checkpoint, train

SMALL = ["epochs=2", "batch_size=32", "model.backbone=resnet18", "model.width=4", "model.projector_hidden=32",
         "model.projector_out=16", "views.size=16", "optim.warmup_epochs=1", "train.log_every=1", "train.knn_every=0",
         "train.online_probe=true", "byol.predictor_hidden=32"]


def _data():
    x, y = synthetic_classes(128, seed=0)
    return from_arrays(x, y, name="bars")


def _build(method: str, out: Path, *extra: str):
    entry = get_method(method)
    args = [a for a in SMALL if not a.startswith(("byol.", "moco_v2.")) or a.startswith(f"{method}.")]
    cfg = build_config(method, [*args, f"out={out}", *extra], params_cls=entry.params_cls)
    data = _data()
    info = describe_data(data, "fashion_mnist")
    return cfg, build_method(cfg, info), data, info


def _poison(method, steps: set[int]):
    """Make the loss NaN at the given steps (the forward pass and its side effects otherwise unchanged)."""
    forward = method.forward

    def poisoned(views, progress):
        out = forward(views, progress)
        if progress.step in steps:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    method.forward = poisoned
    return method


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _equal_states(a, b) -> bool:
    """Bit-identical nested states (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("method", ["byol", "moco_v2"])  # an EMA teacher; a queue of keys and a momentum encoder
def test_a_nan_step_changes_nothing(method, tmp_path, one_thread):
    """A NaN loss at the last step is skipped: weights, teacher, queue, optimizer and online probe equal those of
    the same run stopped one step earlier (train.max_steps), and the skip is counted in the summary."""
    extra = ["moco_v2.queue_size=64", "moco_v2.shuffle_bn_groups=2"] if method == "moco_v2" else []
    cfg, m, data, info = _build(method, tmp_path / "ref", *extra, "train.max_steps=7")
    train(cfg, m, data, data=info)
    cfg, m, data, info = _build(method, tmp_path / "nan", *extra)
    total = 2 * (128 // 32)
    summary = train(cfg, _poison(m, {total - 1}), data, data=info).summary
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == total
    ref, nan = _state(tmp_path / "ref/checkpoints/last.pt"), _state(tmp_path / "nan/checkpoints/last.pt")
    assert _equal_states(ref["method"], nan["method"])
    # the optimizer's moments and step counts (its param_groups' lr is the schedule's, set before every step)
    assert _equal_states(ref["probe"], nan["probe"]) and _equal_states(ref["optimizer"]["state"],
                                                                       nan["optimizer"]["state"])
    records = [json.loads(ln) for ln in (tmp_path / "nan/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["loss"] is None and last["nonfinite_steps"] == 1  # a window of skipped steps has no mean loss


def test_an_infinite_gradient_is_skipped_like_a_nan_loss(tmp_path, one_thread):
    cfg, m, data, info = _build("simclr", tmp_path / "ref", "train.max_steps=7")
    train(cfg, m, data, data=info)
    cfg, m, data, info = _build("simclr", tmp_path / "inf")
    weight = next(m.parameters())
    calls = []

    def hook(grad):  # the 8th backward (the last step) gets an Inf gradient; the loss stays finite
        calls.append(1)
        return grad * float("inf") if len(calls) == 8 else grad

    weight.register_hook(hook)
    assert train(cfg, m, data, data=info).summary["nonfinite_steps"] == 1
    assert _equal_states(_state(tmp_path / "ref/checkpoints/last.pt")["method"],
                         _state(tmp_path / "inf/checkpoints/last.pt")["method"])


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path, one_thread):
    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.checkpoint_every=2", "train.nonfinite_limit=3")
    with pytest.raises(FloatingPointError) as e:
        train(cfg, _poison(m, set(range(3, 100))), data, data=info)
    msg = str(e.value)
    # steps 3 and 4 were skipped, so the checkpoint of step 4 holds the state of step 2: still a good one
    assert "3 steps in a row" in msg and "step 5" in msg and "checkpoints/last.pt (step 4)" in msg
    saved = _state(tmp_path / "run/checkpoints/last.pt")
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["method"].values()
                                      if v.is_floating_point())


def test_nan_written_into_a_methods_buffer_stops_the_run(tmp_path, one_thread):
    """A forward pass that leaves NaN in a method's own buffer (a center, a running statistic) cannot be undone by
    skipping the step: the run stops naming the step and the last good checkpoint, which stays finite. (Batch-norm
    statistics are put back by the skip itself: test_a_nan_step_changes_nothing.)"""
    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.checkpoint_every=1")
    m.register_buffer("center", torch.zeros(4))
    forward = m.forward

    def corrupting(views, progress):
        out = forward(views, progress)
        if progress.step == 4:
            m.center.fill_(float("nan"))
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    m.forward = corrupting
    with pytest.raises(FloatingPointError, match=r"step 4: .*a method's buffers.*checkpoints/last.pt \(step 4\)"):
        train(cfg, m, data, data=info)
    saved = _state(tmp_path / "run/checkpoints/last.pt")
    assert saved["step"] == 4 and torch.equal(saved["method"]["center"], torch.zeros(4))


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path, one_thread):
    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.max_steps=1")
    train(cfg, m, data, data=info)
    path = tmp_path / "run/checkpoints/last.pt"
    before = path.read_bytes()
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("inf")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="refusing to write"):
        save_checkpoint(path, m, opt, None, 2, cfg, 1, [])
    assert path.read_bytes() == before


def test_metrics_after_a_resume_equal_the_uninterrupted_runs(tmp_path, one_thread):
    """A run that dies at step 5 (after its step-4 checkpoint, with step 4's loss not yet logged) and resumes writes
    the records of the uninterrupted run: the window of losses since the last record is in the checkpoint."""
    cfg, m, data, info = _build("simclr", tmp_path / "a", "train.log_every=3")
    train(cfg, m, data, data=info)
    cfg, m, data, info = _build("simclr", tmp_path / "b", "train.log_every=3", "train.checkpoint_every=2")
    forward = m.forward

    def dies_at_step_5(views, progress):
        if progress.step == 5:
            raise RuntimeError("injected crash")
        return forward(views, progress)

    m.forward = dies_at_step_5
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg, m, data, data=info)
    state = _state(tmp_path / "b/checkpoints/last.pt")
    assert state["step"] == 4 and len(state["log_window"]) == 1  # step 4's loss, to be logged with steps 5 and 6
    cfg, m, data, info = _build("simclr", tmp_path / "b", "train.log_every=3", "train.checkpoint_every=2",
                                "resume=auto")
    train(cfg, m, data, data=info, state=resume_state(cfg))

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text()
                                                    .splitlines()) if "loss" in r]

    assert losses("a") == losses("b") and [s for s, _ in losses("a")] == [3, 6, 8]


# ---------------------------------------------------------------------------------------------------------------------
# Preemption: a real `selfsup train` process receives the signal


def _fmnist_like(root: Path) -> Path:
    x, y = synthetic_classes(256, seed=0, size=28)
    write_idx(root, "train", x, y)
    tx, ty = synthetic_classes(64, seed=1, size=28)
    write_idx(root, "t10k", tx, ty)
    return root


def _cli(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "selfsup", "train", "simclr", f"data.root={root}", f"out={out}", "epochs=2",
            "batch_size=32", "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "views.size=16",
            "optim.warmup_epochs=1", "train.knn_every=0", "train.num_threads=1", "train.log_every=1",
            "eval.linear=false", "eval.mlp=false", "eval.guillotine=false", "eval.label_free=false",
            "eval.rotation=false", "eval.report=false", "eval.init_baseline=false", "eval.lidar_images=0", *extra]


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory):
    """The data and an uninterrupted `selfsup train` run, shared by the preemption tests."""
    base = tmp_path_factory.mktemp("preempt")
    root = _fmnist_like(base / "fmnist")
    straight = subprocess.run(_cli(root, base / "straight"), env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    return root, base / "straight"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_checkpoints_exits_75_and_resumes_to_the_same_weights(sig, straight_cli_run, tmp_path):
    root, straight = straight_cli_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pre"
    proc = subprocess.Popen(_cli(root, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          (out / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == Preempted.EXIT_CODE, err
    assert f"{signal.Signals(sig).name} received: stopped at step" in err and "resume=auto" in err
    stopped = _state(out / "checkpoints/last.pt")["step"]
    assert 2 <= stopped < 16 and not (out / "backbone.safetensors").exists()
    resumed = subprocess.run(_cli(root, out, "resume=auto"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _state(straight / "checkpoints/last.pt"), _state(out / "checkpoints/last.pt")
    assert b["step"] == 16 and _equal_states(a["method"], b["method"])


def test_mean_loss_over_processes_is_logged(tmp_path):
    """Under DDP the logged loss is the mean over processes, not rank 0's."""
    import torch.multiprocessing as mp

    port = 29500 + os.getpid() % 1000
    mp.spawn(_mean_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert math.isclose(float(np.load(tmp_path / "mean0.npy")), (1.5 + 4.0) / 2)
    assert math.isclose(float(np.load(tmp_path / "mean1.npy")), (1.5 + 4.0) / 2)


def _mean_worker(rank, port, out_dir):
    import torch.distributed as dist

    from selfsup.train import _mean_over_processes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    window = [1.0, 2.0] if rank == 0 else [3.0, 5.0]
    np.save(os.path.join(out_dir, f"mean{rank}.npy"), np.array(_mean_over_processes(window, torch.device("cpu"))))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Image folders: skipped files are listed in the run directory; a folder that changes refuses the resume


def _photos(root: Path, n: int = 70) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    x, _ = synthetic_classes(n, 3)
    for i, img in enumerate(x):
        Image.fromarray(img).convert("RGB").save(root / f"img{i:03d}.png")
    return root


def _folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "simclr", "data=folder", f"data.root={root}", "data.image_size=16", f"out={out}", "epochs=1",
            "batch_size=32", "model.width=4", "model.projector_hidden=32", "model.projector_out=16", "views.size=16",
            "optim.warmup_epochs=0", "train.checkpoint_every=1", "eval.rotation=false", "eval.report=false",
            "eval.lidar_images=0", *extra]


def test_skipped_files_are_listed_with_their_reasons(tmp_path, capsys, one_thread):
    from selfsup.cli import main

    root = _photos(tmp_path / "photos")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "empty.jpg").write_bytes(b"")
    assert main(_folder_args(root, tmp_path / "run")) == 0
    rows = (tmp_path / "run/skipped_files.tsv").read_text().splitlines()
    assert rows[0] == "path\treason" and sorted(r.split("\t")[0] for r in rows[1:]) == [
        str(root / "broken.png"), str(root / "empty.jpg")]
    assert all(r.split("\t")[1] for r in rows[1:])
    assert "2 file(s)" in capsys.readouterr().out


def test_a_folder_that_changed_refuses_the_resume(tmp_path, capsys, one_thread):
    from selfsup.cli import main

    root = _photos(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(_folder_args(root, out, "train.max_steps=1")) == 0
    (root / "img000.png").unlink()  # one training image removed
    before = (out / "checkpoints/last.pt").read_bytes()
    assert main(_folder_args(root, out, "resume=auto", "train.max_steps=0")) == 1
    assert "changed since the run" in capsys.readouterr().err
    assert (out / "checkpoints/last.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints from another version or another model


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path, one_thread):
    from selfsup.runs import CheckpointError, load_checkpoint

    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.max_steps=1")
    train(cfg, m, data, data=info)
    path = tmp_path / "run/checkpoints/last.pt"
    state = _state(path)
    assert state["format"] == 1 and state["selfsup"]
    torch.save({**state, "format": 99, "selfsup": "9.0"}, path)
    with pytest.raises(CheckpointError, match="selfsup 9.0 in checkpoint format 99.*upgrade selfsup"):
        load_checkpoint(path)


def test_a_checkpoint_of_other_model_settings_is_refused_naming_the_keys(tmp_path, one_thread):
    from selfsup.runs import CheckpointError, load_checkpoint, load_method_state

    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.max_steps=1")
    train(cfg, m, data, data=info)
    path = tmp_path / "run/checkpoints/last.pt"
    _, other, _, _ = _build("simclr", tmp_path / "other", "model.projector_layers=3")
    with pytest.raises(CheckpointError, match="does not fit this SimCLR .*unexpected.*projector"):
        load_method_state(other, load_checkpoint(path), path)


# ---------------------------------------------------------------------------------------------------------------------
# Collapse monitor


def _collapsing(method):
    """Every sample's embedding replaced by the same vector (plus float noise): a complete collapse."""
    forward = method.forward

    def collapsed(views, progress):
        out = forward(views, progress)
        z = out["embedding"]
        return {**out, "embedding": torch.ones_like(z) + 1e-6 * torch.randn_like(z)}

    method.forward = collapsed
    return method


def test_a_healthy_run_raises_no_collapse_warning_and_logs_the_signals(tmp_path, one_thread):
    cfg, m, data, info = _build("simclr", tmp_path / "run")
    summary = train(cfg, m, data, data=info).summary
    assert summary["collapse_warnings"] == []
    records = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    spreads = [r["embedding_std"] for r in records if "embedding_std" in r]
    ranks = [r["embedding_rankme"] for r in records if "embedding_rankme" in r]
    assert len(spreads) == 8 and min(spreads) > 0.1 and len(ranks) == 2 and min(ranks) > 2


def test_collapse_warn_records_the_evidence(tmp_path, one_thread):
    cfg, m, data, info = _build("simclr", tmp_path / "run")
    summary = train(cfg, _collapsing(m), data, data=info).summary
    warnings = summary["collapse_warnings"]
    assert warnings and warnings[0]["step"] == 1 and "std of the L2-normalized embeddings" in warnings[0]["evidence"]
    assert any("RankMe" in w["evidence"] for w in warnings)  # at the epoch ends
    assert summary["steps"] == 8  # warn: the run goes on


def test_collapse_stop_ends_the_run_with_a_checkpoint(tmp_path, one_thread):
    from selfsup.monitor import CollapseError

    cfg, m, data, info = _build("simclr", tmp_path / "run", "train.collapse=stop", "train.log_every=2")
    with pytest.raises(CollapseError, match="step 2: the std of the L2-normalized.*complete collapse"):
        train(cfg, _collapsing(m), data, data=info)
    assert _state(tmp_path / "run/checkpoints/last.pt")["step"] == 2


def test_the_report_header_states_what_training_survived():
    from selfsup.report.report import _header

    html = _header({"run": {"method": "simclr", "skipped_files": 2, "nonfinite_steps": 3,
                            "collapse_warnings": [{"step": 40, "evidence": "RankMe of the last embeddings is 1.01"}]}})
    assert "2 unreadable file(s) skipped" in html and "3 step(s) with a NaN/Inf loss" in html
    assert "1 warning(s), the first at step 40: RankMe of the last embeddings is 1.01" in html
    assert "Collapse" not in _header({"run": {"method": "simclr", "collapse_warnings": []}})


def test_a_metrics_write_that_fails_names_the_file(tmp_path):
    """An append to metrics.jsonl that fails (here: the path became a folder) is a WriteError naming the file, not a
    bare OSError traceback; a resume's rewrite of the file drops a line a kill cut short."""
    from selfsup.runtime import WriteError
    from selfsup.train import Logger

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    logger = Logger(run, True, start_step=2)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    logger.close()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(WriteError, match="could not write .*metrics.jsonl"):
        logger.log({"step": 3, "loss": 1.0})


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_damaged_config_yaml_is_a_clear_error_on_resume(damage, tmp_path, capsys):
    """A run stopped before its first checkpoint resumes from config.yaml; a damaged one (a kill while an older
    version wrote it non-atomically, a bad edit) is named, with exit code 2, not a YAML traceback."""
    from selfsup.cli import main

    cfg = build_config("simclr", params_cls=get_method("simclr").params_cls)
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(text[:700] + '\n  "unclosed' if damage == "cut" else "")
    assert main(["train", "simclr", "resume=auto", f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and ("not valid YAML" if damage == "cut" else "holds no selfsup config") in err
    assert "Traceback" not in err and "None run" not in err
