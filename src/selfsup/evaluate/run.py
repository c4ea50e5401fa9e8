"""`selfsup eval TARGET`: a run directory, an exported backbone, or (from Python) any model.

- A run directory (has ``config.yaml``): the exported backbone, or the encoder of the last checkpoint for an interrupted
  run; the projector and the training augmentation come from the checkpoint (guillotine probing, spectra after the
  projector, LiDAR with the method's own views). Results go to ``RUN_DIR/eval.json`` + ``report.html``, and the
  headline numbers to ``summary.json``.
- An exported backbone (a folder or file with ``backbone.safetensors`` + ``backbone.json``, e.g. ``RUN_DIR/init`` or
  something a colleague sent): needs ``data=NAME``; normalization comes from ``backbone.json`` when recorded there.
- Python: :func:`evaluate` takes an ``nn.Module`` / callable (a timm model, your own network) and a dataset name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from selfsup.config import Config, EvalConfig
from selfsup.data.datasets import ImageDataset, canonical_name, dataset_stats, describe_data
from selfsup.evaluate.baselines import recipe_reference
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify
from selfsup.evaluate.suite import evaluate_model
from selfsup.names import did_you_mean
from selfsup.nn.backbones import load_backbone
from selfsup.report.plots import plot_training
from selfsup.runs import flat_config, load_data, load_run_config, load_run_encoder, load_run_method
from selfsup.runtime import autocast_dtype, save_json, select_device

HEADLINE = ("knn_top1", "linear_top1", "mlp_top1", "online_probe_top1", "knn_top1_init")


def _global_views(view_maker):
    """The method's global views only (local crops have another size): LiDAR's view distribution."""
    return view_maker.global_views() if hasattr(view_maker, "global_views") else None


def run_hyperparameters(cfg: Config, summary: dict | None = None, resolved_views: list | None = None) -> dict:
    """The settings a reader needs to judge a run, flat ``{"section.key": value}``: the method's parameters, batch,
    optimizer (with the lr actually used, from summary.json), epochs, views (crop size and scale of the first
    global view as resolved at training time, from config.yaml's ``resolved_views`` when given; multi-crop) and
    backbone."""
    summary = summary or {}
    d = cfg.to_dict()
    hp: dict = {"method": cfg.method, "recipe": cfg.recipe, "data": cfg.data.name}
    hp.update({f"{cfg.method}.{k}": v for k, v in (d.get(cfg.method) or {}).items()})
    hp.update({"epochs": cfg.epochs, "batch_size": cfg.batch_size})
    for key in ("name", "base_lr", "lr_rule", "weight_decay", "warmup_epochs", "momentum"):
        hp[f"optim.{key}"] = d["optim"][key]
    if summary.get("lr") is not None:
        hp["optim.lr (used)"] = summary["lr"]
    first = resolved_views[0] if resolved_views else {}
    resolved = first if isinstance(first, dict) else {}
    hp["views.size"] = resolved.get("size", cfg.views.size)
    hp["views.scale"] = resolved.get("scale", cfg.views.scale)
    hp["views.n_local"] = cfg.views.n_local
    if cfg.views.min_size:
        hp["views.min_size"], hp["views.size_ramp"] = cfg.views.min_size, list(cfg.views.size_ramp)
    if cfg.views.n_local:
        hp["views.local_size"], hp["views.local_scale"] = cfg.views.local_size, list(cfg.views.local_scale)
    hp["model.backbone"] = cfg.model.backbone
    if cfg.model.backbone.startswith("resnet"):
        hp["model.width"], hp["model.stem"] = cfg.model.width, cfg.model.stem
    hp["model.projector"] = (f"{cfg.model.projector_layers} layers, {cfg.model.projector_hidden} hidden -> "
                             f"{cfg.model.projector_out}" + (", last BN" if cfg.model.projector_last_bn else ""))
    hp["seed"] = cfg.seed
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def _resolved_views(run_dir: Path) -> list | None:
    """``resolved_views`` of the run's config.yaml (what each view really used), None when absent or unreadable."""
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()).get("resolved_views")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def run_reference(cfg: Config) -> dict | None:
    """The shipped recipe's measured numbers when the run used that recipe on that dataset (else None), with the
    settings where this run differs from the reference run."""
    try:
        dataset = canonical_name(cfg.data.name)
    except (KeyError, ValueError):
        return None
    run = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "imbalance_ratio": cfg.data.imbalance_ratio,
           "max_steps": cfg.train.max_steps}
    return recipe_reference(dataset, cfg.method, cfg.recipe, run=run)


