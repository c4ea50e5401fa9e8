"""train.budget: the epochs that fit a training-time budget, chosen from this machine's measured step time, without
changing the run itself (the same weights as `epochs=N`), re-timed once from the run's own steps when the trial
misjudged them, recorded, and kept on resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_train import _args

import selfsup.budget
import selfsup.train
from selfsup.budget import choose_steps, parse_budget, refit_steps, retime_step
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


def test_the_retiming_step_and_the_refit_length():
    """Re-time after ~60 s (at most 5% of the budget) of the trial's steps, at least 10, not in a run shorter than 4x
    that; the new length = steps done + what fits the rest of the budget less the margin, at least an epoch."""
    assert retime_step(600, 0.1, 0, 5000) == 300           # 5% of 10 min = 30 s of 100 ms steps
    assert retime_step(3600, 0.1, 0, 30000) == 600         # capped at 60 s
    assert retime_step(600, 10.0, 0, 1000) == 10           # at least 10 steps (8 of them timed)
    assert retime_step(600, 0.1, 0, 1199) is None          # 300 > 1199 // 4: too short to gain from it
    assert retime_step(600, 0.1, 40, 5000) == 340
    # 300 steps in 36 s, 0.12 s each: 600 x 0.95 - 36 = 534 s left = 4450 more steps
    assert refit_steps(600, 36.0, 300, 0.12, 100) == 300 + 4450
    assert refit_steps(600, 700.0, 300, 0.12, 100) == 301  # over budget already: one step more than done
    assert refit_steps(600, 36.0, 10, 50.0, 100) == 100    # at least one epoch
    with pytest.raises(ValueError):
        refit_steps(600, 36.0, 300, 0.0, 100)


def test_a_trial_that_misjudges_the_run_is_corrected_from_the_run_s_own_steps(tiny_fmnist, tmp_path, monkeypatch,
                                                                               capsys):
    """The trial is made to say 0.5 s a step (a start-up beside another run); the run's real steps are far faster, so
    after its re-timing step it plans far more steps, from its own wall-clock step time, and writes them where a
    resume reads them (train.max_steps stops the test's run early)."""
    monkeypatch.setattr(selfsup.train, "time_training_step", lambda *a, **k: 0.5)
    calls = []
    real_refit = selfsup.budget.refit_steps

    def spy(budget_seconds, elapsed_seconds, steps_done, step_seconds, steps_per_epoch):
        calls.append((budget_seconds, elapsed_seconds, steps_done, step_seconds, steps_per_epoch))
        return real_refit(budget_seconds, elapsed_seconds, steps_done, step_seconds, steps_per_epoch)

    monkeypatch.setattr(selfsup.train, "refit_steps", spy)
    out = tmp_path / "retimed"
    assert main(_args("simclr", tiny_fmnist, out, *FAST, "epochs=4", "train.budget=2m", "train.max_steps=20")) == 0
    trial = choose_steps(120, 0.5, 4)  # 228 steps at the trial's 0.5 s
    at = retime_step(120, 0.5, 0, trial)  # 12: 6 s of the trial's steps
    assert len(calls) == 1
    budget_s, elapsed, done, step_s, spe = calls[0]
    assert (budget_s, done, spe) == (120, at, 4) and 0 < step_s < 0.5 and step_s * (at - 2) <= elapsed < 30
    new = real_refit(120, elapsed, at, step_s, 4)
    assert new > trial
    printed = capsys.readouterr().out
    assert f"re-timed after {at} steps" in printed and f"{new} steps" in printed and f"instead of {trial}" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())  # a resume keeps the re-timed length
    assert saved["train"]["steps"] == new and saved["epochs"] == -(-new // 4)
    assert saved["optim"]["warmup_epochs"] == pytest.approx(1.0 * new / 4 / 4, rel=1e-5)  # 1 of the recipe's 4 epochs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20
    assert summary["budget"]["steps"] == new and summary["budget"]["retimed"]["trial_steps"] == trial
    assert summary["budget"]["retimed"]["at_step"] == at
    assert summary["budget"]["retimed"]["step_seconds"] == pytest.approx(step_s, rel=1e-3)
    # the schedule follows: the steps before the re-timing warm up over 1/4 of the trial's 228 steps, those after it
    # over 1/4 of the new length (each record is the lr of the step just done, index step - 1)
    from selfsup.optim import warmup_cosine

    peak, final = summary["lr"], saved["optim"]["final_lr"] * summary["lr"]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert sorted(lrs) == list(range(1, 21))
    for s, lr in lrs.items():
        total, warm = (trial, round(trial / 4)) if s - 1 < at else (new, round(saved["optim"]["warmup_epochs"] * 4))
        assert lr == pytest.approx(warmup_cosine(s - 1, total, warm, peak, final), rel=1e-6), s
    assert lrs[at + 1] < lrs[at]  # the slope of the warm-up drops where the run grew


def test_two_processes_retime_at_the_same_step_and_agree_on_the_length(tiny_fmnist, tmp_path):
    """`torchrun --nproc_per_node=2` with a 20 s budget: both processes re-time after the same step and take the
    slowest process's numbers, so they train the same steps (a disagreement would hang the gradient all-reduce:
    the 300 s timeout fails the test) and the summary reports the re-timed length as what was trained."""
    import os
    import subprocess
    import sys

    from test_distributed import _free_port

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "selfsup", *_args("simclr", tiny_fmnist, out, *FAST, "epochs=4", "train.budget=20s",
                                   "train.device=cpu")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    retimed, b = s["budget"]["retimed"], s["budget"]
    start = 0 if abs(b["first_epoch_step_seconds"] - b["step_seconds"]) <= 0.1 * b["step_seconds"] else 4  # an epoch: 256 images / 64
    assert s["processes"] == 2 and retimed["at_step"] == retime_step(20, s["budget"]["step_seconds"], start,
                                                                     retimed["trial_steps"])
    assert s["steps"] == s["budget"]["steps"]  # the run trained the length the re-timing chose (or kept)
    assert r.stdout.count("re-timed after") == 1  # said once, by rank 0
