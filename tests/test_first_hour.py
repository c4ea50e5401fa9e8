"""What a user meets in the first hour on the command line: --version, the sections in --help, eval=false, a log
line every train.log_every steps and one per checkpoint when there is no terminal, a warning for a warm-up that
covers the whole run (issue "A user's first hour")."""

from __future__ import annotations

import json

import pytest

from selfsup import __version__
from selfsup.cli import main

FAST = ["epochs=2", "batch_size=64", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
        "views.size=16", "optim.warmup_epochs=1", "train.knn_every=0", "train.log_every=2", "train.num_threads=1"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"selfsup {__version__}"


def test_train_help_lists_the_config_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for section in ("data.*", "model.*", "views.*", "optim.*", "train.*", "eval.*", "METHOD.*", "eval=false"):
        assert section in out, section


def test_eval_false_skips_the_evaluation_and_logs_without_a_terminal(tiny_fmnist, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["train", "simclr", f"data.root={tiny_fmnist}", f"out={out}", *FAST, "eval=false"]) == 0
    printed = capsys.readouterr().out
    assert not (out / "eval.json").exists() and "knn_top1" not in json.loads((out / "summary.json").read_text())
    assert f"selfsup eval {out}" in printed
    # pytest's stdout is no terminal: a line per metrics record (steps 2 and 6; 4 and 8 end epochs) and checkpoint
    assert "step 2/8 epoch 0.50 loss" in printed and "step 6/8 epoch 1.50 loss" in printed
    assert "epoch 1/2 step 4/8" in printed
    assert f"checkpoint: step 4 -> {out / 'checkpoints/last.pt'}" in printed
    assert f"checkpoint: step 8 -> {out / 'checkpoints/last.pt'}" in printed
    # the evaluation runs later, on the run directory
    assert main(["eval", str(out), "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
                 "eval.report=false", "eval.guillotine=false", "eval.linear_epochs=2"]) == 0
    assert (out / "eval.json").exists()


def test_a_warm_up_covering_the_whole_run_is_warned_about(tiny_fmnist, tmp_path, capsys, one_thread):
    args = ["train", "simclr", f"data.root={tiny_fmnist}", f"out={tmp_path / 'run'}", *FAST, "eval=false",
            "optim.warmup_epochs=2"]
    assert main(args) == 0
    assert "optim.warmup_epochs=2 covers the whole run (2 epochs)" in capsys.readouterr().out
