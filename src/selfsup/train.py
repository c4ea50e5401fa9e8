"""The one training loop. It never knows which method it runs (DESIGN.md §2, contract in `selfsup.contract`):

    uint8 batch -> device -> method.view_maker -> method(views, progress) -> loss -> backward
      -> method.before_optimizer_step -> clip -> optimizer -> method.on_step_end -> logs

Exact resume: the data order depends only on (seed, epoch) and every random draw of a step (views, dropout) comes from
generators re-seeded from (seed, rank, step), so a checkpoint needs no RNG state and a resumed run retraces the
uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup import __version__
from selfsup import distributed as du
from selfsup.budget import (
    RETIME_TOLERANCE,
    choose_steps,
    parse_budget,
    refit_steps,
    retime_step,
    time_training_step,
)
from selfsup.checks import check_fsdp, check_processes
from selfsup.compiled import compile_networks, networks
from selfsup.config import Config, ConfigError
from selfsup.contract import Method, Progress
from selfsup.data.datasets import ImageDataset
from selfsup.data.progressive import MULTIPLE as PROGRESSIVE_MULTIPLE
from selfsup.data.progressive import ProgressiveViews, mean_step_cost
from selfsup.data.types import DataError, DataInfo
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify
from selfsup.evaluate.probe import OnlineLinearProbe
from selfsup.fsdp import full_states, load_full_states, local, shard
from selfsup.loggers import Logger
from selfsup.monitor import CollapseError, CollapseMonitor
from selfsup.nn.backbones import export_backbone
from selfsup.nn.sync_bn import desynchronize_batchnorm, synchronize_batchnorm
from selfsup.optim import build_optimizer, scaled_lr, set_lr, set_weight_decay, warmup_cosine
from selfsup.runs import CHECKPOINT, CHECKPOINT_FORMAT, build_method, load_method_state
from selfsup.runtime import (
    atomic_write_bytes,
    autocast,
    autocast_dtype,
    bf16_hint,
    cpu_model,
    remove_stale_temp_files,
    save_json,
    select_device,
)

_OTHER_STREAM = 0x2545F491  # XORed into the step seed for the global RNG (dropout, drop-path): not the views' stream


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The 32-bit seed of one step's random draws (views, masks) on one process.

    PyTorch's CPU generator keeps only the low 32 bits of a seed (its mt19937 is seeded from a uint32), so the seed
    and the rank are mixed into those bits: the step XOR a multiplicative hash of (seed, rank). Distinct steps of one
    process always get distinct seeds; processes and seeds get different ones. The hash of (0, 0) is 0, so a
    single-process run with seed 0 draws what it drew before this function was fixed (it once put seed and rank
    above bit 32, where the CPU generator dropped them: every process and every seed drew the same views).
    """
    mix = ((seed * 0x9E3779B1) ^ (rank * 0x85EBCA77)) & 0xFFFFFFFF
    return (step & 0xFFFFFFFF) ^ mix


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))


