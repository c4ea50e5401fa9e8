"""Fine-tune a finished run's encoder on a stratified subset of its train split, next to the same architecture
trained from its random initialization with the same protocol (what the pre-training is worth under fine-tuning).

    python benchmarks/finetune_run.py RUN_DIR [--train-size 6000] [--epochs 10] [--lr 5e-4] [--threads 0] [--no-scratch]

Prints one line per model and writes ``finetune_<train-size>.json`` into RUN_DIR. The protocol is
``selfsup.evaluate.finetune`` (AdamW, layer decay 0.75 for ViTs, crops + flips, best-val epoch, test read once).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from selfsup.data.datasets import describe_data  # noqa: E402
from selfsup.evaluate.finetune import finetune  # noqa: E402
from selfsup.runs import build_method, load_data, load_run_config, load_run_encoder  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: the protocol's, 5e-4)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-scratch", action="store_true", help="skip the randomly initialized baseline")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_run_config(a.run_dir)
    train, test = load_data(cfg)
    if test is None:
        sys.exit(f"{a.run_dir}: its data has no labelled test split to fine-tune against")
    info = describe_data(train, cfg.data.name)
    torch.manual_seed(cfg.seed)  # the run's own initialization, as its `init` baseline
    scratch = build_method(cfg, info).exports()["backbone"]
    encoders = {"pretrained": load_run_encoder(a.run_dir, cfg, info, "cpu")}
    if not a.no_scratch:
        encoders["scratch"] = scratch
    results = {}
    for name, encoder in encoders.items():
        t0 = time.perf_counter()
        r = finetune(copy.deepcopy(encoder), train.images, train.labels, test.images, test.labels, info.mean,
                     info.std, epochs=a.epochs, train_size=a.train_size, seed=cfg.seed,
                     **({"lr": a.lr} if a.lr else {}))
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        print(f"{name}: fine-tune top-1 {r['top1']:.2f}% (val {r['val_top1']:.2f}%, best epoch {r['best_epoch']} of "
              f"{r['epochs']}, {r['protocol']['n_fit']} fit + {r['protocol']['n_val']} val images) in "
              f"{r['seconds']:.0f} s, {cpu_model()}, {torch.get_num_threads()} threads", flush=True)
    out = Path(a.run_dir) / f"finetune_{a.train_size}{f'_lr{a.lr:g}' if a.lr else ''}.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), **results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