def init_knn(init_dir: Path, train_data, test_data, mean, std, cfg: Config, device) -> float:
    """kNN top-1 of the network at initialization (the "untrained" baseline every SSL number is compared with)."""
    amp = autocast_dtype(cfg.train.precision, device)
    init = load_backbone(init_dir, raw=True).to(device)
    tr = extract_features(init, train_data.images, mean, std, device=device, dtype=amp)
    te = extract_features(init, test_data.images, mean, std, device=device, dtype=amp)
    res = knn_classify(tr, train_data.labels, te, test_data.labels, k=cfg.eval.knn_k,
                       temperature=cfg.eval.knn_temperature, device=device)
    return round(float(res["top1"][cfg.eval.knn_k]), 2)


def evaluate_run(
    run_dir: Path,
    cfg: Config,
    train_data: ImageDataset | None = None,
    test_data: ImageDataset | None = None,
    method: nn.Module | None = None,
    device=None,
    probe=None,
) -> dict:
    """Evaluate a run directory: eval.json + report.html, headline numbers into summary.json; returns the summary.

    ``method`` is the trained SSL method when the caller has it in memory (end of training); otherwise it is
    rebuilt from the last checkpoint, or only the exported backbone is evaluated when no checkpoint exists.
    """
    run_dir = Path(run_dir)
    t0 = time.time()
    device = device or select_device(cfg.train.device)
    if train_data is None:
        train_data, test_data = load_data(cfg)
    info = describe_data(train_data, cfg.data.name)
    mean, std = info.mean, info.std
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"method": cfg.method}
    if method is None:
        method = load_run_method(run_dir, cfg, info)
        encoder = load_run_encoder(run_dir, cfg, info, device, method)
    else:
        encoder = method.exports()["backbone"]
    projector = method.guillotine_head if method is not None else None
    view_maker = getattr(method, "view_maker", None) if method is not None else None
    labelled = test_data is not None and train_data.labels is not None and test_data.labels is not None
    extra = {"encoder": {"source": "run", "path": str(run_dir), "name": cfg.model.backbone},
             "run": {k: summary.get(k) for k in ("method", "recipe", "epochs", "steps", "batch_size", "lr",
                                                 "train_seconds", "samples_per_second", "device", "cpu",
                                                 "skipped_files", "nonfinite_steps", "collapse_warnings")}}
    extra["hyperparameters"] = run_hyperparameters(cfg, summary, _resolved_views(run_dir))
    reference = run_reference(cfg)
    if reference is not None:
        extra["reference"] = reference
    if labelled and cfg.eval.init_baseline and (run_dir / "init").exists():
        extra["knn_top1_init"] = init_knn(run_dir / "init", train_data, test_data, mean, std, cfg, device)
    if probe is None and "online_probe_top1" in summary:  # measured at the end of training; kept in the eval
        extra["online_probe_top1"] = summary["online_probe_top1"]
    plots = []
    if (run_dir / "metrics.jsonl").exists():
        plots = [str(p.relative_to(run_dir)) for p in plot_training(run_dir / "metrics.jsonl", run_dir)]
    result = evaluate_model(
        encoder, train_data, test_data, mean, std, cfg.eval,
        projector=projector, view_maker=_global_views(view_maker), device=device,
        dtype=autocast_dtype(cfg.train.precision, device), seed=cfg.seed, out_dir=run_dir,
        metrics_path=run_dir / "metrics.jsonl" if (run_dir / "metrics.jsonl").exists() else None,
        online_probe=probe, extra=extra,
    )
    for key in HEADLINE:
        if key in result:
            summary[key] = result[key]
    if "finetune" in result:  # eval.finetune=true
        summary["finetune_top1"] = result["finetune"]["top1"]
    summary.update(_baseline_fields(result))
    lf = result.get("label_free", {})
    for key, sub, field in (("rankme", "rankme", "value"), ("lidar", "lidar", "value"),
                            ("rotation_top1", "rotation", "top1")):
        if sub in lf:
            summary[key] = lf[sub][field]
    if "alpha_req" in lf and "alpha" in lf["alpha_req"]:
        summary["alpha_req"] = round(lf["alpha_req"]["alpha"], 3)
    summary["eval_seconds"] = round(time.time() - t0, 1)
    summary["plots"] = plots
    summary["eval"] = "eval.json" + (", report.html" if cfg.eval.report else "")
    save_json(summary_path, summary)
    print(f"selfsup eval: {headline(summary)}", flush=True)
    if cfg.eval.report:
        print(f"selfsup eval: report {run_dir / 'report.html'}", flush=True)
    return summary


