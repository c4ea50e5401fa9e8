"""``train.compile=true`` on every method: does a compiled training step run, how long does compiling take, and how
much faster is the step (cookbook §3.8.2). Not a test: tens of seconds of compilation per method on a CPU.

For each method, ``selfsup.bench.measure`` on its default recipe (Fashion-MNIST, the recipe's batch unless
overridden) eager, then with ``train.compile=true`` (compilation happens in the warm-up rounds and is timed with
them). One Markdown row per method: eager and compiled samples/s, their ratio, the seconds the compiled measurement
took in all (mostly compilation), or the error that stopped it. Time nothing else on the same cores.

    python benchmarks/compile_all.py [--methods simclr byol ...] [--threads 2] [--out compile_all.md] [-- key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from selfsup.bench import measure  # noqa: E402
from selfsup.methods import REGISTRY  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402


def one(method: str, extra: list[str], steps: int, warmup: int) -> dict:
    row = {"method": method}
    try:
        eager = measure(method, extra, steps=steps, warmup=warmup)
        t0 = time.time()
        compiled = measure(method, [*extra, "train.compile=true"], steps=steps, warmup=warmup)
        row.update(eager=eager["samples_per_s"], compiled=compiled["samples_per_s"],
                   speedup=compiled["samples_per_s"] / eager["samples_per_s"],
                   compiled_seconds=time.time() - t0, precision=eager["precision"], batch=eager["batch"])
    except Exception as e:  # one method's failure is a row of the result, not the end of the benchmark
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-2000:]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | batch | precision | eager samples/s | compiled samples/s | compiled / eager | compile run (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['method']} | {r['batch']} | {r['precision']} | {r['eager']:.0f} | {r['compiled']:.0f} "
                         f"| {r['speedup']:.2f} | {r['compiled_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=sorted(REGISTRY))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="rounds before timing; the compiled run compiles in them")
    p.add_argument("--out", default="compile_all.md")
    p.add_argument("extra", nargs="*", help="overrides for every method (after --)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    head = (f"`python benchmarks/compile_all.py {' '.join(sys.argv[1:])}` on {cpu_model()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}\n\n")
    for method in a.methods:
        rows.append(one(method, a.extra, a.steps, a.warmup))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "traceback"}), flush=True)
        Path(a.out).write_text(head + table(rows) + "\n")  # a stopped benchmark keeps its finished rows
    Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
