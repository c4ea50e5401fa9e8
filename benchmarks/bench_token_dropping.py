"""Token dropping (cookbook §3.8.3): time of a ViT encoder's forward+backward on the visible tokens only (MAE,
ratio 0.75) against the same encoder on all tokens, same process, same batch, interleaved.

    python benchmarks/bench_token_dropping.py [--batch 256] [--size 28] [--patch 4] [--steps 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from selfsup.data.masking import random_mask  # noqa: E402
from selfsup.nn.backbones import build_backbone  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", in_chans=1, img_size=a.size, patch_size=a.patch, pool="mean").train()
    n = (a.size // a.patch) ** 2
    x = torch.randn(a.batch, 1, a.size, a.size)
    keep = random_mask(a.batch, n, a.ratio, torch.Generator().manual_seed(0)).keep

    def step(k):
        vit.forward_features(x, keep=k)["tokens"].square().mean().backward()
        vit.zero_grad(set_to_none=True)

    times = {"all": [], "visible": []}
    for i in range(1 + a.steps):
        for name, k in (("all", None), ("visible", keep)):
            t0 = time.perf_counter()
            step(k)
            if i:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"vit_tiny {a.size}px patch {a.patch} ({n} tokens), batch {a.batch}, {cpu_model()}, "
          f"{torch.get_num_threads()} threads: all tokens {med['all'] * 1e3:.0f} ms, visible {keep.shape[1]} tokens "
          f"{med['visible'] * 1e3:.0f} ms per forward+backward -> {med['all'] / med['visible']:.2f}x faster")


if __name__ == "__main__":
    main()
