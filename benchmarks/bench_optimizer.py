"""The optimizer step of a method's recipe: PyTorch's default implementation against its fused kernel
(``selfsup.optim.can_fuse``), and the trainer's other per-step passes over the gradients (the finiteness check and
the gradient clipping), on random gradients, interleaved rounds, same process.

    python benchmarks/bench_optimizer.py [--method msn] [--recipe 60min] [--steps 20] [--threads 1]

On a CPU the default is a Python loop over the tensors: it costs a few milliseconds per step whatever the model's
size, which matters for the small CPU recipes whose whole step is tens of milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import selfsup.methods  # noqa: E402,F401  (registers the methods)
from selfsup.config import build_config  # noqa: E402
from selfsup.data.datasets import describe_data, load_dataset  # noqa: E402
from selfsup.methods import get_method  # noqa: E402
from selfsup.optim import param_groups  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402
from selfsup.train import grads_finite  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="msn")
    p.add_argument("--recipe", default="60min")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    entry = get_method(a.method)
    cfg = build_config(a.method, [f"recipe={a.recipe}"], params_cls=entry.params_cls)
    data = load_dataset(cfg.data.name, cfg.data.train_split, root=cfg.data.root)
    torch.manual_seed(0)
    model = entry.build(cfg, describe_data(data, cfg.data.name))
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    opt_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}.get(cfg.optim.name)
    if opt_cls is None:
        raise SystemExit(f"{a.method}:{a.recipe} uses optim.name={cfg.optim.name}: this compares sgd and adamw only")
    opts = {kind: opt_cls(param_groups(model, cfg.optim.weight_decay), lr=1e-3, fused=fused)
            for kind, fused in (("default", None), ("fused", True))}
    fns = {f"{cfg.optim.name} {k}": o.step for k, o in opts.items()}
    fns["grads_finite"] = lambda: grads_finite(model)
    fns["clip_grad_norm_"] = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(3 + a.steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    print(f"{a.method}:{a.recipe}: {len(params)} tensors, {sum(q.numel() for q in params):,} values; "
          f"{cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for name, ts in times.items():
        print(f"  {name:18s} {statistics.median(ts) * 1e3:7.2f} ms (median of {len(ts)})")


if __name__ == "__main__":
    main()
