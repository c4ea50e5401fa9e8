"""Progressive resolution (views.min_size): the side of each step, the crops it makes, the budget it plans, and a
resumed run equal to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from test_train import _args, _resumed_equals_uninterrupted

from selfsup.cli import main
from selfsup.data.progressive import ProgressiveViews, mean_step_cost, side_at
from selfsup.data.views import RandomMaskViews, build_view_maker

FAST = ["eval=false", "train.knn_every=0", "train.online_probe=false"]


def test_side_schedule_by_hand():
    ramp = (0.5, 0.75)
    assert side_at(0.0, 16, 28, ramp) == 16 and side_at(0.5, 16, 28, ramp) == 16   # before the ramp: min_size
    assert side_at(0.75, 16, 28, ramp) == 28 and side_at(1.0, 16, 28, ramp) == 28  # after it: the full side
    assert side_at(0.625, 16, 28, ramp) == 24        # halfway: 22 px, rounded to a multiple of 4 -> 24 (round(5.5))
    assert side_at(0.55, 16, 28, ramp) == 20 and side_at(0.52, 16, 28, ramp) == 16  # 18.4 px -> 20; 16.96 -> 16
    assert side_at(0.6, 16, 28, ramp, multiple=1) == 21  # 16 + 12 x 0.4 = 20.8 -> 21
    sides = [side_at(i / 100, 20, 28) for i in range(101)]
    assert sides == sorted(sides) and set(sides) == {20, 24, 28}  # never shrinks; few distinct shapes


def test_mean_step_cost_weights_each_side_by_its_share_of_the_run():
    # a step at twice the pixels costs affinely more: half the run at 20 px, half at 28 px
    assert mean_step_cost(20, 28, (0.5, 0.5), 4, step_full=3.0, step_min=1.0) == pytest.approx(2.0)
    assert mean_step_cost(20, 28, (0.0, 0.0), 4, step_full=3.0, step_min=1.0) == pytest.approx(3.0)
    assert mean_step_cost(20, 28, (1.0, 1.0), 4, step_full=3.0, step_min=1.0) == pytest.approx(1.0)
    # a 24 px step sits (576 - 400) / (784 - 400) of the way from the 20 px to the 28 px cost
    third = mean_step_cost(20, 28, (0.0, 1.0), 4, step_full=3.0, step_min=1.0)
    assert 1.0 < third < 3.0


def test_progressive_views_resize_only_the_global_crops():
    full = build_view_maker("multicrop", 28, [0.5], [0.25], 1, n_local=2, local_size=12)
    prog = ProgressiveViews(full, 20, ramp=(0.5, 0.75))
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 28), torch.linspace(0, 3, 28), indexing="ij")
    smooth = 127.5 + 100 * torch.sin(xx + yy * torch.arange(1, 7).view(6, 1, 1, 1) / 3)  # resizing keeps it
    x = smooth.round().to(torch.uint8)
    early = prog.at(0.1)(x, torch.Generator().manual_seed(0))
    late = prog.at(0.9)(x, torch.Generator().manual_seed(0))
    assert [tuple(c.shape[-2:]) for c in early.crops] == [(20, 20)] * 2 + [(12, 12)] * 2
    assert [tuple(c.shape[-2:]) for c in late.crops] == [(28, 28)] * 2 + [(12, 12)] * 2
    assert prog.at(0.95) is full and prog.at(0.0) is prog.at(0.2)  # the full maker itself; one copy per side
    # the same random draws: a 20 px crop is the 28 px crop's box resampled, so the two agree after resizing
    small = torch.nn.functional.interpolate(late.crops[0], size=(20, 20), mode="bilinear", antialias=True)
    assert (small - early.crops[0]).abs().mean() < 0.05 * late.crops[0].abs().mean()


def test_progressive_views_refuse_what_cannot_shrink():
    full = build_view_maker("simclr", 28, [0.5], [0.25], 1)
    with pytest.raises(ValueError, match="min_size=32 must be in"):
        ProgressiveViews(full, 32)
    with pytest.raises(ValueError, match="size_ramp"):
        ProgressiveViews(full, 20, ramp=(0.9, 0.5))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        ProgressiveViews(full, 18, multiple=4)
    with pytest.raises(ValueError, match="masks or pretext labels.*views.min_size=0"):
        ProgressiveViews(RandomMaskViews(full, 49, 0.75), 20)


def test_a_progressive_run_announces_each_side_and_resumes_exactly(tiny_fmnist, tmp_path, capsys):
    """2 epochs of 4 steps with the ramp over the middle of the run: 8 px, then 12, then 16; a run stopped at step 3
    and resumed ends with the uninterrupted run's weights."""
    extra = ("views.min_size=8", "views.size_ramp=[0.25,0.75]", *FAST)
    out = tmp_path / "run"
    assert main(_args("simclr", tiny_fmnist, out, *extra)) == 0
    log = capsys.readouterr().out
    announced = [ln.split("global crops ")[1].split(" px")[0] for ln in log.splitlines() if "global crops" in ln]
    assert announced == ["8", "12", "16"], log
    _resumed_equals_uninterrupted("simclr", tiny_fmnist, tmp_path, *extra, stop=3)


def test_progressive_runs_with_a_budget_timed_at_both_sides(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args("simclr", tiny_fmnist, out, "views.min_size=8", "train.budget=3s", *FAST)) == 0
    log = capsys.readouterr().out
    assert "at 8 px and" in log and "at 16 px here" in log and "on average over the run's resolution schedule" in log


def test_progressive_refuses_a_masked_method_before_writing_anything(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_args("mae", tiny_fmnist, out, "model.backbone=vit_tiny", "views.min_size=8", *FAST))
    assert code == 2 and "views.min_size=0" in capsys.readouterr().err and not out.exists()
