"""Resuming continues the run that was started (its saved config), and checkpoints load safely or not at all."""

import json
import os

import pytest
import torch
import yaml
from test_train import _args

from selfsup.cli import main
from selfsup.config import ConfigError, build_config
from selfsup.runs import CheckpointError, load_checkpoint

FAST = ["eval.linear=false", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0", "eval.report=false",
        "eval.guillotine=false", "train.knn_every=0", "eval.init_baseline=false"]


def _saved(run):
    return (run / "config.yaml").read_bytes(), (run / "checkpoints/last.pt").read_bytes()


@pytest.fixture
def stopped_run(tiny_fmnist, tmp_path):
    """A 2-epoch SimCLR run (4 steps per epoch) stopped after 3 steps, as a kill or Ctrl-C leaves it."""
    run = tmp_path / "run"
    assert main(_args("simclr", tiny_fmnist, run, *FAST, "optim.name=adamw", "train.max_steps=3")) == 0
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 3
    return run


def test_resume_with_only_resume_and_out_continues_the_saved_run(stopped_run, capsys):
    """The README's command: the run's own config is the base, not the default recipe (12 epochs, ResNet-10 w32)."""
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "train.max_steps=0"]) == 0
    cfg = yaml.safe_load((stopped_run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 64 and cfg["model"]["width"] == 4
    assert cfg["optim"]["name"] == "adamw" and cfg["train"]["max_steps"] == 0
    s = json.loads((stopped_run / "summary.json").read_text())
    assert s["steps"] == 8 and s["epochs"] == 2 and s["epochs_done"] == 2.0
    assert "resume changes train.max_steps: 3 -> 0" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["batch_size=32", "optim.name=sgd", "model.width=8", "seed=1",
                                      "simclr.temperature=0.5", "views.size=12", "data=mnist", "recipe=fmnist-long",
                                      "train.precision=bf16", "epochs=1"])
def test_resume_refuses_overrides_that_train_another_run(stopped_run, override, capsys):
    before = _saved(stopped_run)
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", override]) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert ("different run" in err and key.replace("data", "data.name") in err) or \
        (key == "recipe" and "differs from the run's recipe" in err), err
    assert _saved(stopped_run) == before  # nothing was trained or rewritten


def test_resume_applies_allowed_changes_and_the_summary_counts_every_session(stopped_run, capsys):
    first = torch.load(stopped_run / "checkpoints/last.pt", weights_only=True)["segments"]
    assert len(first) == 1 and first[0]["end_step"] == 3 and first[0]["seconds"] > 0
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "epochs=3", "train.max_steps=0",
                 "eval.knn_ks=[5]", "train.num_threads=1"]) == 0
    out = capsys.readouterr().out
    assert "resume changes epochs: 2 -> 3" in out
    cfg = yaml.safe_load((stopped_run / "config.yaml").read_text())
    assert cfg["epochs"] == 3 and cfg["eval"]["knn_ks"] == [5] and cfg["train"]["num_threads"] == 1
    s = json.loads((stopped_run / "summary.json").read_text())
    assert s["steps"] == 12 and [(g["start_step"], g["end_step"]) for g in s["segments"]] == [(0, 3), (3, 12)]
    assert s["segments"][1]["changes"]["epochs"] == [2, 3]
    assert s["train_seconds"] == pytest.approx(sum(g["seconds"] for g in s["segments"]), abs=0.1)
    assert s["train_seconds"] >= s["segments"][0]["seconds"] > 0
    images = sum(g["images"] for g in s["segments"])
    assert images == 12 * 64
    assert s["samples_per_second"] == pytest.approx(images / sum(g["step_seconds"] for g in s["segments"]), rel=0.01)


def test_a_run_resumed_after_its_last_step_keeps_its_training_time(stopped_run):
    """Interrupted during the final evaluation, then resumed: nothing left to train, the time trained still counts."""
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "train.max_steps=0"]) == 0
    trained = json.loads((stopped_run / "summary.json").read_text())["train_seconds"]
    (stopped_run / "summary.json").unlink()
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}"]) == 0
    s = json.loads((stopped_run / "summary.json").read_text())
    assert s["steps"] == 8 and trained > 0 and s["train_seconds"] == pytest.approx(trained, abs=0.1)


def test_resume_in_a_folder_without_a_run_says_so(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["train", "simclr", "resume=auto", f"out={empty}"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert list(empty.iterdir()) == []  # no new run was started there
    assert main(["train", "simclr", "resume=auto"]) == 2
    assert "out=RUN_DIR" in capsys.readouterr().err


def test_a_cli_resume_reads_the_checkpoint_once(stopped_run, monkeypatch):
    """The config and the state come from one read of checkpoints/last.pt (a large checkpoint is not loaded twice)."""
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if str(f).endswith("last.pt"):
            reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "train.max_steps=0"]) == 0
    assert reads == [str(stopped_run / "checkpoints/last.pt")]


def test_resume_of_a_byol_run_as_simclr_is_refused(stopped_run, capsys):
    assert main(["train", "byol", "resume=auto", f"out={stopped_run}"]) == 2
    assert "is a 'simclr' run" in capsys.readouterr().err


def test_python_pretrain_refuses_a_config_that_does_not_match_the_checkpoint(stopped_run, tiny_fmnist):
    from selfsup.methods import get_method
    from selfsup.pipeline import pretrain

    cfg = build_config("simclr", [a for a in _args("simclr", tiny_fmnist, stopped_run, *FAST)[2:]] +
                       ["batch_size=32", "optim.name=adamw", "resume=auto"], params_cls=get_method("simclr").params_cls)
    with pytest.raises(ConfigError, match="batch_size"):
        pretrain(cfg)


# ------------------------------------------------------------------------------------------- unsafe checkpoints


class _Payload:
    """Unpickling this runs `touch MARKER`; a weights-only load must refuse it before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_does_not_run(stopped_run, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(stopped_run / "checkpoints/last.pt", weights_only=True)
    state["probe"] = _Payload(marker)
    torch.save(state, stopped_run / "checkpoints/last.pt")
    with pytest.raises(CheckpointError, match="was refused") as e:
        load_checkpoint(stopped_run / "checkpoints/last.pt")
    assert "system" in str(e.value) and "weights_only=False" not in str(e.value)
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "train.max_steps=0"]) == 1
    err = capsys.readouterr().err
    assert "was refused and not loaded" in err and "weights_only=False" not in err and "Traceback" not in err
    # `selfsup eval` of the run reads the same checkpoint (projector, views)
    assert main(["eval", str(stopped_run), *FAST[:6]]) == 1
    assert "was refused and not loaded" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not_a_checkpoint"])
def test_a_damaged_checkpoint_gives_a_clear_error(stopped_run, damage, capsys):
    path = stopped_run / "checkpoints/last.pt"
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"hello world " * 100)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    expected = "is not a selfsup checkpoint" if damage == "not_a_checkpoint" else "truncated or corrupt"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    assert main(["train", "simclr", "resume=auto", f"out={stopped_run}", "train.max_steps=0"]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err
