"""train.budget: the epochs that fit a training-time budget, chosen from this machine's measured step time, without
changing the run itself (the same weights as `epochs=N`), recorded, and kept on resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_train import _args

import selfsup.train
from selfsup.budget import choose_steps, parse_budget
from selfsup.cli import main

FAST = ["eval=false", "train.knn_every=0", "train.online_probe=false"]


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("1.5h", 5400), ("600", 600), (45, 45),
                                           ("2min", 120), (" 7 m ", 420)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["10x", "", "-5m", "0", "m", True, float("inf")])
def test_parse_budget_refuses_what_is_not_a_positive_duration(text):
    with pytest.raises(ValueError):
        parse_budget(text)


def test_a_budget_refuses_a_warmup_that_is_not_a_share_of_the_recipe_epochs(tmp_path, capsys):
    """The budget keeps warmup_epochs / epochs of the run: a warm-up of 2 of a 1-epoch recipe would be twice the run
    (the lr never reaching its peak). Refused before anything is written; without a budget it stays a warning."""
    run = tmp_path / "r"
    assert main(["train", "msn", "train.budget=5m", "optim.warmup_epochs=2", f"out={run}"]) == 2  # msn's epochs: 1
    err = capsys.readouterr().err
    assert "optim.warmup_epochs=2 is not less than epochs=1" in err and "epochs=20 makes it a tenth" in err
    assert not run.exists()
    from selfsup.config import build_config
    from selfsup.methods import get_method

    params = get_method("msn").params_cls
    build_config("msn", ["train.budget=5m", "optim.warmup_epochs=2", "epochs=20"], params_cls=params)  # a share
    build_config("msn", ["optim.warmup_epochs=2"], params_cls=params)  # no budget: train() warns, as before


def test_choose_steps_fits_the_budget_less_the_margin():
    # 600 s x 0.95 = 570 s at 0.5 s a step: 1140 steps (11.4 epochs of 100), 1200 would be 600 s
    assert choose_steps(600, 0.5, 100) == 1140
    assert choose_steps(600, 0.5, 100, margin=0.0) == 1200
    assert choose_steps(10, 5.0, 100) == 100  # not even one epoch fits: one, with a warning from the trainer
    with pytest.raises(ValueError):
        choose_steps(600, 0.0, 100)
    # a cheaper first epoch (DeepCluster-v2's bank fill, 0.1 s a step = 10 s): 100 + (570 - 10) / 0.5 = 1220 steps
    assert choose_steps(600, 0.5, 100, first_step_seconds=0.1) == 1220
    assert choose_steps(600, 0.5, 100, first_step_seconds=0.5) == choose_steps(600, 0.5, 100)
    assert choose_steps(600, 0.5, 100, first_step_seconds=6.0) == 100  # the first epoch alone overruns: one
    with pytest.raises(ValueError):
        choose_steps(600, 0.5, 100, first_step_seconds=0.0)


def test_a_budgeted_run_is_the_run_of_its_chosen_steps(tiny_fmnist, tmp_path, monkeypatch, capsys):
    """The timing runs on a copy with the global random state put back: the budgeted run's weights equal those of
    `train.steps=N` for the N it chose, ending inside an epoch, its warm-up scaled to the same share of the run (N
    forced to 6 steps = 1.5 epochs of the recipe's 4 here: the real choice depends on this machine's speed; warm-up
    1 of 4 epochs -> 0.375 of 1.5)."""
    chosen = {}

    def fake_choose(budget_seconds, step_seconds, steps_per_epoch, first_step_seconds=None):
        chosen.update(budget=budget_seconds, step=step_seconds, spe=steps_per_epoch, first=first_step_seconds)
        return 6

    monkeypatch.setattr(selfsup.train, "choose_steps", fake_choose)
    a, b = tmp_path / "budget", tmp_path / "steps"
    assert main(_args("simclr", tiny_fmnist, a, *FAST, "epochs=4", "train.budget=2m")) == 0
    assert chosen["budget"] == 120 and chosen["step"] > 0 and chosen["spe"] == 4  # 256 images / batch 64
    assert chosen["first"] > 0  # SimCLR's first epoch is timed too (no different from the others)
    assert "train.budget=2m: a training step takes" in capsys.readouterr().out
    assert main(_args("simclr", tiny_fmnist, b, *FAST, "epochs=2", "train.steps=6", "optim.warmup_epochs=0.375")) == 0
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    for k in sa["method"]:
        assert torch.equal(sa["method"][k], sb["method"][k]), k
    saved = yaml.safe_load((a / "config.yaml").read_text())  # a resume reads the choice from here
    assert saved["train"]["steps"] == 6 and saved["epochs"] == 2 and saved["optim"]["warmup_epochs"] == 0.375
    summary = json.loads((a / "summary.json").read_text())
    assert summary["budget"]["steps"] == 6 and summary["budget"]["epochs"] == 1.5
    assert summary["budget"]["seconds"] == 120 and summary["steps"] == 6 and summary["epochs_done"] == 1.5
    assert summary["budget"]["step_seconds"] == pytest.approx(chosen["step"], rel=1e-3)
    assert summary["budget"]["first_epoch_step_seconds"] == pytest.approx(chosen["first"], rel=1e-3)
    # the schedule spans the 6 steps: the last logged learning rate is the cosine's end, not an epoch's middle
    lrs = [json.loads(x)["lr"] for x in (b / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    full = [json.loads(x)["lr"] for x in (a / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert lrs == full and lrs

    # a resume keeps the chosen steps and times nothing; one that asks for more epochs trains them all
    monkeypatch.setattr(selfsup.train, "choose_steps", lambda *a, **k: pytest.fail("a resume must not re-time"))
    assert main(["train", "simclr", f"out={a}", "resume=auto"]) == 0  # nothing left to train
    assert torch.load(a / "checkpoints/last.pt", weights_only=True)["step"] == 6
    assert main(["train", "simclr", f"out={a}", "resume=auto", "epochs=3"]) == 0  # the saved config, 3 epochs
    assert torch.load(a / "checkpoints/last.pt", weights_only=True)["step"] == 12
    resumed = json.loads((a / "summary.json").read_text())  # the choice is still reported, with every session's time
    assert resumed["budget"]["steps"] == 6 and resumed["budget"]["seconds"] == 120
    assert resumed["budget"]["train_seconds"] == resumed["train_seconds"] >= summary["train_seconds"]
    assert len(resumed["segments"]) == 3
    assert main(["train", "simclr", f"out={b}", "resume=auto", "train.steps=5"]) == 2  # a shorter run: refused
    assert "train.steps=5 is fewer than the run's 6 steps" in capsys.readouterr().err


def test_deepcluster_first_epoch_is_timed_as_its_cheaper_bank_fill(tiny_fmnist, tmp_path, monkeypatch, one_thread):
    """DeepCluster-v2's epoch 0 only fills its banks (a no-grad pass of the global crops): the budget times it
    apart, and a later epoch's step (k-means pseudo-labels, every crop forward and backward, an optimizer update) is
    what the other epochs cost. Timed on one thread; the fill pass is measured well under the training step."""
    import selfsup.methods.self_distillation.deepcluster_v2  # noqa: F401  (registers deepcluster_v2)

    chosen = {}

    def fake_choose(budget_seconds, step_seconds, steps_per_epoch, first_step_seconds=None):
        chosen.update(step=step_seconds, first=first_step_seconds)
        return 4

    monkeypatch.setattr(selfsup.train, "choose_steps", fake_choose)
    assert main(_args("deepcluster_v2", tiny_fmnist, tmp_path / "dc", *FAST, "train.budget=2m",
                      "deepcluster_v2.prototypes=[8,8,8]", "views.n_local=2")) == 0
    assert 0 < chosen["first"] < 0.8 * chosen["step"], chosen
