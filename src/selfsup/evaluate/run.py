"""Evaluate a run directory: fmnist-knn / fmnist-linear style protocols on the backbone, plus the untrained baseline.

Used at the end of `selfsup train` and by `selfsup eval RUN_DIR`, which also works on an interrupted run (it falls back
to the last checkpoint when no exported backbone exists yet).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from selfsup.config import Config, config_from_dict
from selfsup.data.datasets import ImageDataset, dataset_stats
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify
from selfsup.evaluate.plots import plot_training
from selfsup.evaluate.probe import linear_probe
from selfsup.nn.backbones import load_backbone
from selfsup.runtime import autocast_dtype, save_json, select_device


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    import yaml

    from selfsup.config import _set, parse_override
    from selfsup.methods import get_method

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a selfsup run directory?")
    d = yaml.safe_load(path.read_text())
    d.pop("resolved_views", None)  # written for the reader; rebuilt from the method's recipe
    method = d["method"]
    params = d.pop(method, None)
    entry = get_method(method)
    cfg = config_from_dict(d, entry.params_cls)
    if params:
        for k, v in params.items():
            _set(cfg, f"{method}.{k}", v)
    for o in overrides or []:
        _set(cfg, *parse_override(o))
    return cfg


def load_run_encoder(run_dir: Path, cfg: Config, in_chans: int, device) -> torch.nn.Module:
    """The exported backbone when there is one, else the encoder inside the last checkpoint."""
    run_dir = Path(run_dir)
    if (run_dir / "backbone.safetensors").exists():
        return load_backbone(run_dir).to(device)
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{run_dir} has neither backbone.safetensors nor checkpoints/last.pt to evaluate"
        )
    from selfsup.methods import get_method

    mean, std = dataset_stats(cfg.data.name, channels=in_chans)
    method = get_method(cfg.method).build(cfg, in_chans, mean, std)
    method.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["method"])
    return method.encoder.to(device).eval()


def evaluate_encoder(
    encoder,
    train_data: ImageDataset,
    test_data: ImageDataset,
    mean,
    std,
    cfg: Config,
    device,
    linear: bool = True,
    probe=None,
) -> dict:
    amp = autocast_dtype(cfg.train.precision, device)
    train_f = extract_features(encoder, train_data.images, mean, std, device=device, dtype=amp)
    test_f = extract_features(encoder, test_data.images, mean, std, device=device, dtype=amp)
    knn = knn_classify(
        train_f,
        train_data.labels,
        test_f,
        test_data.labels,
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
    )
    out = {"knn_top1": round(float(knn["top1"][cfg.eval.knn_k]), 2), "knn_protocol": knn["protocol"]}
    if probe is not None:  # the online probe (trained on augmented views during pre-training), on the test split
        probe.eval()
        with torch.no_grad():
            pred = probe(test_f.to(next(probe.parameters()).device)).argmax(1).cpu()
        out["online_probe_top1"] = round(100 * float((pred == test_data.labels).float().mean()), 2)
    if linear:
        lin = linear_probe(
            train_f, train_data.labels, test_f, test_data.labels, epochs=cfg.eval.linear_epochs, seed=cfg.seed
        )
        out["linear_top1"] = round(float(lin["top1"]), 2)
        out["linear_probe"] = {k: v for k, v in lin.items() if k != "top1"}
    return out


def evaluate_run(
    run_dir: Path,
    cfg: Config,
    train_data: ImageDataset | None = None,
    test_data: ImageDataset | None = None,
    encoder=None,
    device=None,
    probe=None,
) -> dict:
    """Evaluate the run's backbone, update summary.json and the plots, and return the summary."""
    run_dir = Path(run_dir)
    t0 = time.time()
    device = device or select_device(cfg.train.device)
    if train_data is None:
        from selfsup.train import load_data

        train_data, test_data = load_data(cfg)
    C = train_data.image_shape[0]
    mean, std = dataset_stats(cfg.data.name, channels=C)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"method": cfg.method}
    if test_data is not None and train_data.labels is not None and test_data.labels is not None:
        encoder = encoder if encoder is not None else load_run_encoder(run_dir, cfg, C, device)
        summary.update(
            evaluate_encoder(encoder, train_data, test_data, mean, std, cfg, device, cfg.eval.linear, probe)
        )
        if cfg.eval.init_baseline and (run_dir / "init").exists():
            init = load_backbone(run_dir / "init").to(device)
            base = evaluate_encoder(init, train_data, test_data, mean, std, cfg, device, linear=False)
            summary["knn_top1_init"] = base["knn_top1"]
        say = f"kNN top-1 {summary['knn_top1']:.2f}%"
        if "linear_top1" in summary:
            say += f", linear top-1 {summary['linear_top1']:.2f}%"
        if "knn_top1_init" in summary:
            say += f" (untrained network: kNN {summary['knn_top1_init']:.2f}%)"
        print(f"selfsup eval: {say}", flush=True)
    else:
        print("selfsup eval: no labelled test split; label-based evaluation skipped", flush=True)
    summary["eval_seconds"] = round(time.time() - t0, 1)
    if (run_dir / "metrics.jsonl").exists():
        summary["plots"] = [
            str(p.relative_to(run_dir)) for p in plot_training(run_dir / "metrics.jsonl", run_dir)
        ]
    save_json(summary_path, summary)
    return summary
