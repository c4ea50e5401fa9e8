"""A training-time budget: ``train.budget=10m`` chooses the run's length from this machine's measured speed.

The same recipe takes 9 minutes of training on one CPU and 14 on another; a user asks for "the best model in 10
minutes", not "12 epochs". With ``train.budget`` set, a fresh run times a few full training steps on a throwaway
copy of the method (its own optimizer, the run's batch, device, precision and accumulation; the global random state
is put back, so the run itself is the one ``train.steps=N`` would give), then trains

    N = max(steps per epoch, floor(budget x (1 - MARGIN) / step seconds))

optimizer steps (``train.steps``; ``epochs`` becomes the epochs they start, the last one cut where N ends), so the
whole schedule (warm-up, cosine decay, EMA and temperature schedules, all defined over the run's length) completes
within the budget; the warm-up keeps its share of the run (``optim.warmup_epochs`` x the epochs N makes / the
recipe's epochs). The steps are timed twice, as a first epoch's and as a later epoch's, for the methods whose first
epoch differs (DeepCluster-v2's fills its banks without gradients): the first epoch is then budgeted at its own
step time. The budget covers training, not the final evaluation. ``MARGIN`` leaves room for what the timed steps
do not include: the kNN monitor, checkpoints, the first step's start-up. Several processes time their own steps and
take the slowest (no gradient all-reduce is timed: on a fast interconnect it is small beside the step; on a slow
one, lower the budget). The choice is printed, written to ``config.yaml`` (``train.steps``, ``epochs``) and to
``summary.json`` (``budget``), and a resume keeps it (nothing is re-timed).

The trial can misjudge the run: it is timed once, at start-up, when another run starting beside it on the same cores
(or a cold cache) makes it slower or faster than the steps that follow. So the run re-times itself once from its
own steps: after about ``RETIME_SECONDS`` of training (at most 5% of the budget; the step is fixed from the trial,
the same on every process), the wall-clock seconds of its real steps (after the first two, whose start-up is not a
step's cost; logging, epoch-end monitors and checkpoints included where they fell) set the steps that fit the rest
of the budget (``refit_steps``). The run's length, its warm-up share and ``config.yaml`` follow the new choice when
it differs by more than ``RETIME_TOLERANCE``; the schedule already passed stays as it was, and the warm-up's slope
changes where it is re-timed. Where the trial timed a first epoch's step other than a later one's (DeepCluster-v2's
bank fill), the steps timed are the second epoch's. Not re-timed: a run whose re-timing step falls past a quarter of
it, and progressive resolution (its early steps are not the run's mean).
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time

import torch

MARGIN = 0.05
RETIME_SECONDS = 60.0  # the real training after which the run re-times itself (at most 5% of the budget)
RETIME_TOLERANCE = 0.02  # a re-timed length within 2% of the trial's keeps the trial's
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: str | float | int) -> float:
    """``"10m"``, ``"90s"``, ``"1.5h"``, ``"600"`` (seconds) -> seconds (> 0); ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*", str(text))
        if m is None:
            raise ValueError(f"not a duration: {text!r} (write e.g. 10m, 90s, 1.5h, or seconds)")
        seconds = float(m[1]) * _UNITS[m[2] or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a budget must be a positive duration, got {text!r}")
    return seconds


def choose_steps(budget_seconds: float, step_seconds: float, steps_per_epoch: int, margin: float = MARGIN,
                 first_step_seconds: float | None = None) -> int:
    """The most optimizer steps that fit in ``budget_seconds * (1 - margin)``, and at least one epoch's.
    ``first_step_seconds``: a first epoch's step when it differs from the others' (DeepCluster-v2's first epoch only
    fills its memory banks), so that ``first x steps per epoch + (steps - steps per epoch) x step`` fits."""
    first = step_seconds if first_step_seconds is None else first_step_seconds
    if step_seconds <= 0 or first <= 0 or steps_per_epoch < 1:
        raise ValueError(f"step seconds must be > 0 and steps_per_epoch >= 1, got {step_seconds}, {first}, "
                         f"{steps_per_epoch}")
    left = budget_seconds * (1 - margin) - first * steps_per_epoch
    return steps_per_epoch + max(0, math.floor(left / step_seconds))


def retime_step(budget_seconds: float, step_seconds: float, start_step: int, steps: int) -> int | None:
    """The step after which a budgeted run starting at ``start_step`` re-times itself from its own steps: about
    ``RETIME_SECONDS`` (at most 5% of the budget) of steps at the trial's ``step_seconds``, and at least 10 (8 timed);
    None when that step is past a quarter of the run's ``steps`` (too short to gain from it)."""
    after = max(10, math.ceil(min(RETIME_SECONDS, 0.05 * budget_seconds) / step_seconds))
    return start_step + after if start_step + after <= steps // 4 else None


def refit_steps(budget_seconds: float, elapsed_seconds: float, steps_done: int, step_seconds: float,
                steps_per_epoch: int, margin: float = MARGIN) -> int:
    """The run's new length after ``steps_done`` steps in ``elapsed_seconds``, stepping at ``step_seconds``: the steps
    done plus those that fit the rest of ``budget_seconds * (1 - margin)``, and at least one epoch (as
    ``choose_steps``) and one step more than done."""
    if step_seconds <= 0 or steps_per_epoch < 1 or steps_done < 0:
        raise ValueError(f"step seconds must be > 0, steps_per_epoch >= 1 and steps_done >= 0, got {step_seconds}, "
                         f"{steps_per_epoch}, {steps_done}")
    left = budget_seconds * (1 - margin) - elapsed_seconds
    return max(steps_per_epoch, steps_done + 1, steps_done + math.floor(max(left, 0.0) / step_seconds))


def time_training_step(raw, cfg, images: torch.Tensor, labels: torch.Tensor | None, device: torch.device, amp,
                       channels_last: bool, steps: int = 4, warmup: int = 2, view_maker=None,
                       epoch: int = 1) -> float:
    """Median seconds of one full training step (views, forward, backward, optimizer step, ``on_step_end``) of a
    deep copy of ``raw`` on ``images`` (this process's share of a batch), leaving ``raw``, its optimizer and the
    global random state as they were. ``view_maker``: another view maker than ``raw``'s (smaller crops). ``epoch``:
    the epoch the steps claim to be in (their ``Progress``; trial epochs have 100 steps): 1, a steady step, by
    default; 0 for a first epoch that differs (a frozen last layer, a bank-filling pass)."""
    from selfsup.contract import Progress
    from selfsup.optim import build_optimizer
    from selfsup.train import train_step

    trial = copy.deepcopy(raw)
    groups = trial.param_groups(cfg.optim.weight_decay, cfg.optim.no_decay_lr_scale)
    optimizer = build_optimizer(cfg.optim.name, trial, 1e-6, cfg.optim.weight_decay, cfg.optim.momentum,
                                betas=tuple(cfg.optim.betas), groups=groups)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 0x5EED)
    index = torch.arange(images.shape[0])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(warmup + steps):
            progress = Progress(100 * epoch + i, 1000, 100)
            sync()
            t0 = time.perf_counter()
            train_step(trial, trial, optimizer, None, images, labels, gen, cfg.train.accumulate, device, amp,
                       channels_last, progress, index=index, view_maker=view_maker)
            trial.on_step_end(progress.after())
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    del trial, optimizer
    return statistics.median(times)
