"""The imbalance study (cookbook §3.3, prior matching): pretrain on a power-law class-imbalanced subset of
Fashion-MNIST, then evaluate every encoder the same way on the *balanced* data: kNN (k = 20, T = 0.07) and the linear
probe trained on the full, balanced train split and tested on the balanced test split.

MSN with the uniform prior (its hidden assumption: every prototype used equally often) against MSN with the
power-law prior (PMSN), with SimCLR and DINO on the same subset for reference. Each run is
``selfsup train METHOD recipe=R data.imbalance_ratio=RATIO [overrides]`` (its own evaluation skipped: it would probe
on the imbalanced split), then ``selfsup eval RUN/backbone.safetensors data=fashion_mnist``. A run directory that
already holds its eval is reused. Writes one Markdown table. Not a test: each run takes 10-40 minutes on 2 cores.

    python benchmarks/imbalance.py [--ratio 10] [--epochs 10] [--out runs/imbalance]
        [--table docs/results/imbalance.md] [--threads 1] [--runs msn-uniform msn-power_law simclr dino]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from catalog import commit  # noqa: E402

from selfsup.data.imbalance import power_law_sizes  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402

# label -> (method, recipe, overrides); every run also gets epochs, the ratio and the skipped evaluation
RUNS = {
    "msn-uniform": ("msn", "default", ["msn.prior=uniform"]),
    "msn-power_law": ("msn", "default", ["msn.prior=power_law"]),
    "simclr": ("simclr", "default", []),
    "dino": ("dino", "default", []),
}
SKIP_EVAL = ["data.test_split=null", "train.knn_every=0"]  # no evaluation on the imbalanced split
BALANCED_EVAL = ["data=fashion_mnist", "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
                 "eval.label_free=false", "eval.guillotine=false", "eval.report=false", "eval.init_baseline=false"]
COLUMNS = ["run", "method", "prior", "seed", "kNN", "linear", "steps", "minutes", "date", "commit", "CPU"]


def run(label: str, out: Path, ratio: float, epochs: int, extra: list[str]) -> dict:
    method, recipe, overrides = RUNS[label]
    result = out / "eval-fashion_mnist" / "eval.json"
    if not result.exists():
        t0 = time.time()
        if not (out / "summary.json").exists():
            cmd = [sys.executable, "-m", "selfsup", "train", method, f"recipe={recipe}", f"out={out}",
                   f"epochs={epochs}", f"data.imbalance_ratio={ratio:g}", *overrides, *SKIP_EVAL, *extra]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        threads = [a for a in extra if a.startswith("train.num_threads=")]
        cmd = [sys.executable, "-m", "selfsup", "eval", str(out / "backbone.safetensors"), *BALANCED_EVAL, *threads]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        meta = {"wall_minutes": round((time.time() - t0) / 60, 1), "date": datetime.date.today().isoformat(),
                "commit": commit(), "cpu": cpu_model()}
        (out / "study.json").write_text(json.dumps(meta, indent=1))
    e = json.loads(result.read_text())
    s = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
    prior = next((o.split("=", 1)[1] for o in overrides if o.startswith("msn.prior=")), "–")
    return {"run": label, "method": method, "prior": prior, "knn": e.get("knn_top1"), "linear": e.get("linear_top1"),
            "seed": yaml.safe_load((out / "config.yaml").read_text()).get("seed"), "steps": s.get("steps"), **meta}


def table(rows: list[dict], ratio: float) -> str:
    sizes = power_law_sizes(6000, 10, ratio)
    lines = [f"Pretraining on a power-law subset of Fashion-MNIST's train split: largest / smallest class = {ratio:g},",
             f"class sizes {sizes} ({sum(sizes)} images, labels 0..9 in order). Evaluation on the balanced data: kNN",
             "(k = 20, T = 0.07, the full 60k train split as memory) and the linear probe (trained on the full train",
             "split) on the 10k test split.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["run"], r["method"], r["prior"], str(r["seed"]), _num(r["knn"]), _num(r["linear"]), str(r["steps"]),
                 str(r.get("wall_minutes", "?")), r.get("date", "?"), r.get("commit", "?"),
                 r.get("cpu", "?")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/imbalance")
    p.add_argument("--table", default=str(HERE.parent / "docs/results/imbalance.md"))
    p.add_argument("--threads", type=int, default=0, help="train.num_threads for every command (0: torch's default)")
    p.add_argument("extra", nargs="*", help="overrides for every training run (after --)")
    a = p.parse_args()
    extra = list(a.extra) + ([f"train.num_threads={a.threads}"] if a.threads else [])
    rows = []
    for label in a.runs:
        rows.append(run(label, Path(a.out) / label, a.ratio, a.epochs, extra))
        print(rows[-1], flush=True)
    Path(a.table).parent.mkdir(parents=True, exist_ok=True)
    Path(a.table).write_text("# Pretraining on class-imbalanced data (cookbook §3.3)\n\n" + table(rows, a.ratio))
    print(f"wrote {a.table}")


if __name__ == "__main__":
    main()
