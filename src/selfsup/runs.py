"""A run as files, and loading it: its saved config, its data, its method, its checkpoint, and what resuming it
may change.

Training (`resume=`), `selfsup eval RUN_DIR` and `selfsup compare` read runs through these functions, so a run is
always rebuilt from what it saved, never from today's recipe defaults. This is the one module that builds a method
by name (:func:`build_method`); the trainer receives it built.

Resuming continues the run that was started: the saved config is the base. Overrides that would change what is
trained (method, recipe, model, data, batch, optimizer, views, seed, precision, ...) are refused with the reason;
the few in ``RESUMABLE`` (more epochs, evaluation options, threads, logging, device, where the data lives) are applied,
printed and written to the run's ``config.yaml``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
import yaml

from selfsup.config import Config, ConfigError, _set, config_from_dict, parse_override
from selfsup.data.datasets import ImageDataset, canonical_name, load_dataset
from selfsup.data.holdout import holdout_split
from selfsup.data.imbalance import power_law_subset
from selfsup.data.types import DataInfo

CHECKPOINT = "checkpoints/last.pt"
REQUIRED_KEYS = ("method", "optimizer", "step", "config")
CHECKPOINT_FORMAT = 1  # raised when a checkpoint's layout changes in a way older readers cannot load

# Keys a resume may change (a trailing "." is a whole section). Everything else is what the run *is*.
RESUMABLE = ("epochs", "out", "resume", "eval.", "train.num_threads", "train.max_steps", "train.steps", "train.log_every",
             "train.checkpoint_every", "train.knn_every", "train.nonfinite_limit", "train.collapse",
             "train.knn_monitor_size", "train.device", "train.compile", "train.fsdp", "train.wandb", "train.wandb_project", "train.wandb_mode",
             "data.root", "data.download", "data.verify")


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded: truncated, corrupt, foreign or tampered with."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a selfsup checkpoint to the CPU with ``weights_only=True``; anything else is a :class:`CheckpointError`.

    PyTorch's own errors are replaced: for a refused file its text advises ``weights_only=False``, which would run
    whatever code the file carries, and for a truncated one it is a zip-reader error that names no cause.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...)
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused or "Weights only load failed" in str(e):
            what = f"it references the Python object {refused.group(1)}" if refused else "it holds Python objects"
            raise CheckpointError(
                f"{path} was refused and not loaded: {what}, which a selfsup checkpoint never contains. It is not a "
                "selfsup checkpoint, or it was modified after it was written. selfsup loads checkpoints as weights "
                "only and never runs code from a file; use a checkpoint written by selfsup."
            ) from None
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}): it is truncated or corrupt, e.g. cut off by a crash or a "
            "full disk while it was copied, or not a checkpoint at all. Use an intact copy, or start the run again "
            "in a new out=DIR."
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a selfsup checkpoint: it lacks {', '.join(REQUIRED_KEYS)} "
                              f"(found {keys})")
    fmt = state.get("format", 1)  # checkpoints written before the field existed are format 1
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        from selfsup import __version__

        raise CheckpointError(f"{path} was written by selfsup {state.get('selfsup', '?')} in checkpoint format {fmt}, "
                              f"which this selfsup ({__version__}, format {CHECKPOINT_FORMAT}) cannot read: upgrade "
                              "selfsup to resume or evaluate it")
    return state


def load_method_state(method, state: dict, path) -> None:
    """Load a checkpoint's ``method`` state, turning a mismatch (another method, other model settings, or a version
    whose modules differ) into a :class:`CheckpointError` that says which."""
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as e:
        missing = [k for k in method.state_dict() if k not in state["method"]][:3]
        unexpected = [k for k in state["method"] if k not in method.state_dict()][:3]
        detail = (f"missing {missing}, unexpected {unexpected}" if missing or unexpected else
                  str(e).splitlines()[-1].strip())
        raise CheckpointError(f"{path} does not fit this {type(method).__name__} ({detail}): it was written by "
                              f"selfsup {state.get('selfsup', '?')} for another method or other model settings. "
                              "Resume it with the selfsup version and config that wrote it, or start a new run.") \
            from None


def config_from_saved(saved: dict) -> Config:
    """A :class:`Config` from a saved config (``config.yaml`` or a checkpoint's ``config``), method section included."""
    from selfsup.methods import get_method

    d = copy.deepcopy(saved)
    d.pop("resolved_views", None)  # written for the reader; the method's view recipe rebuilds them
    method = d.get("method")
    if not isinstance(method, str):
        raise ConfigError("the saved config names no method; is this a selfsup run?")
    params = d.pop(method, None)
    try:
        entry = get_method(method)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    cfg = config_from_dict(d, entry.params_cls)
    for k, v in (params or {}).items():
        _set(cfg, f"{method}.{k}", v)
    return cfg


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The config a run directory saved in ``config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a selfsup run directory?")
    return config_from_saved(read_saved_config(path))


def read_saved_config(path: Path) -> dict:
    """A run's ``config.yaml`` as a dict; a file that is not one (cut short, emptied, edited into invalid YAML) is a
    :class:`ConfigError` naming it, not a YAML traceback."""
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({type(e).__name__}): it was cut short or edited. Restore it "
                          "(its checkpoint holds the same config), or start the run again in a new out=DIR") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("method"), str):
        raise ConfigError(f"{path} holds no selfsup config (empty or cut short, no 'method'). Restore it, or start the "
                          "run again in a new out=DIR")
    return saved


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every key of two config dicts whose values differ."""
    a, b = flat_config(before), flat_config(after)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def refused_changes(changes: dict[str, tuple]) -> list[str]:
    """Human-readable reasons for the changes a resume must not make (empty when every change is allowed)."""
    reasons = []
    for key, (old, new) in changes.items():
        if not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            reasons.append(f"{key}={new!r} (the run was trained with {key}={old!r})")
        elif key == "epochs" and new < old:
            reasons.append(f"epochs={new} is fewer than the run's {old} epochs (use train.max_steps=N to stop "
                           "earlier; epochs can only grow on resume)")
        elif key == "train.steps" and old and 0 < new < old:
            reasons.append(f"train.steps={new} is fewer than the run's {old} steps (use train.max_steps=N to stop "
                           "earlier; the run's length can only grow on resume)")
    return reasons


def resume_config(method: str, overrides: list[str]) -> Config:
    """The config that continues a run (see :func:`open_resume`, which also returns its checkpoint)."""
    return open_resume(method, overrides)[0]


def open_resume(method: str, overrides: list[str]) -> tuple[Config, dict | None]:
    """The config that continues a run (its saved config, then the overrides a resume may change) and the
    checkpoint it continues from (None when the run stopped before its first one), read once.

    ``overrides`` hold ``resume=auto`` (with ``out=RUN_DIR``) or ``resume=PATH`` (a checkpoint; the run directory is
    ``out`` or the checkpoint's run). The changes are printed and kept in the state's ``changes``. Raises
    :class:`ConfigError` when there is no run to resume or an override would train a different run.
    """
    pairs = [parse_override(o) for o in overrides]
    values = {("data.name" if k == "data" and isinstance(v, str) else k): v for k, v in pairs}
    resume = str(values.get("resume"))
    if resume == "auto":
        if values.get("out") is None:
            raise ConfigError("resume=auto needs the run directory: add out=RUN_DIR")
        run_dir = Path(str(values["out"])).expanduser()
        ckpt = run_dir / CHECKPOINT
    else:
        ckpt = Path(resume).expanduser()
        if not ckpt.is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file (use resume=auto out=RUN_DIR to continue "
                              "a run from its last checkpoint)")
        run_dir = Path(str(values["out"])).expanduser() if values.get("out") is not None else ckpt.parent.parent
    state = None
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        saved, source = state["config"], ckpt
    elif (run_dir / "config.yaml").is_file():  # started, stopped before its first checkpoint: step 0 of that run
        saved, source = read_saved_config(run_dir / "config.yaml"), run_dir / "config.yaml"
    else:
        raise ConfigError(f"resume: {run_dir} holds no run to resume (no {CHECKPOINT}, no config.yaml). Check "
                          "out=, or drop resume= to start a new run there.")
    if saved.get("method") != method:
        raise ConfigError(f"{source} is a {saved.get('method')!r} run, not {method!r}: resume it with "
                          f"`selfsup train {saved.get('method')} resume=auto out={run_dir}`")
    base = config_from_saved(saved)
    cfg = copy.deepcopy(base)
    for k, v in pairs:
        if k == "recipe":
            if str(v) != base.recipe:
                raise ConfigError(f"resume: recipe={v} differs from the run's recipe {base.recipe!r}; a resumed "
                                  "run continues the run that was started. Start a new run with another out=DIR.")
            continue
        if k == "method":
            continue
        _set(cfg, "data.name" if k == "data" and isinstance(v, str) else k, v)
    cfg.resume, cfg.out = resume, str(run_dir)
    if "epochs" in values and "train.steps" not in values and cfg.epochs != base.epochs:
        cfg.train.steps = 0  # more epochs on resume: the run trains them all, not the steps a budget chose
    changes = {k: c for k, c in config_changes(base.to_dict(), cfg.to_dict()).items() if k not in ("resume", "out")}
    refused = refused_changes(changes)
    if refused:
        raise ConfigError("resume would train a different run than the one started in "
                          f"{run_dir}:\n  " + "\n  ".join(refused) + "\nA resumed run keeps its method, model, data, "
                          "batch, optimizer, views and seed; it may change epochs (more), train.steps (more), eval.*, "
                          "train.num_threads, "
                          "train.max_steps, logging and checkpoint intervals, train.device and data.root. To train "
                          "with other settings, start a new run with another out=DIR.")
    if state is not None:
        _record_changes(state, changes)
    return cfg, state


def _record_changes(state: dict, changes: dict[str, tuple]) -> None:
    """Print what a resume changes and keep it in the state (the trainer writes it into the run's segments)."""
    for key, (old, new) in changes.items():
        print(f"selfsup: resume changes {key}: {old!r} -> {new!r}", flush=True)
    state["changes"] = {k: list(c) for k, c in changes.items()}


def resume_state(cfg: Config) -> dict | None:
    """The checkpoint ``cfg.resume`` names (None: start at step 0), after checking that ``cfg`` continues that run.

    For Python callers that set ``resume=`` on a config themselves; the CLI uses :func:`open_resume`, which reads the
    checkpoint once for both the config and the state.
    """
    if cfg.resume is None:
        return None
    run_dir = Path(cfg.out or ".")
    path = run_dir / CHECKPOINT if cfg.resume == "auto" else Path(cfg.resume).expanduser()
    if not path.exists():
        if cfg.resume == "auto" and (run_dir / "config.yaml").exists():
            print(f"selfsup: {run_dir} stopped before its first checkpoint: training it from step 0", flush=True)
            return None
        where = f"{run_dir} holds no run to resume (no {CHECKPOINT})" if cfg.resume == "auto" else \
            f"resume={cfg.resume}: no such checkpoint"
        raise ConfigError(f"{where}; drop resume= to start a new run")
    state = load_checkpoint(path)
    saved = config_from_saved(state["config"]).to_dict()  # keys added since the run started take their defaults
    changes = {k: c for k, c in config_changes(saved, cfg.to_dict()).items() if k not in ("resume", "out")}
    refused = refused_changes(changes)
    if refused:
        raise ConfigError(f"resuming {path} with this config would train a different run: " + "; ".join(refused) +
                          ". Build the config with selfsup.runs.resume_config, or start a new run.")
    _record_changes(state, changes)
    return state


def build_method(cfg: Config, data: DataInfo):
    """The method ``cfg.method`` names, built from the data's description (weights initialized from ``cfg.seed``)."""
    from selfsup.methods import get_method

    try:
        entry = get_method(cfg.method)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    torch.manual_seed(cfg.seed)
    try:
        return entry.build(cfg, data)
    except ConfigError:
        raise
    except ValueError as e:  # a method checks its parameters against each other and the data when it is built
        raise ConfigError(str(e)) from e


def load_run_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """The run's saved config (``config.yaml``), then ``overrides`` (evaluation options, device, data.root)."""
    cfg = read_run_config(run_dir)
    for o in overrides or []:
        _set(cfg, *parse_override(o))
    return cfg


def load_run_method(run_dir: str | os.PathLike, cfg: Config, data: DataInfo):
    """The whole SSL method (encoder, heads, view maker) from ``checkpoints/last.pt``, or None without one."""
    ckpt = Path(run_dir) / CHECKPOINT
    if not ckpt.exists():
        return None
    method = build_method(cfg, data)
    load_method_state(method, load_checkpoint(ckpt), ckpt)
    return method.eval()


def load_run_encoder(run_dir: str | os.PathLike, cfg: Config, data: DataInfo, device, method=None):
    """The exported backbone when there is one, else the encoder inside the last checkpoint (of ``method`` when the
    caller has loaded it already with :func:`load_run_method`, so the checkpoint is not read twice)."""
    from selfsup.nn.backbones import load_backbone

    run_dir = Path(run_dir)
    if (run_dir / "backbone.safetensors").exists():
        return load_backbone(run_dir, raw=True).to(device)
    method = method if method is not None else load_run_method(run_dir, cfg, data)
    if method is None:
        raise FileNotFoundError(f"{run_dir} has neither backbone.safetensors nor {CHECKPOINT} to evaluate")
    return method.exports()["backbone"].to(device).eval()


def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset | None]:
    """The run's train split and its labelled test split (None when there is none to evaluate on)."""
    d = cfg.data
    name = canonical_name(d.name)
    kw = dict(root=d.root, download=d.download, on_error=d.on_error, verify=d.verify, image_size=_source_size(cfg),
              image_column=d.image_column, label_column=d.label_column)
    train = load_dataset(name, d.train_split, **kw)
    if name in ("folder", "hf"):  # the test images at the train images' size, whatever theirs are
        kw["image_size"] = train.image_shape[1]
    if d.imbalance_ratio != 1.0:
        train = power_law_subset(train, d.imbalance_ratio, cfg.seed)
        sizes = torch.bincount(train.labels, minlength=train.num_classes or 0).tolist()
        print(f"selfsup: data.imbalance_ratio={d.imbalance_ratio:g}: training on {len(train)} images, class sizes "
              f"{sizes} (the test split is unchanged)", flush=True)
    if not d.test_split or train.labels is None:
        return train, None
    if name in ("folder", "hf") and not _has_test_split(cfg):
        return _held_out(cfg, train)
    test = load_dataset(name, d.test_split, **kw)
    if train.classes and test.classes and train.classes != test.classes:
        raise ValueError(f"the train and test splits have different classes ({train.classes} vs {test.classes}); "
                         "their labels would not match")
    return train, test


def _source_size(cfg: Config) -> int | None:
    """The side folder and hf images are resized to: ``data.image_size`` when set. Unset, the images decide (None),
    except for a folder whose view size was chosen: it is read at ``views.size``, as before the images could decide
    (so runs saved then are evaluated and resumed on the images they were trained on)."""
    d = cfg.data
    if d.image_size is not None or canonical_name(d.name) != "folder" or "views.size" in cfg.follow_images:
        return d.image_size
    return cfg.views.size


def _has_test_split(cfg: Config) -> bool:
    d = cfg.data
    if canonical_name(d.name) == "hf":
        from selfsup.data.hf import has_split

        return has_split(d.root, d.test_split)
    return (Path(d.root).expanduser() / d.test_split).is_dir()


def _held_out(cfg: Config, train: ImageDataset) -> tuple[ImageDataset, ImageDataset | None]:
    """A labelled folder or hf dataset without a test split: a stratified part of its images held out as one
    (evaluating on the training images would report a number that is not a test accuracy)."""
    d = cfg.data
    where = f"{d.root} has no '{d.test_split}' " + ("split" if canonical_name(d.name) == "hf" else "sub-folder")
    if d.holdout > 0:
        train, test = holdout_split(train, d.holdout, cfg.seed)
        if len(test):
            print(f"selfsup: {where}: {len(test)} images ({d.holdout:g} of each class, seed {cfg.seed}) are held out "
                  f"as the test split and not trained on; {len(train)} are trained on (data.holdout=0 trains on all, "
                  "without label-based evaluation)", flush=True)
            return train, test
    print(f"selfsup: {where} and data.holdout leaves no image out: label-based evaluation is skipped (add a "
          f"'{d.test_split}' split or set data.holdout)", flush=True)
    return train, None


def settle_sizes(cfg: Config, train: ImageDataset) -> None:
    """Set the view sizes that follow the training images, in ``cfg``, before the method is built and config.yaml is
    written (so a resume and ``selfsup eval`` see what training saw).

    Only the keys in ``cfg.follow_images`` change: the recipe's size was written for another dataset and nobody set
    it (a folder of 96-pixel photos should not be trained on Fashion-MNIST's 28-pixel views). ``views.size`` becomes
    the images' side (a multiple of ``model.patch_size`` for a ViT), multi-crop's ``views.local_size`` keeps the
    recipe's ratio to it, and one line says so. A folder's or hf dataset's ``data.image_size`` is recorded as the
    side its images were read at. An explicit ``views.size`` always wins (it is never in ``follow_images``).
    """
    follow, cfg.follow_images = cfg.follow_images, frozenset()  # settled once: a second call changes nothing
    if "views.size" not in follow:
        return
    side = min(train.image_shape[1:])
    if canonical_name(cfg.data.name) in ("folder", "hf") and cfg.data.image_size is None:
        cfg.data.image_size = side
    v, unit = cfg.views, cfg.model.patch_size if cfg.model.backbone.startswith("vit") else 1
    size, local = max(unit, side // unit * unit), v.local_size
    if "views.local_size" in follow and v.n_local:
        local = min(size, max(unit, round(size * v.local_size / v.size / unit) * unit))
    if (size, local) == (v.size, v.local_size):
        return
    notes = (f" (a multiple of model.patch_size={unit})" if size != side else "") + \
        (f", views.local_size {local} (the recipe's {v.local_size}/{v.size} ratio)" if local != v.local_size else "")
    print(f"selfsup: views.size follows the images: {size}{notes} (set views.size=N to choose; the recipe's "
          f"{v.size} was written for its own dataset)", flush=True)
    v.size, v.local_size = size, local
    from selfsup.checks import check_values

    check_values(cfg)
