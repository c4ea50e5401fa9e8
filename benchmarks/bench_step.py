"""Training-step throughput and the overhead ratio (DESIGN.md §4) of a method's recipe on this machine.

overhead ratio = time of one full training step (uint8 batch -> views -> forward -> backward -> optimizer step ->
on_step_end, exactly `selfsup.train.train_step`) / time of forward+backward of the same modules on already-made views
(the teacher's forward included, since it is inside the method's forward), same process, same batch. 1.0 is the limit.

    python benchmarks/bench_step.py simclr [key=value ...] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from selfsup.config import build_config  # noqa: E402
from selfsup.contract import Progress  # noqa: E402
from selfsup.data.datasets import describe_data, load_dataset  # noqa: E402
from selfsup.methods import get_method  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402
from selfsup.runtime import autocast, autocast_dtype, cpu_model, select_device, tune_malloc  # noqa: E402
from selfsup.train import train_step  # noqa: E402


def measure(method: str, overrides: list[str], steps: int = 10, warmup: int = 2) -> dict:
    entry = get_method(method)
    cfg = build_config(method, overrides, params_cls=entry.params_cls)
    device = select_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    data = load_dataset(cfg.data.name, cfg.data.train_split, root=cfg.data.root)
    torch.manual_seed(0)
    raw = entry.build(cfg, describe_data(data, cfg.data.name)).to(device).train()
    opt = build_optimizer(cfg.optim.name, raw, 0.01, cfg.optim.weight_decay, cfg.optim.momentum)
    gen = torch.Generator(device=device).manual_seed(0)
    x = data.images[: cfg.batch_size]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    progress = Progress(0, 1000, 100)

    def full_step():
        train_step(raw, raw, opt, None, x, None, gen, 1, device, amp, False, progress)
        raw.on_step_end(progress.after())

    views = raw.view_maker(x.to(device), gen)

    def fwd_bwd():
        with autocast(device, amp):
            loss = raw(views, progress)["loss"]
        loss.backward()
        raw.zero_grad(set_to_none=True)

    def make_views():
        raw.view_maker(x.to(device), gen)

    times = {"step": [], "fwd_bwd": [], "views": []}
    fns = {"step": full_step, "fwd_bwd": fwd_bwd, "views": make_views}
    for i in range(warmup + steps):  # interleaved, so load from other processes hits all alike
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"method": method, "overrides": overrides, "batch": cfg.batch_size, "device": str(device),
            "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "step_s": med["step"], "fwd_bwd_s": med["fwd_bwd"], "views_s": med["views"],
            "images_per_s": cfg.batch_size / med["step"], "overhead_ratio": med["step"] / med["fwd_bwd"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    tune_malloc()
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.method, a.overrides, a.steps)
    print(f"{r['method']} {' '.join(r['overrides'])} | batch {r['batch']} on {r['device']} ({r['cpu']}, "
          f"{r['threads']} threads): step {r['step_s'] * 1e3:.0f} ms = {r['images_per_s']:.0f} img/s, "
          f"fwd+bwd on made views {r['fwd_bwd_s'] * 1e3:.0f} ms, views {r['views_s'] * 1e3:.1f} ms, "
          f"overhead ratio {r['overhead_ratio']:.3f}")


if __name__ == "__main__":
    main()