def _baseline_fields(result: dict) -> dict:
    """``pixel_knn_top1``, ``pixel_linear_top1`` and ``below_baseline`` (sentences) for summary.json / the headline."""
    out = {}
    base = result.get("baselines") or {}
    for key in ("knn_top1", "linear_top1"):
        if base.get(key) is not None:
            out[f"pixel_{key}"] = base[key]
    if "below_baseline" in result:
        out["below_baseline"] = result["below_baseline"]
    return out


def headline(summary: dict) -> str:
    """One line of the evaluation's numbers; the pixel baselines in brackets and, when the run is below one of them,
    a sentence saying so (evaluate/baselines.py)."""
    parts = []
    names = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "mlp_top1": "MLP top-1",
             "finetune_top1": "fine-tune top-1", "online_probe_top1": "online probe", "rankme": "RankMe", "rotation_top1": "rotation proxy"}
    for key, name in names.items():
        if summary.get(key) is not None:
            parts.append(f"{name} {summary[key]:.2f}{'%' if key.endswith('top1') else ''}")
    if "knn_top1_init" in summary:
        parts.append(f"(untrained network: kNN {summary['knn_top1_init']:.2f}%)")
    pixels = [f"{name} {summary[key]:.2f}%" for key, name in (("pixel_knn_top1", "kNN"), ("pixel_linear_top1", "linear"))
              if summary.get(key) is not None]
    if pixels:
        parts.append(f"(pixel baseline: {', '.join(pixels)})")
    text = ", ".join(parts) if parts else "no labelled test split; label-free metrics only"
    warnings = summary.get("below_baseline") or []
    return text + "".join(f"\n  WARNING: {w}" for w in warnings)


def evaluate(
    model: nn.Module,
    data: str | tuple[ImageDataset, ImageDataset | None] = "fashion_mnist",
    *,
    out_dir: str | Path | None = None,
    mean=None,
    std=None,
    root: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    **eval_options,
) -> dict:
    """Evaluate any encoder (``nn.Module`` or callable mapping normalized ``(B, C, H, W)`` to ``(B, D)``) on a
    dataset the package reads (by name) or on ``(train, test)`` :class:`ImageDataset` s; returns the eval.json dict.

    ``eval_options`` are :class:`selfsup.config.EvalConfig` fields (``mlp=False``, ``knn_ks=[20]`` ...). ``mean`` /
    ``std`` default to the dataset's statistics. Example with a timm model::

        import timm
        from selfsup.evaluate import evaluate
        m = timm.create_model("resnet18", pretrained=True, num_classes=0, in_chans=1)
        evaluate(m, "fashion_mnist", out_dir="eval-timm", mlp=False)
    """
    opts = EvalConfig()
    for k, v in eval_options.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown evaluation option {k!r}.{did_you_mean(k, vars(opts))}")
        setattr(opts, k, v)
    if isinstance(data, str):
        from selfsup.data.datasets import load_dataset

        train = load_dataset(data, "train", root=root)
        try:
            test = load_dataset(data, "test", root=root)
        except (ValueError, KeyError):
            test = None
        name = data
    else:
        train, test = data
        name = train.name.split("/")[0]
    C = train.image_shape[0]
    if mean is None or std is None:
        mean, std = dataset_stats(name, channels=C)
    device = select_device(device or "auto")
    return evaluate_model(model, train, test, mean, std, opts, device=device, seed=seed, out_dir=out_dir,
                          extra={"encoder": {"source": "module", "name": type(model).__name__}})


def _backbone_stats(target: Path, cfg: Config, channels: int):
    """Normalization recorded in backbone.json at export time, else the dataset's statistics."""
    from selfsup.nn.backbones import _export_files

    meta = json.loads(_export_files(target)[1].read_text())
    if len(meta.get("mean") or []) == channels and len(meta.get("std") or []) == channels:
        return meta["mean"], meta["std"], "backbone.json"
    mean, std = dataset_stats(cfg.data.name, channels=channels)
    return mean, std, f"{cfg.data.name} statistics"


def _backbone_name(target: Path) -> str | None:
    from selfsup.nn.backbones import _export_files

    return (json.loads(_export_files(target)[1].read_text()).get("spec") or {}).get("name")


