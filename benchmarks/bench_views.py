"""Augmentation throughput (DESIGN.md §4): views/s of ``simclr_views`` vs kornia doing the same ops.

Both sides get the same uint8 batch on the same device, in the same process, and make two SimCLR views:
RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip p=0.5 + ColorJitter(0.4, 0.4, 0.4, 0.1)
p=0.8 + grayscale p=0.2 + normalization (1-channel images: brightness/contrast only, no grayscale, on both
sides). kornia's side includes its uint8 -> float conversion, once per batch, as selfsup's does.

kornia is a benchmark-only extra, kept out of the project's environment; run this in a venv that has it:

    python3 -m venv /work/benchvenv && /work/benchvenv/bin/pip install torch==2.13.0 \\
        && /work/benchvenv/bin/pip install kornia --no-deps && /work/benchvenv/bin/pip install kornia_rs
    /work/benchvenv/bin/python benchmarks/bench_views.py [--device cuda] [--seconds 3] [--tune-malloc]

Timing: rounds alternate between the two sides; each side's figure is its median round, so load from other
processes hits both alike. ``--tune-malloc`` stops glibc from returning freed memory to the OS after every
large tensor (many page faults per op on CPU); it speeds up both sides and is printed with the results.
On a machine shared with other busy processes, use ``--threads 1``: with more OpenMP threads than free
cores every parallel op waits for a descheduled thread, and timings become 10-40x worse and erratic.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from selfsup.bench import _kornia_two_views  # noqa: E402
from selfsup.data.views import simclr_views  # noqa: E402
from selfsup.runtime import tune_malloc  # noqa: E402

DATASETS = {
    "fmnist": (1, 28, (0.2860,), (0.3530,)),
    "cifar10": (3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def kornia_views(channels: int, size: int, mean, std, device):
    """The same two-view pipeline in kornia (selfsup.bench's, which `selfsup bench` uses), or None without kornia."""
    return _kornia_two_views(channels, size, mean, std, device)


def time_round(fn, batch, seconds: float, sync) -> float:
    """views/s of one round of about ``seconds``."""
    n_views, start = 0, time.perf_counter()
    while True:
        n_views += sum(v.shape[0] for v in fn(batch))
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n_views / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=3.0, help="per side and dataset, split in rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tune-malloc", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tuned = tune_malloc() if args.tune_malloc else False
    try:
        import kornia

        kornia_version = kornia.__version__
    except ImportError:
        kornia_version = None
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"cpu: {cpu_model()}, torch threads: {torch.get_num_threads()}, malloc tuned: {tuned}")
    print(f"torch {torch.__version__}, kornia {kornia_version or 'not installed'}, batch {args.batch}")
    if kornia_version is None:
        print("kornia is not installed: timing selfsup only (see this file's docstring for the bench venv)")

    for name in args.datasets:
        channels, size, mean, std = DATASETS[name]
        batch = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        ours = simclr_views(size, mean, std, channels)
        sides = {"selfsup": lambda b, ours=ours, gen=gen: ours(b, gen)}
        theirs = kornia_views(channels, size, mean, std, device)
        if theirs is not None:
            sides["kornia"] = theirs
        for fn in sides.values():  # warm up
            fn(batch)
            sync()
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for side, fn in sides.items():
                rates[side].append(time_round(fn, batch, args.seconds / args.rounds, sync))
        med = {k: statistics.median(v) for k, v in rates.items()}
        line = f"{name} ({args.batch},{channels},{size},{size}) simclr 2 views: selfsup {med['selfsup']:,.0f} views/s"
        if "kornia" in med:
            line += f", kornia {med['kornia']:,.0f} views/s, ratio {med['selfsup'] / med['kornia']:.1f}x"
        print(line)


if __name__ == "__main__":
    main()
