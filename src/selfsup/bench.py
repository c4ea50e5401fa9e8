"""`selfsup bench METHOD [key=value ...]`: how fast a method's recipe trains on this machine (cookbook §3.8.2-3.8.3).

In one process, on the recipe's batch and device, interleaved rounds time (median of ``steps`` after ``warmup``):

- **step**: one full training step, exactly :func:`selfsup.train.train_step` (uint8 batch -> views -> forward ->
  backward -> optimizer step) plus ``on_step_end`` (EMA, queues): the samples/s a run gets;
- **fwd+bwd**: forward and backward of the same modules on views made beforehand (the teacher's forward included, as
  it is inside the method's forward);
- **views**: the method's view maker alone on the batch;
- **batch loading**: reading a random batch of uint8 images as the trainer does (from memory, or from an image
  folder's memmapped cache of decoded images), with its ratio to the step: above 1, data never waits.

The **overhead ratio** = step ÷ fwd+bwd (DESIGN.md §4): 1.0 is the physical limit, and what exceeds it is the
trainer's and the view maker's cost. When kornia is installed, SimCLR's two views at the run's view size are also
made by kornia on the same batch and device (``views_vs_kornia``: selfsup's views/s ÷ kornia's). On CUDA the GPU is
named and the model FLOPs of one fwd+bwd (counted by ``torch.utils.flop_counter``) give the achieved TFLOP/s and,
for GPUs whose dense peak is in :data:`PEAK_TFLOPS`, the model FLOPs utilization (MFU). The CPU model is printed
with every result: compare only ratios measured in one run, or timings of one CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

# Dense peak TFLOP/s by GPU name fragment: (bf16/fp16 tensor cores, tf32 tensor cores), from the vendors' data sheets
# (SXM parts; sparsity excluded). MFU is reported only for these.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.5), "H100": (989.0, 494.5), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5), "L4": (121.0, 60.0), "V100": (125.0, 15.7),
}


def model_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matrix multiplies and convolutions, forward and backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(gpu_name: str, low_precision: bool) -> float | None:
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in gpu_name:
            return half if low_precision else tf32
    return None


def _kornia_two_views(channels: int, size: int, mean, std, device):
    """SimCLR's two views in kornia (crop 0.08-1, flip, jitter 0.8, grayscale 0.2, normalize), or None."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    color = (0.4, 0.4, 0.4, 0.1) if channels == 3 else (0.4, 0.4, 0.0, 0.0)
    ops = [K.RandomResizedCrop((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), K.RandomHorizontalFlip(),
           K.ColorJitter(*color, p=0.8)]
    if channels == 3:
        ops.append(K.RandomGrayscale(p=0.2))
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    pipeline = K.AugmentationSequential(*ops).to(device)

    def make(batch: torch.Tensor):
        x = batch.float().div_(255)
        return [pipeline(x), pipeline(x)]

    return make


def measure(method: str, overrides: list[str], steps: int = 10, warmup: int = 2) -> dict:
    """The timings and ratios above for ``method`` with ``overrides`` (the recipe's data, batch and device)."""
    from selfsup.config import build_config
    from selfsup.contract import Progress
    from selfsup.data.datasets import describe_data, load_dataset
    from selfsup.data.views import simclr_views
    from selfsup.methods import get_method
    from selfsup.optim import build_optimizer
    from selfsup.runtime import autocast, autocast_dtype, cpu_model, select_device
    from selfsup.train import train_step

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    entry = get_method(method)
    cfg = build_config(method, overrides, params_cls=entry.params_cls)
    device = select_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    data = load_dataset(cfg.data.name, cfg.data.train_split, root=cfg.data.root)
    if len(data) < cfg.batch_size:
        raise ValueError(f"the data has {len(data)} images, fewer than batch_size={cfg.batch_size}; lower batch_size")
    info = describe_data(data, cfg.data.name)
    torch.manual_seed(0)
    raw = entry.build(cfg, info).to(device).train()
    if cfg.train.compile:  # compiled in the warm-up rounds, as in training (selfsup.compiled)
        from selfsup.compiled import compile_networks

        compile_networks(raw)
    opt = build_optimizer(cfg.optim.name, raw, 1e-3, cfg.optim.weight_decay, cfg.optim.momentum)
    gen = torch.Generator(device=device).manual_seed(0)
    x = data.images[: cfg.batch_size]
    xd = x.to(device)
    # what the trainer gives every step: the batch's labels (SupCon) and its rows in the training set (NPID's bank)
    y = None if data.labels is None else data.labels[: cfg.batch_size]
    index = torch.arange(cfg.batch_size)
    progress = Progress(0, 1000, 100)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def full_step():
        train_step(raw, raw, opt, None, x, y, gen, 1, device, amp, False, progress, index=index)
        raw.on_step_end(progress.after())

    views = dataclasses.replace(raw.view_maker(xd, gen), labels=None if y is None else y.to(device),
                                index=index.to(device))

    def fwd_bwd():
        with autocast(device, amp):
            loss = raw(views, progress)["loss"]
        loss.backward()
        raw.zero_grad(set_to_none=True)

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))

    def load_batch():  # what the trainer reads per step: a random batch of uint8 images, from memory or the cache
        i = int(torch.randint(0, len(data) - cfg.batch_size + 1, ()))
        return data.images[order[i:i + cfg.batch_size]]

    fns = {"step": full_step, "fwd_bwd": fwd_bwd, "views": lambda: raw.view_maker(xd, gen), "loader": load_batch}
    kornia = _kornia_two_views(info.shape[0], cfg.views.size, info.mean, info.std, device)
    if kornia is not None:
        ours = simclr_views(cfg.views.size, info.mean, info.std, info.shape[0])
        fns["simclr_views"] = lambda: ours(xd, gen)
        fns["kornia_views"] = lambda: kornia(xd)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):  # interleaved rounds: load from other processes hits every part alike
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_views = len(views)
    result = {
        "method": method, "recipe": cfg.recipe, "overrides": overrides, "batch": cfg.batch_size,
        "device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(), "precision": str(amp or "fp32"),
        "torch": torch.__version__, "steps": steps,
        "step_ms": med["step"] * 1e3, "fwd_bwd_ms": med["fwd_bwd"] * 1e3, "views_ms": med["views"] * 1e3,
        "samples_per_s": cfg.batch_size / med["step"], "overhead_ratio": med["step"] / med["fwd_bwd"],
        "views_per_s": cfg.batch_size * n_views / med["views"], "n_views": n_views,
        "loader_ms": med["loader"] * 1e3, "loader_images_per_s": cfg.batch_size / med["loader"], "loader_vs_step": med["step"] / med["loader"],
        "data": data.name,
    }
    if kornia is not None:
        result["simclr_views_per_s"] = 2 * cfg.batch_size / med["simclr_views"]
        result["kornia_views_per_s"] = 2 * cfg.batch_size / med["kornia_views"]
        result["views_vs_kornia"] = result["simclr_views_per_s"] / result["kornia_views_per_s"]
    flops = model_flops(fwd_bwd)
    result["model_tflops_per_step"] = flops / 1e12
    result["achieved_tflops"] = flops / med["fwd_bwd"] / 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        result["gpu"] = name
        peak = peak_tflops(name, low_precision=amp is not None)
        if peak is not None:
            result["mfu"] = result["achieved_tflops"] / peak
    return result


