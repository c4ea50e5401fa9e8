"""The `selfsup` command: train, eval, recipes. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error, 75
preempted (SIGTERM/SIGUSR1: a checkpoint was written; requeue and resume), 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import os
import sys

from selfsup.config import ConfigError, build_config, parse_override, recipe_names

USAGE = """selfsup train METHOD [key=value ...]   train a method, then evaluate it (e.g. selfsup train simclr epochs=2)
selfsup eval RUN_DIR [key=value ...]    evaluate a run: eval.json + report.html (every protocol of cookbook §3.7)
selfsup eval BACKBONE data=NAME         evaluate an exported backbone (folder or .safetensors) on a dataset
selfsup compare RUN_DIR... [--out DIR]  rank runs by RankMe and by probe accuracy side by side (cookbook Table 3)
selfsup recipes                         list methods and recipes with the cookbook section each comes from"""


_SECTIONS = """config sections (key=value; `selfsup train METHOD --show-config` prints every key and value):
  epochs, batch_size, seed, out, resume, recipe    the run
  data.*     dataset, root, splits, folder image size, on_error
  model.*    backbone, width, stem, patch size, projector
  views.*    crop sizes and scales, flips, colour jitter, blur, solarize, multi-crop
  optim.*    optimizer, base_lr and its batch rule, weight decay, warm-up, clipping
  train.*    device, precision, threads, accumulation, logging, checkpoints, collapse, non-finite steps
  eval.*     kNN, linear/MLP probes, fine-tuning, label-free metrics, report (eval=false: none)
  METHOD.*   the method's own parameters (e.g. simclr.temperature)"""


def _parser() -> argparse.ArgumentParser:
    from selfsup import __version__

    p = argparse.ArgumentParser(prog="selfsup", usage=USAGE,
                                description="The Cookbook of Self-Supervised Learning as software.")
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a method", epilog=_SECTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=10 optim.base_lr=0.5 data=folder")
    t.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    e = sub.add_parser("eval", help="evaluate a run directory or an exported backbone")
    e.add_argument("run_dir", metavar="TARGET", help="a run directory, or an exported backbone (folder or file)")
    e.add_argument("overrides", nargs="*", help="key=value, e.g. eval.mlp=false eval.decoder=true data=cifar10")
    c = sub.add_parser("compare", help="compare runs by RankMe and probe accuracy")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="compare", help="folder for compare.html (default ./compare)")
    sub.add_parser("recipes", help="list methods and recipes")
    return p


def cmd_recipes() -> int:
    from importlib import resources

    import yaml

    from selfsup.methods import REGISTRY

    root = resources.files("selfsup") / "recipes"
    for name, entry in sorted(REGISTRY.items()):
        print(f"{name:10s} {entry.family}: {entry.summary}  [cookbook {entry.cookbook}]")
        for r in recipe_names(name):
            meta = yaml.safe_load((root / name / f"{r}.yaml").read_text()) or {}
            base = f"  (extends {meta['extends']})" if meta.get("extends") else ""
            print(f"  recipe={r:14s} {meta.get('description', '')}{base}  [cookbook {meta.get('cookbook', '-')}]")
    presets = recipe_names("datasets")
    if presets:
        print("datasets   presets a recipe extends (extends: datasets/NAME); a recipe of its own overrides them")
        for r in presets:
            meta = yaml.safe_load((root / "datasets" / f"{r}.yaml").read_text()) or {}
            print(f"  preset=datasets/{r:14s} {meta.get('description', '')}")
    return 0


def cmd_train(args) -> int:
    import yaml

    from selfsup.methods import get_method

    try:
        entry = get_method(args.method)
    except KeyError as e:
        print(f"selfsup: {e.args[0]}", file=sys.stderr)
        return 2
    from selfsup.runs import CheckpointError, open_resume

    state = None
    try:
        resuming = any(k == "resume" and v is not None for k, v in map(parse_override, args.overrides))
        if resuming:  # the run's own saved config is the base, not today's recipe; its checkpoint is read once
            cfg, state = open_resume(args.method, args.overrides)
        else:
            cfg = build_config(args.method, args.overrides, params_cls=entry.params_cls)
    except ConfigError as e:
        print(f"selfsup: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 1
    if args.show_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from selfsup.data.datasets import DataError
    from selfsup.monitor import CollapseError
    from selfsup.pipeline import pretrain
    from selfsup.runtime import WriteError
    from selfsup.train import Preempted

    try:
        pretrain(cfg, state=state)
    except Preempted as e:
        print(f"selfsup: preempted: {e}", file=sys.stderr)
        return Preempted.EXIT_CODE
    except DataError as e:
        print(f"selfsup: data error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # a method's own parameter check, made when it is built (after the data is read)
        print(f"selfsup: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ImportError, CollapseError) as e:
        if os.environ.get("SELFSUP_DEBUG"):
            raise
        print(f"selfsup: error: {e}\n(set SELFSUP_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except WriteError as e:  # a full disk, a quota, a read-only folder: the message names the file and the fix
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from selfsup.data.datasets import DataError
    from selfsup.evaluate.run import evaluate_backbone, evaluate_run
    from selfsup.runs import load_run_config

    target = Path(args.run_dir)
    try:
        if (target / "config.yaml").exists():
            cfg = load_run_config(target, args.overrides)
            run = lambda: evaluate_run(target, cfg)  # noqa: E731
        else:
            cfg = _eval_only_config(args.overrides)
            run = lambda: evaluate_backbone(target, cfg)  # noqa: E731
    except ConfigError as e:
        print(f"selfsup: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"selfsup: {e}", file=sys.stderr)
        return 2
    try:
        run()
    except DataError as e:
        print(f"selfsup: data error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("SELFSUP_DEBUG"):
            raise
        print(f"selfsup: error: {e}\n(set SELFSUP_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    return 0


def _eval_only_config(overrides: list[str]):
    """Config for evaluating a bare backbone: data.*, eval.*, train.device/precision, seed and out apply."""
    from selfsup.config import Config, _set, parse_override

    cfg = Config(method="none")
    for o in overrides:
        key, value = parse_override(o)
        if key == "data" and isinstance(value, str):
            key = "data.name"
        if key.split(".")[0] not in ("data", "eval", "train", "seed", "out"):
            raise ConfigError(f"'{key}' does not apply when evaluating a backbone; use data.*, eval.*, "
                              "train.device, train.precision, seed or out")
        _set(cfg, key, value)
    if not any(o.split("=")[0] in ("data", "data.name") for o in overrides):
        raise ConfigError("evaluating an exported backbone needs the dataset: add data=NAME "
                          "(e.g. data=fashion_mnist, data=cifar10, data=folder data.root=DIR)")
    return cfg


def cmd_compare(args) -> int:
    from selfsup.evaluate.run import compare_runs

    try:
        path = compare_runs(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"selfsup: {e}", file=sys.stderr)
        return 2
    print(f"selfsup compare: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from selfsup.runtime import tune_malloc

    tune_malloc()
    if args.command == "train":
        return cmd_train(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "compare":
        return cmd_compare(args)
    if args.command == "recipes":
        return cmd_recipes()
    _parser().print_help()
    return 2
