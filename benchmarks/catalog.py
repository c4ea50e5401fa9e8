"""The catalog benchmark: train methods with their Fashion-MNIST recipes, evaluate them the same way, and write one
Markdown table (kNN, linear, MLP probe, RankMe, minutes, date, commit, CPU model) into the docs.

Each run is a plain ``selfsup train METHOD recipe=RECIPE`` (training + the standard evaluation); minutes are measured
around the whole command. A run directory that already holds a ``summary.json`` is reused, not retrained, so a long
list can be resumed and rows can be produced one at a time (``--runs``). Not a test: each run takes 10-60 minutes on
a 2-core CPU. Time nothing else on the same cores.

    python benchmarks/catalog.py --runs simclr:default moco_v2:default vicreg:default [--out runs/catalog]
        [--table docs/results/fashion_mnist.md] [--threads 0] [-- extra overrides for every run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from selfsup.runtime import cpu_model  # noqa: E402

FLOORS = {"knn_top1": 86.2, "linear_top1": 84.5}  # pixel floors on Fashion-MNIST (DESIGN.md §4)
COLUMNS = ["method", "recipe", "kNN", "linear", "MLP", "RankMe", "minutes", "epochs", "date", "commit", "CPU"]


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); $SELFSUP_COMMIT names it for an exported copy."""
    if os.environ.get("SELFSUP_COMMIT"):
        return os.environ["SELFSUP_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(method: str, recipe: str, out: Path, extra: list[str]) -> dict:
    """Train (unless ``out`` holds a finished run) and return the summary with ``wall_minutes``."""
    done = out / "summary.json"
    if not done.exists():
        cmd = [sys.executable, "-m", "selfsup", "train", method, f"recipe={recipe}", f"out={out}", *extra]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = (time.time() - t0) / 60
        s = json.loads(done.read_text())
        s.update(wall_minutes=round(wall, 1), date=datetime.date.today().isoformat(), commit=commit(),
                 cpu=cpu_model())
        done.write_text(json.dumps(s, indent=1))
    return json.loads(done.read_text())


def cell(s: dict, key: str) -> str:
    v = s.get(key)
    if v is None:
        return "–"
    mark = "" if key not in FLOORS or v >= FLOORS[key] else " ✗"  # below the pixel floor
    return f"{v:.2f}{mark}" if isinstance(v, float) else f"{v}{mark}"


def row(s: dict) -> list[str]:
    minutes = s.get("wall_minutes") or round(s.get("total_seconds", 0) / 60, 1)
    return [s["method"], s.get("recipe", "?"), cell(s, "knn_top1"), cell(s, "linear_top1"), cell(s, "mlp_top1"),
            cell(s, "rankme"), f"{minutes:g}", f"{s.get('epochs_done', s.get('epochs'))}", s.get("date", "?"),
            s.get("commit", "?"), s.get("cpu", "?")]


def write_table(rows: list[list[str]], path: Path) -> None:
    """Merge ``rows`` into the Markdown table at ``path`` (a row per method:recipe; the newest run wins)."""
    begin, end = "<!-- catalog-table:begin -->", "<!-- catalog-table:end -->"
    text = path.read_text() if path.exists() else f"# Fashion-MNIST results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    old, tail = rest.split(end, 1)
    table = {}
    for line in old.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS):
            table[(cells[0], cells[1])] = cells
    for r in rows:
        table[(r[0], r[1])] = r
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for _, r in sorted(table.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", required=True, help="method:recipe, e.g. moco_v2:default")
    p.add_argument("--out", default="runs/catalog")
    p.add_argument("--table", default=str(HERE.parent / "docs/results/fashion_mnist.md"))
    p.add_argument("--threads", type=int, default=0, help="train.num_threads for every run (0: torch's default)")
    p.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args()
    extra = list(a.extra) + ([f"train.num_threads={a.threads}"] if a.threads else [])
    rows = []
    for spec in a.runs:
        method, _, recipe = spec.partition(":")
        s = run(method, recipe or "default", Path(a.out) / f"{method}-{recipe or 'default'}", extra)
        rows.append(row(s))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
        write_table(rows, Path(a.table))  # after every run: a stopped benchmark keeps its finished rows
    print(f"wrote {a.table}")


if __name__ == "__main__":
    main()