def describe(r: dict) -> str:
    """The result as the lines `selfsup bench` prints."""
    where = r.get("gpu") or r["cpu"]
    lines = [f"selfsup bench {r['method']} (recipe {r['recipe']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''})"
             f": batch {r['batch']} on {r['device']} ({where}; {r['threads']} CPU threads, {r['precision']}, "
             f"torch {r['torch']}), median of {r['steps']} steps",
             f"  training step   {r['step_ms']:8.1f} ms  = {r['samples_per_s']:,.0f} samples/s",
             f"  fwd+bwd alone   {r['fwd_bwd_ms']:8.1f} ms  overhead ratio {r['overhead_ratio']:.3f} (1.0 = the limit)",
             f"  views alone     {r['views_ms']:8.1f} ms  = {r['views_per_s']:,.0f} views/s ({r['n_views']} per image)",
             f"  batch loading   {r['loader_ms']:8.1f} ms  = {r['loader_images_per_s']:,.0f} images/s from {r['data']} "
             f"({r['loader_vs_step']:,.0f}x what the step consumes)",
             f"  model FLOPs     {r['model_tflops_per_step'] * 1e3:8.2f} GFLOP per fwd+bwd = "
             f"{r['achieved_tflops']:.3f} TFLOP/s achieved" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "")]
    if "views_vs_kornia" in r:
        lines.append(f"  SimCLR's 2 views: selfsup {r['simclr_views_per_s']:,.0f} views/s, kornia "
                     f"{r['kornia_views_per_s']:,.0f} views/s: {r['views_vs_kornia']:.2f}x")
    else:
        lines.append("  kornia is not installed: no view-making comparison (pip install 'selfsup[bench]')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="selfsup bench", description=__doc__.splitlines()[0])
    p.add_argument("method")
    p.add_argument("overrides", nargs="*", help="key=value, as for selfsup train (e.g. batch_size=512)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10), after --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.method, a.overrides, a.steps, a.warmup)
    print(describe(r))
    if a.json:
        from selfsup.runtime import save_json

        save_json(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
