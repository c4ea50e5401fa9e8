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
selfsup embed MODEL DATA --out F.npz    embeddings of a dataset (--split) or an image folder (.npz or .parquet)
selfsup embed --query IMG --index F.npz nearest neighbours of an image in an embeddings file [-k 5]
selfsup export MODEL --format onnx|timm --out PATH   the backbone as ONNX, or as timm weights + config
selfsup bench METHOD [key=value ...]   samples/s, overhead ratio, views/s (vs kornia), FLOPs (MFU on GPUs)
selfsup recipes                         list methods and recipes with the cookbook section each comes from"""


_SECTIONS = """config sections (key=value; `selfsup train METHOD --show-config` prints every key and value):
  epochs, batch_size, seed, out, resume, recipe    the run
  data.*     dataset (named, folder, hf), root, splits, image size (folder, hf), hf columns, on_error
  model.*    backbone, width, stem, patch size, projector
  views.*    crop sizes and scales, flips, colour jitter, blur, solarize, multi-crop
  optim.*    optimizer, base_lr and its batch rule, weight decay, warm-up, clipping
  train.*    device, precision, threads, accumulation, logging (metrics.jsonl, TensorBoard, W&B: train.wandb),
             checkpoints, collapse, non-finite steps
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
    _add_embed(sub)
    _add_export(sub)
    b = sub.add_parser("bench", help="training-step throughput and overhead ratio of a method's recipe", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="METHOD [key=value ...] [--steps N] [--threads N] [--json F]")
    return p


_MODEL_HELP = "a run directory, or an exported backbone (folder or .safetensors)"


def _add_embed(sub) -> None:
    e = sub.add_parser("embed", help="embeddings of a dataset or image folder; nearest-neighbour queries",
                       description="selfsup embed MODEL DATA --out FILE.npz|FILE.parquet, or "
                                   "selfsup embed --query IMAGE --index FILE [-k 5] (MODEL: the index's own by default)")
    e.add_argument("model", nargs="?", metavar="MODEL", help=_MODEL_HELP)
    e.add_argument("data", nargs="?", metavar="DATA", help="a dataset name (fashion_mnist, cifar10, ...) or a path "
                   "to an image folder (class sub-folders give labels) or image file")
    e.add_argument("--out", help="output file: .npz (NumPy) or .parquet (pyarrow)")
    e.add_argument("--split", default="train", help="split of a named dataset (default train)")
    e.add_argument("--root", help="where a named dataset lives (default: $SELFSUP_DATA, standard places, download)")
    e.add_argument("--image-size", type=int, help="side folder and query images are resized to (default: the "
                   "run's evaluation size; for a backbone, its ViT img_size or 64)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    e.add_argument("--query", metavar="IMAGE", help="an image to look up in --index")
    e.add_argument("--index", metavar="FILE", help="an embeddings file written by selfsup embed")
    e.add_argument("-k", type=int, default=5, help="neighbours to print (default 5)")


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="export a backbone as ONNX or as timm weights")
    x.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    x.add_argument("--format", required=True, choices=("onnx", "timm"), dest="fmt",
                   help="onnx: FILE.onnx (float images in [0, 1] in, features out); timm: a folder for "
                        "timm.create_model('local-dir:FOLDER', pretrained=True)")
    x.add_argument("--out", required=True, help="FILE.onnx, or the timm folder")
    x.add_argument("--image-size", type=int, help="input side of the ONNX graph (default: the run's evaluation size)")


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
        from selfsup.config_doc import commented_yaml

        print(commented_yaml(cfg), end="")
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
    finally:
        from selfsup.distributed import shutdown

        shutdown()  # before the interpreter exits: see selfsup.distributed.shutdown
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


def cmd_embed(args) -> int:
    """`selfsup embed`: write embeddings, or answer a nearest-neighbour query."""
    from selfsup import embed

    def run():
        if args.query or args.index:
            if not (args.query and args.index) or args.data or args.out:
                raise embed.EmbedError("a query is `selfsup embed --query IMAGE --index FILE [-k 5]` (optionally with "
                                       "MODEL first, when the model moved since the index was written)")
            hits = embed.query(args.index, args.query, args.k, source=args.model, device=args.device)
            print(embed.format_hits(hits))
            return
        if not (args.model and args.data and args.out):
            raise embed.EmbedError("usage: selfsup embed MODEL DATA --out FILE.npz|FILE.parquet [--split test] "
                                   "(or --query IMAGE --index FILE)")
        embed.embed(args.model, args.data, args.out, split=args.split, root=args.root, image_size=args.image_size,
                    batch_size=args.batch_size, device=args.device)

    return _run_tool(run)


def cmd_export(args) -> int:
    """`selfsup export MODEL --format onnx|timm --out PATH`."""
    from selfsup.export_formats import export

    def run():
        path = export(args.model, args.fmt, args.out, image_size=args.image_size)
        print(f"selfsup export: {args.fmt} -> {path}")

    return _run_tool(run)


def cmd_bench(args) -> int:
    """`selfsup bench METHOD [key=value ...]` (selfsup.bench; its --help lists the options)."""
    from selfsup import bench

    def run():
        try:
            bench.main(args.rest)
        except KeyError as e:  # an unknown method: the message names the closest ones
            raise ConfigError(e.args[0]) from e

    return _run_tool(run)


def _run_tool(run) -> int:
    """Run a tool command with the package's exit codes: 2 usage/config, 1 runtime failure."""
    from selfsup.data.datasets import DataError
    from selfsup.runtime import WriteError

    try:
        run()
    except ConfigError as e:  # EmbedError included: a usage mistake caught before any work
        print(f"selfsup: {e}", file=sys.stderr)
        return 2
    except (DataError, WriteError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        if os.environ.get("SELFSUP_DEBUG"):
            raise
        print(f"selfsup: error: {e}\n(set SELFSUP_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _hoist_show_config(argv: list[str]) -> list[str]:
    """``--show-config`` anywhere after ``train`` (before, between or after the overrides) moved right after it:
    argparse stops reading positionals at the first option, so `train simclr --show-config epochs=3` would fail."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] != "train" or "--show-config" not in argv[command + 1:]:
        return argv
    rest = [a for a in argv[command + 1:] if a != "--show-config"]
    return [*argv[:command + 1], "--show-config", *rest]


def main(argv: list[str] | None = None) -> int:
    argv = _hoist_show_config(list(sys.argv[1:] if argv is None else argv))
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
    if args.command == "embed":
        return cmd_embed(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "bench":
        return cmd_bench(args)
    _parser().print_help()
    return 2