def state_is_finite(module: torch.nn.Module) -> bool:
    """True when every floating parameter and buffer of ``module`` (weights, BN statistics, EMA teachers, queues,
    centers) is finite. One pass over the state: run at checkpoints, exports and after a skipped step, not per step."""
    tensors = [local(t) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_checkpoint(path: Path, method, optimizer, probe, step: int, cfg: Config, world_size: int,
                    segments: list[dict], log_window: list[float] | None = None,
                    data_fingerprint: str | None = None, states: tuple[dict, dict] | None = None) -> None:
    """`segments`: one record per training session of the run (steps, seconds, images), so a resumed run's
    summary covers its whole training time. `log_window`: the losses of the steps since the last metrics record, so
    the first record after a resume averages the same steps as the uninterrupted run's. `data_fingerprint`: the
    training images' digest (image folders), which a resume compares with the folder it reads. `states`: the
    method's and the optimizer's full state dicts when they were gathered from shards (``train.fsdp``;
    :func:`selfsup.fsdp.full_states`).

    A state holding NaN or Inf is never written (FloatingPointError): the previous checkpoint stays the last good one.
    """
    if not state_is_finite(method):
        raise FloatingPointError(f"refusing to write {path} at step {step}: the model's weights or buffers hold NaN or "
                                 f"Inf. The previous checkpoint there (if any) is the last good one.")
    method_state, optimizer_state = states or (method.state_dict(), optimizer.state_dict())
    state = {"method": method_state, "optimizer": optimizer_state,
             "probe": probe.state_dict() if probe is not None else None,
             "step": step, "config": cfg.to_dict(), "world_size": world_size, "segments": segments,
             "log_window": list(log_window or []), "data_fingerprint": data_fingerprint,
             "format": CHECKPOINT_FORMAT, "selfsup": __version__}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


@dataclass
class StepResult:
    """What one optimizer step did. ``applied`` is False when the loss or a gradient was NaN/Inf on any process:
    then no weight, optimizer state, method state (EMA teacher, queue, center) or online probe changed."""

    loss: float
    scalars: dict
    probe_logs: dict
    applied: bool = True
    embedding: torch.Tensor | None = None  # the last micro-batch's embedding (detached), for the collapse monitor


def grads_finite(module: torch.nn.Module) -> bool:
    """True when every gradient of ``module`` is finite: one sum per tensor (NaN and Inf propagate through it) and a
    single host sync, a few milliseconds for a ResNet-18 on one CPU thread."""
    sums = [local(p.grad).detach().sum(dtype=torch.float32) for p in module.parameters() if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def norm_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics batch-norm layers update during a forward pass (mean, variance, batch count): the
    state a training step changes besides what the optimizer and the method's ``on_step_end`` change."""
    return [t for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def train_step(model, raw, optimizer, probe, x, y, gen, accum: int, device, amp, channels_last: bool,
               progress: Progress, clip_grad: float = 0.0, index: torch.Tensor | None = None,
               view_maker=None) -> StepResult:
    """One optimizer step on this process's uint8 images `x` (labels `y` or None; `index`, their rows in the training
    set), in `accum` micro-batches; the views carry each micro-batch's labels and rows (``Views.labels/.index``).
    `view_maker` replaces ``raw.view_maker`` for this step (progressive resolution's smaller crops).

    `model` is `raw` or its DDP wrapper; gradients are synchronized only on the last micro-batch. When the loss and
    every gradient are finite on every process: `raw.before_optimizer_step(progress)`, gradient clipping to a global
    norm of `clip_grad` (0: off), the optimizer step and the online probe's steps. Otherwise the gradients are dropped
    and nothing is updated (``StepResult.applied`` False; the batch-norm statistics the forward pass moved are put
    back); the caller skips `raw.on_step_end` too.
    """
    micro = x.shape[0] // accum
    loss_sum, extra, probe_batches = 0.0, {}, []
    statistics = norm_statistics(raw)
    before = [t.clone() for t in statistics]  # the forward pass updates them: a skipped step puts them back
    for m in range(accum):
        xm = x[m * micro:(m + 1) * micro].to(device, non_blocking=True)
        views = (view_maker or raw.view_maker)(xm, gen)
        part = slice(m * micro, (m + 1) * micro)
        views = dataclasses.replace(views, labels=None if y is None else y[part].to(device, non_blocking=True),
                                    index=None if index is None else index[part].to(device, non_blocking=True))
        if channels_last:
            views = views.map_crops(  # image batches only: other modalities' inputs pass through as they are
                lambda c: c.contiguous(memory_format=torch.channels_last) if c.ndim == 4 else c)
        sync = model.no_sync() if m < accum - 1 and isinstance(model, DDP) else contextlib.nullcontext()
        with sync, autocast(device, amp):
            out = model(views, progress)
        (out["loss"] / accum).backward()
        loss_sum += out["loss"].item() / accum
        extra = {k: float(v) for k, v in out.items() if k not in ("loss", "features", "embedding")}
        embedding = out.get("embedding", out["features"]).detach()
        if probe is not None and y is not None:
            probe_batches.append((out["features"].detach().float(), y[part].to(device)))
    bad = torch.tensor(float(not (math.isfinite(loss_sum) and grads_finite(raw))), device=device)
    if not bool(du.all_reduce_sum_(bad)):  # every process takes the same decision (DDP's gradients are the mean)
        raw.before_optimizer_step(progress)
        if clip_grad > 0:
            extra["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), clip_grad))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if bool(bad):
        with torch.no_grad():
            for t, saved in zip(statistics, before):
                t.copy_(saved)
        return StepResult(loss_sum, extra, {}, applied=False)
    probe_logs = {}
    for features, labels in probe_batches:
        probe_logs = probe.step(features, labels)
    return StepResult(loss_sum, extra, probe_logs, embedding=embedding)


def step_rows(order: torch.Tensor, step_in_epoch: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The training-set rows process ``rank`` of ``world`` reads at a step: its consecutive slice of the step's
    global batch, which depends only on the seed and the epoch (``order``). Every process count therefore reads the
    same images at the same step, in the same order when the slices are put end to end: what lets a run resume on
    another number of processes."""
    batch = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
    per_process = batch_size // world
    return batch[rank * per_process:(rank + 1) * per_process]


def process_count_change(before: int, now: int, batch_size: int, accumulate: int) -> str:
    """What a resume on another number of processes keeps and what it changes, for the log."""
    return (f"selfsup: the checkpoint was written by {before} process(es); resuming on {now}. The effective batch "
            f"stays {batch_size} (now {batch_size // (now * accumulate)} per process x {now} process(es) x "
            f"{accumulate} micro-batch(es), was {batch_size // (before * accumulate)} x {before} x {accumulate}) and "
            "every step reads the same images in the same order (the global batch is fixed by the seed and the "
            "epoch; each process takes a consecutive slice of it); synchronized batch norm and the batch-statistic "
            "losses see the whole batch either way (MoCo v2's per-process shuffled key encoder excepted). The "
            f"random augmentations of the remaining steps differ from a run that stayed on {before} process(es): "
            "each process draws its own.")


def use_deterministic_kernels() -> None:
    """Ask PyTorch for deterministic kernels everywhere (``train.deterministic=true``).

    On the CPU selfsup's runs are already reproducible (data order from (seed, epoch), every random draw from
    (seed, rank, step): a resumed run equals an uninterrupted one bit for bit); on CUDA some kernels (scatter-adds,
    cuDNN's autotuned convolutions, cuBLAS's split reductions) are not, so this switches cuDNN to deterministic
    algorithms without autotuning and cuBLAS to a fixed workspace (must be set before CUDA starts; the process's own
    value wins). A kernel with no deterministic version then raises instead of silently differing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before preempting or at its time limit


class Preempted(Exception):
    """A preemption signal arrived: the run wrote a checkpoint at the next step boundary and stopped.

    The CLI exits with :attr:`EXIT_CODE` (75, BSD's EX_TEMPFAIL: "try again later"), which a job script turns into a
    requeue (docs/reliability.md); ``resume=auto`` then continues from that step.
    """

    EXIT_CODE = 75

    def __init__(self, step: int, signal_name: str, run_dir: Path, cfg: Config):
        self.step = step
        super().__init__(f"{signal_name} received: stopped at step {step} with a checkpoint written. Continue with: "
                         f"selfsup train {cfg.method} resume=auto out={run_dir}")


@contextlib.contextmanager
def catch_preemption():
    """Record SIGTERM/SIGUSR1 instead of dying, so the loop can checkpoint at a step boundary; yields the list of
    signal names received. A second identical signal acts as it would have without selfsup (SIGTERM kills at
    once). Outside the main thread (where Python cannot install handlers) nothing is caught."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in PREEMPT_SIGNALS}

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        signal.signal(signum, previous[signum])

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _any_process(flag: bool, device) -> bool:
    """True when ``flag`` is true on any process (every process stops at the same step)."""
    if du.get_world_size() == 1:
        return flag
    return bool(du.all_reduce_sum_(torch.tensor(float(flag), device=device)))


def _mean_over_processes(losses: list[float], device) -> float | None:
    """The mean loss of the window over every process (rank 0's alone would be a sample of 1/world of the batch);
    None when every step of the window was skipped."""
    local = sum(losses) / len(losses) if losses else 0.0
    if du.get_world_size() > 1:
        local = float(du.all_reduce_mean(torch.tensor(local, dtype=torch.float64, device=device)))
    return local if losses else None


def _after_nonfinite_step(raw, step: int, loss: float, in_row: int, cfg: Config, last_good, run_dir: Path,
                          say) -> None:
    """A step was skipped for a NaN/Inf loss or gradient: warn, or stop the run (FloatingPointError) when the model
    state itself is no longer finite (a forward pass can write NaN into batch-norm statistics or a method's buffers)
    or when ``train.nonfinite_limit`` steps in a row were skipped."""
    where = (f"The last good checkpoint is {last_good[1]} (step {last_good[0]}): continue from it with "
             f"`selfsup train {cfg.method} resume=auto out={run_dir}` after lowering optim.base_lr, using "
             "train.precision=fp32 or checking the data." if last_good else
             "No checkpoint was written yet: start again with a lower optim.base_lr or train.precision=fp32.")
    if not _all_finite_everywhere(raw):
        raise FloatingPointError(f"step {step}: the loss or gradients were not finite and the forward pass left NaN/Inf "
                                 f"in the model's state (batch-norm statistics or a method's buffers), which "
                                 f"skipping the step cannot undo. {where}")
    if in_row >= cfg.train.nonfinite_limit:
        raise FloatingPointError(f"the loss or gradients were not finite in {in_row} steps in a row (the last: step "
                                 f"{step}, loss {loss}); each was skipped, train.nonfinite_limit="
                                 f"{cfg.train.nonfinite_limit} stops the run. {where}")
    say(f"selfsup: step {step}: the loss ({loss}) or a gradient is not finite: step skipped, no weight or state "
        f"changed ({in_row} in a row; train.nonfinite_limit={cfg.train.nonfinite_limit} stops the run)")


def _on_collapse(evidence: str | None, step: int, cfg: Config, segment: dict, checkpoint, run_dir: Path, say,
                 device) -> None:
    """Record a collapse seen by the monitor (in the run's segments, so the summary and the report show it) and
    warn once per epoch, or, with ``train.collapse=stop``, write a checkpoint and stop (:class:`CollapseError`)."""
    if not _any_process(evidence is not None, device):  # every process stops at the same step
        return
    evidence = evidence or "the monitor of another process saw a collapse"
    warnings = segment.setdefault("collapse_warnings", [])
    warnings.append({"step": step, "evidence": evidence})
    advice = ("complete collapse: every image gets about the same embedding, and no method recovers from it. Check "
              "the learning rate and weight decay, the method's anti-collapse parts (predictor, EMA teacher, variance "
              "or entropy terms, negatives) and the augmentations (cookbook §2.6.2, §3.4)")
    if cfg.train.collapse == "stop":
        checkpoint()
        raise CollapseError(f"step {step}: {evidence}. This is a {advice}. train.collapse=stop ended the run; "
                            f"its last checkpoint is in {run_dir}/{CHECKPOINT}.")
    if len(warnings) == 1 or warnings[-2]["step"] // 1000 != step // 1000:  # not every record of a collapsed run
        say(f"selfsup: WARNING step {step}: {evidence}: a {advice}. (train.collapse=stop ends such a run.)")


def _progressive_views(cfg: Config, raw) -> ProgressiveViews | None:
    """``views.min_size``: the view maker of each step (selfsup.data.progressive); ConfigError for what cannot run."""
    if not cfg.views.min_size:
        return None
    encoder = raw.exports()["backbone"]
    if hasattr(getattr(encoder, "model", None), "patch_embed"):
        raise ConfigError(f"views.min_size={cfg.views.min_size}: the timm transformer {cfg.model.backbone} takes one "
                          f"input size; progressive resolution needs a ResNet, the package's ViT (vit_tiny ...) or a "
                          f"timm ConvNet. Set views.min_size=0.")
    try:  # the package's ViT interpolates its position embedding to a smaller grid of whole patches
        return ProgressiveViews(raw.view_maker, cfg.views.min_size, tuple(cfg.views.size_ramp),
                                getattr(encoder, "patch_size", PROGRESSIVE_MULTIPLE))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_length(cfg: Config, steps_per_epoch: int) -> int:
    """The run's optimizer steps, which the schedule spans: ``train.steps`` (a budget's choice), else
    ``epochs`` x steps per epoch."""
    return cfg.train.steps if cfg.train.steps > 0 else cfg.epochs * steps_per_epoch


def _fit_budget(cfg: Config, raw, train_data: ImageDataset, device, amp, channels_last: bool, micro_bs: int,
                steps_per_epoch: int, dist, say, progressive: ProgressiveViews | None = None) -> dict:
    """``train.budget``: time this machine's training step, set ``cfg.epochs`` to what fits (selfsup.budget). With
    progressive resolution the step is timed at both sides and the run's mean step time budgeted."""
    seconds = parse_budget(cfg.train.budget)
    n = micro_bs * cfg.train.accumulate
    labels = None if train_data.labels is None else train_data.labels[:n]
    step_s = step_full = time_training_step(raw, cfg, train_data.images[:n], labels, device, amp, channels_last)
    step_first = None  # a first epoch's step: timed apart where it may differ (not with progressive resolution)
    if progressive is None:
        step_first = time_training_step(raw, cfg, train_data.images[:n], labels, device, amp, channels_last, epoch=0)
    else:
        p = progressive
        step_min = time_training_step(raw, cfg, train_data.images[:n], labels, device, amp, channels_last,
                                      view_maker=p.at(0.0))
        step_s = mean_step_cost(p.min_size, p.size, p.ramp, p.multiple, step_full, step_min)
    if dist.enabled:  # every process must train the same number of steps: the slowest decides
        slowest = torch.tensor([step_s, step_first or 0.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        step_s, step_first = float(slowest[0]), (None if step_first is None else float(slowest[1]))
    steps = choose_steps(seconds, step_s, steps_per_epoch, first_step_seconds=step_first)
    before, cfg.train.steps, cfg.epochs = cfg.epochs, steps, math.ceil(steps / steps_per_epoch)
    # the schedule keeps its shape: the warm-up stays the same fraction of the run (1 of 12 epochs -> 1/12 of N)
    warmup_before = cfg.optim.warmup_epochs
    cfg.optim.warmup_epochs = round(warmup_before * steps / steps_per_epoch / before, 6)
    first = step_s if step_first is None else step_first
    planned = first * steps_per_epoch + (steps - steps_per_epoch) * step_s
    timing = f"a training step takes {step_s * 1e3:.0f} ms here (median of 4 timed on a copy)"
    if step_first is not None and abs(step_first - step_s) > 0.1 * step_s:  # worth saying: the first epoch differs
        timing += f", a first epoch's {step_first * 1e3:.0f} ms"
    if progressive is not None:
        timing = (f"a training step takes {step_min * 1e3:.0f} ms at {progressive.min_size} px and {step_full * 1e3:.0f} "
                  f"ms at {progressive.size} px here (median of 4 timed on a copy; {step_s * 1e3:.0f} ms on average "
                  f"over the run's resolution schedule)")
    if planned > seconds:
        say(f"selfsup: WARNING train.budget={cfg.train.budget}: {timing}, so one epoch ({planned / 60:.1f} min) does "
            "not fit; training 1 epoch. Lower batch_size, the model's size or the data, or raise the budget.")
    else:
        say(f"selfsup: train.budget={cfg.train.budget}: {timing}; {steps} steps ({steps / steps_per_epoch:.2f} "
            f"epochs of {steps_per_epoch} steps) = {planned / 60:.1f} min of training fit it (the recipe said {before} "
            f"epochs; warm-up {warmup_before:g} -> {cfg.optim.warmup_epochs:.3g} epochs, the same share of the run)")
    return {"budget": cfg.train.budget, "seconds": seconds, "step_seconds": round(step_s, 5),
            "first_epoch_step_seconds": round(first, 5), "steps": steps, "epochs": round(steps / steps_per_epoch, 4),
            "recipe_epochs": before, "recipe_warmup_epochs": warmup_before, "warmup_epochs": cfg.optim.warmup_epochs,
            "planned_seconds": round(planned, 1)}


def _retime_at(budget: dict | None, progressive, total_steps: int, steps_per_epoch: int) -> tuple[int, int] | None:
    """``(first timed step, step)``: the steps of a fresh budgeted run timed to re-time it (selfsup.budget), the
    first two of their epoch left out; None when it is not re-timed."""
    if budget is None or progressive is not None:
        return None
    start = 0  # where the trial timed a first epoch's step unlike a later one's, time the second epoch's
    if abs(budget["first_epoch_step_seconds"] - budget["step_seconds"]) > 0.1 * budget["step_seconds"]:
        start = steps_per_epoch
    at = retime_step(budget["seconds"], budget["step_seconds"], start, total_steps)
    return None if at is None else (start + 2, at)


def _refit_budget(cfg: Config, budget: dict, step: int, step_s: float, elapsed: float, steps_per_epoch: int,
                  total_steps: int, dist, device, say) -> int | None:
    """Re-time a budgeted run from its own steps (selfsup.budget): the new length, with ``cfg`` and ``budget`` set to
    it, or None when it stays within RETIME_TOLERANCE of ``total_steps``. The slowest process decides."""
    if dist.enabled:
        slowest = torch.tensor([step_s, elapsed], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        step_s, elapsed = float(slowest[0]), float(slowest[1])
    new = refit_steps(budget["seconds"], elapsed, step, step_s, steps_per_epoch)
    budget["retimed"] = {"at_step": step, "step_seconds": round(step_s, 5), "elapsed_seconds": round(elapsed, 1),
                         "trial_steps": total_steps}
    timing = (f"selfsup: train.budget={cfg.train.budget}: re-timed after {step} steps: {step_s * 1e3:.0f} ms a step "
              f"in this run (the trial: {budget['step_seconds'] * 1e3:.0f} ms)")
    if abs(new - total_steps) <= RETIME_TOLERANCE * total_steps:
        say(f"{timing}; the {total_steps} steps stay")
        return None
    cfg.train.steps, cfg.epochs = new, math.ceil(new / steps_per_epoch)
    cfg.optim.warmup_epochs = round(budget["recipe_warmup_epochs"] * new / steps_per_epoch / budget["recipe_epochs"], 6)
    budget.update(steps=new, epochs=round(new / steps_per_epoch, 4), warmup_epochs=cfg.optim.warmup_epochs,
                  planned_seconds=round(elapsed + (new - step) * step_s, 1))
    say(f"{timing}; {new} steps ({new / steps_per_epoch:.2f} epochs) fit the budget instead of {total_steps} (warm-up "
        f"{cfg.optim.warmup_epochs:.3g} epochs, the same share of the run)")
    return new


def _write_config(run_dir: Path, cfg: Config, raw) -> None:
    """``config.yaml``: the run's whole config and its resolved views, written atomically (a resume may need it)."""
    text = yaml.safe_dump({**cfg.to_dict(), "resolved_views": raw.view_maker.describe()}, sort_keys=False)
    atomic_write_bytes(run_dir / "config.yaml", lambda f: f.write(text.encode()))


def _all_finite_everywhere(raw) -> bool:
    flag = torch.tensor(float(not state_is_finite(raw)), device=next(raw.parameters()).device)
    return not bool(du.all_reduce_sum_(flag))


@dataclass
class Trained:
    """What training leaves for evaluation: the run's summary, the online probe, the device it ran on and the
    trained method to evaluate (an unsharded copy after ``train.fsdp``; None on processes other than rank 0)."""

    summary: dict
    probe: OnlineLinearProbe | None
    device: torch.device
    method: Method | None = None


def train(cfg: Config, method: Method, train_data: ImageDataset, test_data: ImageDataset | None = None, *,
          data: DataInfo, state: dict | None = None) -> Trained:
    """Train a built ``method`` on ``train_data`` under ``cfg`` (optimizer, schedule, steps, logging, checkpoints).

    The trainer knows the method only through :mod:`selfsup.contract`; :func:`selfsup.pipeline.pretrain` builds it
    from ``data`` (the :class:`DataInfo` it was built from, whose normalization the export records) and evaluates it
    afterwards. ``state``: a checkpoint to continue from (:func:`selfsup.runs.resume_state`). On every process but
    rank 0 the summary is empty.
    """
    device = select_device(cfg.train.device)
    dist = du.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        use_deterministic_kernels()
    if cfg.out is None:  # every process must agree on the name: rank 0 picks it
        name = [f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if dist.enabled:
            torch.distributed.broadcast_object_list(name, src=0)
        cfg.out = name[0]
    run_dir = Path(cfg.out)
    say = print if dist.is_main else (lambda *a, **k: None)

    labels = train_data.labels
    C, H, W = train_data.image_shape
    mean, std = data.mean, data.std

    world, accum = dist.world_size, cfg.train.accumulate
    # the CLI checked both before any work (selfsup.checks); Python callers are checked here
    check_processes(cfg, world)
    check_fsdp(cfg, world, device.type)
    micro_bs = cfg.batch_size // (world * accum)
    steps_per_epoch = len(train_data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(train_data)} images, fewer than batch_size={cfg.batch_size}; "
                         "lower batch_size")
    total_steps = run_length(cfg, steps_per_epoch)
    stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps

    ckpt_path = run_dir / CHECKPOINT
    if state is None and ckpt_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run (checkpoints/last.pt). Continue it with "
                              f"resume=auto out={run_dir}, or choose another out=DIR.")
    if state is not None and state.get("data_fingerprint") not in (None, train_data.fingerprint):
        raise DataError(f"the training images of {train_data.name} changed since the run in {run_dir} started (files "
                        "added, removed, renamed or rewritten): resuming would train the rest of the run on other "
                        "images. Restore the folder as it was, or start a new run with another out=DIR.")
    raw = method.to(device)
    progressive = _progressive_views(cfg, raw)  # None unless views.min_size: refused before anything is written
    amp = autocast_dtype(cfg.train.precision, device)
    channels_last = cfg.train.channels_last == "true" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temp_files(ckpt_path.parent, ckpt_path.name)  # left by a kill during a write
        if stale:
            say(f"selfsup: removed {len(stale)} partial checkpoint file(s) left by an interrupted write: "
                f"{', '.join(p.name for p in stale)}")
        _write_config(run_dir, cfg, raw)
        if train_data.skipped:
            _report_skipped(train_data, run_dir, say)
        if not (run_dir / "init").exists():  # the untrained network, for the knn_top1_init baseline
            export_backbone(raw.exports()["backbone"], run_dir / "init", extra={"mean": list(mean), "std": list(std)})

    lr = scaled_lr(cfg.optim.base_lr, cfg.batch_size, cfg.optim.lr_rule)
    say(f"selfsup: {cfg.method} ({cfg.recipe}) on {train_data.name}: {len(train_data)} images {C}x{H}x{W}, "
        f"{'labels' if labels is not None else 'no labels'}; device {device}, {world} process(es), "
        f"precision {amp or 'fp32'}")
    hint = bf16_hint(cfg.train.precision, device)
    if hint:
        say(hint)
    say(f"selfsup: lr = {cfg.optim.base_lr} x {cfg.optim.lr_rule}(batch {cfg.batch_size}) = {lr:.4g} "
        f"({cfg.optim.name}, warmup {cfg.optim.warmup_epochs} epochs, cosine to {cfg.optim.final_lr * lr:.3g}); "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps; run dir {run_dir}"
        + (f"; biases and norms at {cfg.optim.no_decay_lr_scale:g} x lr" if cfg.optim.no_decay_lr_scale != 1 else ""))

    model = raw
    if dist.enabled:
        # batch norm over the whole batch (cookbook §3.8.1): PyTorch's SyncBatchNorm on CUDA, selfsup's
        # GlobalBatchNorm on gloo (CPU); a method's local_batchnorm modules (MoCo v2's shuffled key encoder) excepted
        raw = synchronize_batchnorm(raw, device.type)
    if cfg.train.compile:  # after the batch norms are swapped, before DDP wraps the method
        say(f"selfsup: train.compile: torch.compile on {', '.join(compile_networks(raw))} (the first steps compile)")
    fsdp = cfg.train.fsdp
    if fsdp:  # each process holds 1/world of every weight, gradient and optimizer state (selfsup.fsdp)
        say(f"selfsup: train.fsdp: {', '.join(shard(raw, networks(raw)))} and their transformer blocks sharded over "
            f"{world} processes")
    elif dist.enabled:
        # no buffer broadcasting: a method keeps its buffers (centers, queues, BN statistics) equal on every process
        # by construction (all-reduce first); re-sending rank 0's copy before each forward would hide a divergence
        # and overwrite per-step accumulators.
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    groups = raw.param_groups(cfg.optim.weight_decay, cfg.optim.no_decay_lr_scale)
    optimizer = build_optimizer(cfg.optim.name, raw, lr, cfg.optim.weight_decay, cfg.optim.momentum,
                                betas=tuple(cfg.optim.betas), groups=groups)
    encoder = raw.exports()["backbone"]  # what the online probe, the kNN monitor and the export see
    probe = None
    if labels is not None and cfg.train.online_probe:
        n_cls = train_data.num_classes or int(labels.max()) + 1
        probe = OnlineLinearProbe(encoder.num_features, n_cls, lr=cfg.train.probe_lr).to(device)

    budget = None
    if cfg.train.budget is not None and state is None:  # a resume keeps the epochs the budget chose
        budget = _fit_budget(cfg, raw, train_data, device, amp, channels_last, micro_bs, steps_per_epoch, dist, say,
                             progressive)
        total_steps = run_length(cfg, steps_per_epoch)
        stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
        if dist.is_main:
            _write_config(run_dir, cfg, raw)
    retime, retime_mark = _retime_at(budget, progressive, total_steps, steps_per_epoch), 0.0

    start_step, segments = 0, []
    if state is not None:
        # loaded to the CPU: load_state_dict copies weights onto the device and moves optimizer state next to its
        # parameters, except AdamW's scalar `step`, which must stay a CPU tensor (a CUDA one syncs every step)
        if fsdp:
            load_full_states(raw, optimizer, state["method"], state["optimizer"])
        else:
            load_method_state(raw, state, ckpt_path)
            optimizer.load_state_dict(state["optimizer"])
        if probe is not None and state["probe"] is not None:
            probe.load_state_dict(state["probe"])
        start_step, segments = state["step"], list(state.get("segments") or [])
        say(f"selfsup: resumed at step {start_step} of {total_steps}"
            + (f" (train.max_steps={cfg.train.max_steps} is reached: nothing to train; pass train.max_steps=0 or "
               "more epochs to continue)" if start_step >= stop_step and stop_step < total_steps else ""))
        if state.get("world_size", world) != world:
            say(process_count_change(state["world_size"], world, cfg.batch_size, accum))
    segment = {"start_step": start_step, "end_step": start_step, "seconds": 0.0, "step_seconds": 0.0, "images": 0,
               "processes": world, "changes": state.get("changes", {}) if state is not None else {}}
    if budget is not None:  # kept in the checkpoint with the segments: a resumed run's summary still shows it
        segment["budget"] = budget
    segments = [*segments, segment]

    logger = Logger(run_dir, dist.is_main, start_step, cfg)  # metrics.jsonl, TensorBoard, W&B (train.wandb)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps:
        say(f"selfsup: WARNING optim.warmup_epochs={cfg.optim.warmup_epochs:g} covers the whole run ({cfg.epochs} "
            f"epochs): the learning rate never reaches its peak {lr:.4g} and never decays. Lower optim.warmup_epochs "
            "(recipes warm up for about a tenth of the run) or train more epochs.")
    gen = torch.Generator(device=device)
    monitor_idx = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed))
    monitor_idx = monitor_idx[: cfg.train.knn_monitor_size]
    tty = sys.stderr.isatty() and dist.is_main
    bar = None
    if tty:
        from tqdm import tqdm

        bar = tqdm(total=stop_step, initial=start_step, unit="step", dynamic_ncols=True)

    step_time, images_seen = 0.0, 0
    window = list(state.get("log_window") or []) if state is not None else []  # losses since the last record
    last_good = (start_step, ckpt_path) if state is not None else None  # the newest checkpoint written or resumed
    bad_in_row = 0
    monitor = CollapseMonitor() if cfg.train.collapse != "off" else None
    t_loop = time.time()
    order, order_epoch = None, -1
    step = start_step
    crop_side = None  # progressive resolution: the side the log last announced

    def checkpoint() -> None:
        nonlocal last_good
        states = full_states(raw, optimizer) if fsdp else None  # collective: every process gathers
        if dist.is_main:
            save_checkpoint(ckpt_path, raw, optimizer, probe, step, cfg, world, segments, window,
                            train_data.fingerprint, states)
            last_good = (step, ckpt_path)
            if not tty:  # a log file (SLURM, nohup) says where the run can be continued from
                print(f"checkpoint: step {step} -> {ckpt_path}", flush=True)

    raw.train()
    try:
        with catch_preemption() as signals:
            while step < stop_step:
                epoch, b = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = _epoch_order(len(train_data), cfg.seed, epoch), epoch
                local = step_rows(order, b, cfg.batch_size, dist.rank, world)
                t0 = time.perf_counter()
                cur_lr = warmup_cosine(step, total_steps, warmup, lr, cfg.optim.final_lr * lr)
                set_lr(optimizer, cur_lr, peak_lr=lr)  # constant_lr groups (SimSiam's predictor) stay at lr
                if cfg.optim.weight_decay_end is not None:  # DINO's cosine weight-decay schedule, no warm-up
                    set_weight_decay(optimizer, warmup_cosine(step, total_steps, 0, cfg.optim.weight_decay,
                                                              cfg.optim.weight_decay_end))
                gen.manual_seed(_step_seed(cfg.seed, dist.rank, step))
                torch.manual_seed(_step_seed(cfg.seed, dist.rank, step) ^ _OTHER_STREAM)  # apart from the views
                x = train_data.images[local]
                y = labels[local] if labels is not None else None
                progress = Progress(step, total_steps, steps_per_epoch)
                view_maker = None
                if progressive is not None:
                    view_maker, side = progressive.at(step / total_steps), progressive.side(step / total_steps)
                    if side != crop_side:
                        say(f"selfsup: step {step}: global crops {side} px (progressive resolution)")
                        crop_side = side
                result = train_step(model, raw, optimizer, probe, x, y, gen, accum, device, amp, channels_last,
                                    progress, cfg.optim.clip_grad, index=local, view_maker=view_maker)
                if result.applied:
                    bad_in_row = 0
                    hook_logs = raw.on_step_end(progress.after()) or {}
                    window.append(result.loss)
                    if monitor is not None:
                        monitor.update(result.embedding)
                else:
                    bad_in_row += 1
                    segment["nonfinite_steps"] = segment.get("nonfinite_steps", 0) + 1
                    hook_logs = {}
                    _after_nonfinite_step(raw, step, result.loss, bad_in_row, cfg, last_good, run_dir, say)
                step += 1
                dt = time.perf_counter() - t0
                step_time += dt
                images_seen += cfg.batch_size
                segment.update(end_step=step, seconds=round(time.time() - t_loop, 3),
                               step_seconds=round(step_time, 3), images=images_seen)
                if retime is not None and step == retime[0]:  # the two steps before carry a start-up
                    retime_mark = time.perf_counter()
                elif retime is not None and step == retime[1]:  # the same step on every process
                    new = _refit_budget(cfg, budget, step, (time.perf_counter() - retime_mark) / (step - retime[0]),
                                        time.time() - t_loop, steps_per_epoch, total_steps, dist, device, say)
                    retime = None
                    if new is not None:
                        total_steps = new
                        stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
                        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
                        if dist.is_main:  # a resume reads the new length from here
                            _write_config(run_dir, cfg, raw)
                        if bar is not None:
                            bar.total = stop_step
                            bar.refresh()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4f}", lr=f"{cur_lr:.3g}",
                                    img_s=f"{cfg.batch_size / dt:.0f}")
                if step % cfg.train.log_every == 0 or step == stop_step:
                    loss = _mean_over_processes(window, device)
                    rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": cur_lr,
                           "samples_per_s": images_seen / step_time, **result.scalars, **hook_logs}
                    rec.update({f"online_probe_{k}": float(v) for k, v in result.probe_logs.items()})
                    skipped = sum(s.get("nonfinite_steps", 0) for s in segments)
                    if skipped:
                        rec["nonfinite_steps"] = skipped
                    spread = monitor.window_std() if monitor is not None else None
                    if spread is not None:
                        rec["embedding_std"] = spread
                    logger.log(rec)
                    window = []
                    if dist.is_main and not tty and step % steps_per_epoch:  # epoch ends print their own line
                        print(f"step {step}/{stop_step} epoch {step / steps_per_epoch:.2f} loss "
                              f"{'nan' if loss is None else f'{loss:.4f}'} lr {cur_lr:.4g} "
                              f"{images_seen / step_time:.0f} img/s eta "
                              f"{(stop_step - step) * step_time / max(step - start_step, 1) / 60:.1f} min", flush=True)
                    _on_collapse(CollapseMonitor.evidence(spread, None), step, cfg, segment, checkpoint, run_dir, say,
                                 device)
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and dist.is_main and not tty:
                    print(f"epoch {step // steps_per_epoch}/{cfg.epochs} step {step}/{total_steps} loss "
                          f"{result.loss:.4f} lr {cur_lr:.4g} {images_seen / step_time:.0f} img/s eta "
                          f"{(stop_step - step) * step_time / max(step - start_step, 1) / 60:.1f} min", flush=True)
                if (epoch_end and cfg.train.knn_every and test_data is not None and (dist.is_main or fsdp)
                        and (step // steps_per_epoch) % cfg.train.knn_every == 0):
                    # a sharded encoder gathers its weights from every process: all of them run the monitor
                    acc = _knn_monitor(encoder, train_data, test_data, monitor_idx, mean, std, device, amp, cfg)
                    logger.log({"step": step, "epoch": step / steps_per_epoch, "knn_top1": acc})
                    say(f"  kNN monitor (k={cfg.eval.knn_k}, {len(monitor_idx)} train images): {acc:.2f}%")
                    raw.train()
                if epoch_end and monitor is not None:
                    rank = monitor.rankme()
                    if rank is not None:
                        logger.log({"step": step, "epoch": step / steps_per_epoch, "embedding_rankme": rank})
                    _on_collapse(CollapseMonitor.evidence(None, rank), step, cfg, segment, checkpoint, run_dir, say,
                                 device)
                if epoch_end or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                    checkpoint()
                if _any_process(bool(signals), device) and step < stop_step:
                    checkpoint()
                    del model  # then the CLI destroys the group and exits with 75 (requeue), not an abort
                    du.barrier()
                    raise Preempted(step, signals[0] if signals else "a signal on another process", run_dir, cfg)
    except KeyboardInterrupt:
        checkpoint()
        if dist.is_main:
            print(f"\nselfsup: interrupted at step {step}; checkpoint saved. Continue with: "
                  f"selfsup train {cfg.method} resume=auto out={run_dir}")
        raise
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    segment["seconds"] = round(time.time() - t_loop, 3)
    states = full_states(raw, optimizer) if fsdp else None
    if fsdp and dist.is_main:  # evaluation and the export get an unsharded copy
        raw = build_method(cfg, data).to(device)
        raw.load_state_dict(states[0])
        encoder = raw.exports()["backbone"]
    elif dist.enabled and dist.is_main:
        # rank 0 evaluates alone: its batch norms use its own statistics (a synchronized one in train mode, as in
        # eval.finetune, would wait for processes that have finished)
        raw = desynchronize_batchnorm(raw)
    if dist.is_main:
        save_checkpoint(ckpt_path, raw, optimizer, probe, step, cfg, world, segments, window, train_data.fingerprint,
                        states)
        export_backbone(encoder, run_dir, extra={"method": cfg.method, "step": step,
                                              "mean": list(mean), "std": list(std)})
    del model  # DDP's reducer holds the process group: it goes before the group (selfsup.distributed.shutdown),
    gc.collect()  # and DDP sits in reference cycles, which only the collector frees
    du.barrier()
    if not dist.is_main:
        return Trained({}, probe, device)
    # every session of the run counts (time after a run's last checkpoint before a kill is not recorded anywhere)
    total_images, total_step_seconds = sum(s["images"] for s in segments), sum(s["step_seconds"] for s in segments)
    summary = {"method": cfg.method, "recipe": cfg.recipe, "dataset": train_data.name, "epochs": cfg.epochs,
               "epochs_done": step / steps_per_epoch, "steps": step, "batch_size": cfg.batch_size, "lr": lr,
               "train_seconds": round(sum(s["seconds"] for s in segments), 1),
               "samples_per_second": round(total_images / max(total_step_seconds, 1e-9), 1),
               "segments": segments,
               "device": str(device), "cpu": cpu_model(), "processes": world, "precision": str(amp or "fp32"),
               "skipped_files": len(train_data.skipped),
               "nonfinite_steps": sum(s.get("nonfinite_steps", 0) for s in segments),
               "collapse_warnings": [w for s in segments for w in s.get("collapse_warnings", [])],
               "torch": torch.__version__}
    chosen = next((s["budget"] for s in segments if "budget" in s), None)
    if chosen is not None:  # what train.budget chose, and how the run's training time (every session) compares
        summary["budget"] = {**chosen, "train_seconds": summary["train_seconds"]}
    save_json(run_dir / "summary.json", summary)
    return Trained(summary, probe, device, raw)


def _report_skipped(data: ImageDataset, run_dir: Path, say) -> None:
    """Write every skipped file with its reason to ``RUN_DIR/skipped_files.tsv`` and print a one-line summary."""
    lines = "".join(f"{path}\t{reason}\n" for path, reason in zip(data.skipped, data.skip_reasons))
    atomic_write_bytes(run_dir / "skipped_files.tsv", lambda f: f.write(("path\treason\n" + lines).encode()))
    say(f"selfsup: {len(data.skipped)} file(s) of {data.name} could not be used and were skipped (first: "
        f"{data.skipped[0]}: {data.skip_reasons[0]}); every one with its reason: {run_dir / 'skipped_files.tsv'}")


def _knn_monitor(encoder, train_data, test_data, monitor_idx, mean, std, device, amp, cfg) -> float:
    train_f = extract_features(encoder, train_data.images[monitor_idx], mean, std, device=device, dtype=amp)
    test_f = extract_features(encoder, test_data.images, mean, std, device=device, dtype=amp)
    res = knn_classify(train_f, train_data.labels[monitor_idx], test_f, test_data.labels, k=cfg.eval.knn_k,
                       temperature=cfg.eval.knn_temperature)
    return float(res["top1"][cfg.eval.knn_k])