def evaluate_backbone(target: str | Path, cfg: Config) -> dict:
    """`selfsup eval BACKBONE data=NAME`: every protocol that needs no projector, on an exported backbone."""
    target = Path(target)
    device = select_device(cfg.train.device)
    encoder = load_backbone(target, raw=True).to(device)
    train_data, test_data = load_data(cfg)
    C = train_data.image_shape[0]
    in_chans = getattr(encoder, "in_chans", None)
    probe_x = torch.zeros(1, C, *train_data.image_shape[1:], device=device)
    try:
        encoder(probe_x)
    except RuntimeError as e:
        raise ValueError(f"the backbone in {target} does not accept {C}-channel "
                         f"{train_data.image_shape[1]}x{train_data.image_shape[2]} images of {cfg.data.name} "
                         f"(in_chans={in_chans}): {e}") from e
    mean, std, stats_from = _backbone_stats(target, cfg, C)
    out = Path(cfg.out) if cfg.out else (target if target.is_dir() else target.parent) / f"eval-{cfg.data.name}"
    print(f"selfsup eval: {target} on {train_data.name} ({len(train_data)} train"
          f"{f', {len(test_data)} test' if test_data is not None else ''}); normalization from {stats_from}; "
          f"writing {out}", flush=True)
    result = evaluate_model(encoder, train_data, test_data, mean, std, cfg.eval, device=device,
                            dtype=autocast_dtype(cfg.train.precision, device), seed=cfg.seed, out_dir=out,
                            extra={"encoder": {"source": "backbone", "path": str(target),
                                               "name": _backbone_name(target)}})
    flat = {**result, **_baseline_fields(result)}
    lf = result.get("label_free", {})
    if "rankme" in lf:
        flat["rankme"] = lf["rankme"]["value"]
    if "rotation" in lf:
        flat["rotation_top1"] = lf["rotation"]["top1"]
    print(f"selfsup eval: {headline(flat)}", flush=True)
    if cfg.eval.report:
        print(f"selfsup eval: report {out / 'report.html'}", flush=True)
    return result


QUICK_EVAL = ["eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0", "eval.report=false",
              "eval.guillotine=false", "eval.decoder=false", "eval.linear_aug=false", "eval.finetune=false"]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """`selfsup compare`: one row per run from its eval.json (evaluated first, quickly, when it has none)."""
    import yaml

    from selfsup.report.compare import write_compare_report

    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not (r / "config.yaml").exists():
            raise FileNotFoundError(f"{r} is not a selfsup run directory (no config.yaml)")
    configs = [flat_config(yaml.safe_load((r / "config.yaml").read_text())) for r in runs]
    datasets = {r.name: _dataset_of(c) for r, c in zip(runs, configs, strict=True)}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{name}: {d}" for name, d in datasets.items())
        raise ValueError(f"the runs were trained on different data ({listed}): RankMe and accuracies are not comparable "
                         "across datasets, so they are not ranked together. Compare the runs of one dataset at a time.")
    ignore = {"out", "description", "resume", "resolved_views"}
    varying = sorted(k for k in set().union(*configs)
                     if k.split(".")[0] not in ignore and len({json.dumps(c.get(k)) for c in configs}) > 1)
    rows = []
    for r, c in zip(runs, configs, strict=True):
        path = r / "eval.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if "rankme" not in result.get("label_free", {}):
            print(f"selfsup compare: {r} has no eval.json with RankMe; evaluating it (kNN, linear, RankMe)",
                  flush=True)
            evaluate_run(r, load_run_config(r, QUICK_EVAL))
            result = json.loads(path.read_text())
        lf = result.get("label_free", {})
        rows.append({"name": r.name, "path": str(r), "hparams": {k: c.get(k) for k in varying},
                     "rankme": lf.get("rankme", {}).get("value"),
                     "alpha_req": lf.get("alpha_req", {}).get("alpha"),
                     "knn_top1": result.get("knn_top1"), "linear_top1": result.get("linear_top1")})
    from selfsup.report.compare import compare_text

    print(compare_text(rows), flush=True)
    return write_compare_report(out_dir, rows)


def _dataset_of(config: dict) -> str:
    """What a run was trained and evaluated on: the dataset name, its folder for image folders, the splits and the
    imbalance of the training subset."""
    name = str(config.get("data.name"))
    if name == "folder":
        name += f" {config.get('data.root')}"
    extras = [f"{k.split('.')[-1]}={config[k]}" for k in ("data.train_split", "data.test_split")
              if config.get(k) not in (None, "train", "test")]
    if config.get("data.imbalance_ratio", 1.0) not in (1, 1.0):
        extras.append(f"imbalance_ratio={config['data.imbalance_ratio']}")
    return name + (f" ({', '.join(extras)})" if extras else "")
