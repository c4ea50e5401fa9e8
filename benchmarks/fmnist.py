"""The foundation benchmark: recipes end to end on Fashion-MNIST, step overhead, and view throughput vs kornia.

Prints, for each run: fmnist-knn, fmnist-linear, the untrained network's kNN, online-probe top-1, wall-clock minutes
(training + evaluation, measured around the whole `selfsup train` command) and the CPU model; then the SimCLR step's
overhead ratio (DESIGN.md §4) and views/s of the SimCLR view pipeline against kornia (bench_views.py, run in a venv
that has kornia when one is given). Not a test: the long recipe takes up to an hour on 2 CPU cores.

    python benchmarks/fmnist.py                       # simclr default, simclr fmnist-long, byol default
    python benchmarks/fmnist.py --runs simclr:default --kornia-python /work/benchvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from selfsup.runtime import cpu_model  # noqa: E402


def run(method: str, recipe: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "selfsup", "train", method, f"recipe={recipe}", f"out={out}", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    s = json.loads((out / "summary.json").read_text())
    s["wall_minutes"] = wall / 60
    return s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="*", default=["simclr:default", "simclr:fmnist-long", "byol:default"])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--kornia-python", default=None, help="a python with kornia + torch for the views benchmark")
    p.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every run")
    a = p.parse_args()
    rows = []
    for spec in a.runs:
        method, recipe = spec.split(":")
        s = run(method, recipe, Path(a.out) / f"{method}-{recipe}", a.extra)
        rows.append(s)
    print(f"\nCPU: {cpu_model()}")
    print(f"{'run':24s} {'fmnist-knn':>10s} {'fmnist-linear':>13s} {'knn-init':>8s} {'online':>7s} "
          f"{'img/s':>7s} {'train min':>9s} {'wall min':>8s}")
    for s in rows:
        print(f"{s['method'] + ':' + s['recipe']:24s} {s.get('knn_top1', float('nan')):10.2f} "
              f"{s.get('linear_top1', float('nan')):13.2f} {s.get('knn_top1_init', float('nan')):8.2f} "
              f"{s.get('online_probe_top1', float('nan')):7.2f} {s['samples_per_second']:7.0f} "
              f"{s['train_seconds'] / 60:9.1f} {s['wall_minutes']:8.1f}")
    subprocess.run([sys.executable, str(HERE / "bench_step.py"), "simclr"], check=True)
    subprocess.run([sys.executable, str(HERE / "bench_step.py"), "byol"], check=True)
    py = a.kornia_python or sys.executable
    subprocess.run([py, str(HERE / "bench_views.py"), "--tune-malloc"], check=False)


if __name__ == "__main__":
    main()
