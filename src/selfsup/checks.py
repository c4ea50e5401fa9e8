"""Value checks of a config, so that a bad one is refused before any work (exit code 2, nothing written).

Two kinds, kept apart:

- :func:`check_values`: what a value may be, whatever the machine (a temperature is > 0, a probability lies in
  [0, 1], a size is >= 1). Run on every config built or read (:func:`selfsup.config.build_config`, a saved
  ``config.yaml``), so a run directory never holds a config that would not be accepted again.
- :func:`check_before_training`: what depends on this machine and file system (the device exists, ``out=`` can be a
  run directory and holds no other run, the batch splits over the launched processes). Run once by
  :func:`selfsup.pipeline.pretrain` before it reads data, so a typo costs no download and writes nothing.

A method's own sections (``simclr.temperature``) are checked by name (:func:`check_method_params`), one rule table for
every method instead of a validator per method file; a method still checks its parameters against each other and
the data when it is built (e.g. a queue smaller than the batch), which happens before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfsup.config import Config, ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# Rules: (test, what the value must be)

Rule = tuple[Callable[[Any], bool], str]

AT_LEAST_1: Rule = (lambda v: v >= 1, ">= 1")
AT_LEAST_2: Rule = (lambda v: v >= 2, ">= 2")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
POSITIVE: Rule = (lambda v: v > 0, "> 0")
UNIT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
UNIT_OPEN: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
SCALE_RANGE: Rule = (lambda v: 0 < v[0] <= v[1] <= 1, "a range [lo, hi] with 0 < lo <= hi <= 1")
POSITIVE_RANGE: Rule = (lambda v: 0 < v[0] <= v[1], "a range [lo, hi] with 0 < lo <= hi")
HUE: Rule = (lambda v: 0 <= v <= 0.5, "in [0, 0.5]")

# The keys every method shares. A key that is None ("the recipe decides") is not checked.
CORE_RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE, "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1,
    "data.image_size": AT_LEAST_1, "data.holdout": UNIT_OPEN, "data.imbalance_ratio": (lambda v: v >= 1, ">= 1 (1 = the balanced split)"),
    "model.width": AT_LEAST_1, "model.patch_size": AT_LEAST_1, "model.embed_dim": NON_NEGATIVE,
    "model.depth": NON_NEGATIVE, "model.num_heads": NON_NEGATIVE, "model.projector_hidden": AT_LEAST_1,
    "model.projector_out": AT_LEAST_1, "model.projector_layers": AT_LEAST_1,
    "views.size": AT_LEAST_1, "views.scale": SCALE_RANGE, "views.ratio": POSITIVE_RANGE, "views.hflip_p": UNIT,
    "views.jitter_p": UNIT, "views.brightness": NON_NEGATIVE, "views.contrast": NON_NEGATIVE,
    "views.saturation": NON_NEGATIVE, "views.hue": HUE, "views.gray_p": UNIT, "views.blur_p": UNIT,
    "views.solarize_p": UNIT, "views.n_local": NON_NEGATIVE, "views.local_size": AT_LEAST_1,
    "views.local_scale": SCALE_RANGE, "views.min_size": NON_NEGATIVE,
    "views.size_ramp": (lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1, "two fractions of training [a, b] with "
                        "0 <= a <= b <= 1"),
    "optim.base_lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.momentum": UNIT_OPEN,
    "optim.warmup_epochs": NON_NEGATIVE, "optim.final_lr": NON_NEGATIVE, "optim.clip_grad": NON_NEGATIVE,
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "optim.weight_decay_end": NON_NEGATIVE, "optim.no_decay_lr_scale": NON_NEGATIVE,
    "train.accumulate": AT_LEAST_1, "train.num_threads": NON_NEGATIVE, "train.checkpoint_every": NON_NEGATIVE,
    "train.log_every": AT_LEAST_1, "train.knn_every": NON_NEGATIVE, "train.knn_monitor_size": AT_LEAST_1,
    "train.probe_lr": POSITIVE, "train.max_steps": NON_NEGATIVE, "train.steps": NON_NEGATIVE, "train.nonfinite_limit": AT_LEAST_1,
    "eval.knn_k": AT_LEAST_1, "eval.knn_temperature": POSITIVE,
    "eval.knn_ks": (lambda v: all(k >= 1 for k in v), "a list of integers >= 1"),
    "eval.linear_epochs": AT_LEAST_1, "eval.finetune_epochs": AT_LEAST_1, "eval.finetune_train_size": NON_NEGATIVE,
    "eval.finetune_batch_size": AT_LEAST_2,
    "eval.lidar_images": NON_NEGATIVE, "eval.lidar_views": AT_LEAST_2, "eval.decoder_steps": AT_LEAST_1,
    "eval.tsne_points": NON_NEGATIVE,
    "train.budget": (lambda v: _is_duration(v), "a duration such as 10m, 90s, 1.5h or a number of seconds > 0"),
    "eval.linear_lrs": (lambda v: v is None or (len(v) > 0 and all(x > 0 for x in v)),
                        "null (the default grid) or a non-empty list of learning rates > 0"),
    "eval.linear_weight_decays": (lambda v: v is None or (len(v) > 0 and all(x >= 0 for x in v)),
                                  "null (the default grid) or a non-empty list of weight decays >= 0"),
}

# What a zero means for each key where 0 is allowed, so the message can say it (e.g. train.max_steps=0: all epochs).
ZERO_MEANS = {"train.num_threads": "torch's default", "train.checkpoint_every": "only at epoch ends",
              "train.knn_every": "off", "train.max_steps": "all epochs", "train.steps": "epochs x steps per epoch", "optim.clip_grad": "off",
              "eval.finetune_train_size": "every train image", "eval.lidar_images": "off",
              "views.min_size": "every crop at views.size", "model.embed_dim": "the ViT size's",
              "model.depth": "the ViT size's", "model.num_heads": "the ViT size's"}

# Method parameters, by name. Integers are >= 1 (a size, a count, a dimension) unless listed here or named *_epochs.
INT_ZERO_ALLOWED = {"patch_out_dim": "the [CLS] head's out_dim", "predictor_heads": "the encoder's heads",
                    "queue_length": "no queue", "kmeans_iterations": "no k-means refinement"}
FLOAT_POSITIVE = {"target_sharpen", "bin_size", "ipe_scale", "gamma", "sigma"}


def _is_duration(value: Any) -> bool:
    from selfsup.budget import parse_budget

    try:
        parse_budget(value)
    except ValueError:
        return False
    return True


def _float_rule(name: str) -> Rule | None:
    """The rule a method's float parameter follows, from its name (None: any finite number)."""
    if "temp" in name or name in FLOAT_POSITIVE:
        return POSITIVE
    if name == "crop_scale_min":
        return (lambda v: 0 < v <= 1, "in (0, 1]")
    if "smoothing" in name:  # label smoothing: 1 would make every target uniform
        return UNIT_OPEN
    if "momentum" in name or name.startswith("ema_") or any(s in name for s in ("ratio", "prob", "fraction")):
        return UNIT
    if "weight" in name or name.startswith(("lambd", "lambda_")) or name in ("eps", "epsilon", "rho", "cls_loss",
                                                                              "mask_noise_std", "power_law_tau"):
        return NON_NEGATIVE
    return None


def _method_rule(name: str, value: Any) -> Rule | None:
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return None
    if isinstance(value, int):
        if name == "seed" or name.endswith(("_epochs", "_epoch")) or name in INT_ZERO_ALLOWED:
            return NON_NEGATIVE
        return AT_LEAST_1
    if isinstance(value, float):
        return _float_rule(name)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return (lambda v: all(x >= 1 for x in v), "a list of integers >= 1")
    if isinstance(value, tuple) and len(value) == 2:
        return SCALE_RANGE if name.endswith("_scale") else POSITIVE_RANGE if name.endswith("_aspect") else None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Checks

def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _fail(key: str, value: Any, must: str) -> ConfigError:
    zero = f" (0 means {ZERO_MEANS[key]})" if key in ZERO_MEANS else ""
    shown = list(value) if isinstance(value, tuple) else value
    return ConfigError(f"{key}={shown!r} is out of range: it must be {must}{zero}")


def check_values(cfg: Config) -> None:
    """Every shared key against :data:`CORE_RULES`, then the method's section by name; raises :class:`ConfigError`."""
    for key, (ok, must) in CORE_RULES.items():
        value = _get(cfg, key)
        if value is not None and not ok(value):
            raise _fail(key, value, must)
    if cfg.views.n_local and cfg.views.local_size > cfg.views.size:
        raise ConfigError(f"views.local_size={cfg.views.local_size} is larger than the global crops' views.size="
                          f"{cfg.views.size}: multi-crop's local crops are the small ones (cookbook §3.1.1)")
    if cfg.train.budget is not None and cfg.optim.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is not less than epochs={cfg.epochs}: with "
                          f"train.budget the warm-up keeps its share of the recipe's epochs (warmup_epochs / epochs of "
                          f"the steps the budget fits), so it would cover the whole run and the learning rate would "
                          f"never reach its peak. Set epochs to the length the warm-up is a share of (epochs="
                          f"{math.ceil(cfg.optim.warmup_epochs * 10)} makes it a tenth), or lower optim.warmup_epochs")
    if cfg.params is not None:
        check_method_params(cfg.method, cfg.params)
    check_device_name(cfg.train.device)


def check_method_params(method: str, params: Any) -> None:
    """A method's own parameters by the rules of their names: ``*temp*`` > 0, momenta/ratios/probabilities in
    [0, 1], weights >= 0, counts and sizes >= 1 (``*_epochs`` and :data:`INT_ZERO_ALLOWED` >= 0)."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        rule = _method_rule(f.name, value)
        if rule is not None and not rule[0](value):
            zero = f" (0 means {INT_ZERO_ALLOWED[f.name]})" if f.name in INT_ZERO_ALLOWED else ""
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{method}.{f.name}={shown!r} is out of range: it must be {rule[1]}{zero}")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    if not _DEVICE.match(name):
        raise ConfigError(f"train.device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps")


def check_device_available(name: str) -> None:
    """The device ``train.device`` names exists on this machine (``auto`` always does)."""
    import torch

    check_device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use train.device=auto or train.device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but Apple's MPS is not available here; use train.device=auto or cpu")


def check_out_dir(out: str, *, resuming: bool) -> None:
    """``out=`` can become a run directory: not a file, a name the file system accepts, a writable parent; and,
    for a new run, a folder that holds no run yet."""
    path = Path(out).expanduser()
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"out=: the path component {part[:40]}... is {len(os.fsencode(part))} bytes long, more "
                              "than the 255 a file name may have; choose a shorter out=DIR")
    if len(os.fsencode(str(path.absolute()))) >= 4096:
        raise ConfigError("out=: the path is longer than the 4096 bytes a path may have; choose a shorter out=DIR")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder: the run directory holds several files (checkpoints, "
                          "metrics, the exported backbone); choose a folder, e.g. out=runs/NAME")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"out={out}: {ancestor} is a file, so no folder can be made below it; choose another out=DIR")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out}: {ancestor} is not writable by this user, so the run directory cannot be "
                          "written there; choose another out=DIR")
    if not resuming and path.is_dir() and ((path / "checkpoints" / "last.pt").exists() or
                                           (path / "config.yaml").exists()):
        raise ConfigError(f"{path} already holds a run. Continue it with resume=auto out={out}, or choose another "
                          "out=DIR for a new run")


def check_processes(cfg: Config, world_size: int) -> None:
    """The effective batch splits evenly over ``world_size`` processes x ``train.accumulate`` micro-batches."""
    parts = world_size * cfg.train.accumulate
    if cfg.batch_size % parts:
        raise ConfigError(f"batch_size={cfg.batch_size} is the effective batch, split over {world_size} process(es) x "
                          f"train.accumulate={cfg.train.accumulate} micro-batches = {parts} parts: it is not "
                          f"divisible; use a multiple of {parts}, e.g. batch_size={max(parts, cfg.batch_size // parts * parts)}")


def check_fsdp(cfg: Config, world_size: int, device_type: str = "cpu") -> None:
    """``train.fsdp=true`` with what it can run correctly (selfsup.fsdp): several processes, an element-wise
    optimizer, and not yet with ``train.compile`` or ``train.budget``."""
    if not cfg.train.fsdp:
        return
    from selfsup.fsdp import check_fsdp as check

    try:
        check(cfg.optim.name, world_size, device_type)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, on in (("train.compile", cfg.train.compile), ("train.budget", cfg.train.budget is not None)):
        if on:
            raise ConfigError(f"train.fsdp=true does not combine with {key} yet (untested: the budget times a copy of "
                              f"the model, compilation wraps modules FSDP also wraps); drop {key} or train.fsdp")


def check_extras(cfg: Config) -> None:
    """The optional packages the config asks for are installed (W&B logging, Hugging Face datasets)."""
    import importlib.util

    from selfsup.data.datasets import canonical_name

    wanted = {"wandb": ("train.wandb=true", "wandb")} if cfg.train.wandb else {}
    if canonical_name(cfg.data.name) == "hf":
        wanted["datasets"] = ("data=hf", "hf")
    for module, (setting, extra) in wanted.items():
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{setting} needs the {module} package, which is not installed: pip install "
                              f"'selfsup[{extra}]' (or pip install {module})")


def check_before_training(cfg: Config, *, resuming: bool) -> None:
    """The checks that depend on this machine, made before any data is read or file written (see module doc)."""
    check_values(cfg)
    check_device_available(cfg.train.device)
    check_extras(cfg)
    env = os.environ  # torchrun's variables, or srun's (selfsup.distributed reads the same)
    world_size = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or "1")
    check_processes(cfg, world_size)
    check_fsdp(cfg, world_size, "cuda" if cfg.train.device.startswith("cuda") else "cpu")
    if cfg.out is not None and int(env.get("RANK") or env.get("SLURM_PROCID") or "0") == 0:  # rank 0 writes the run
        check_out_dir(cfg.out, resuming=resuming)


__all__ = ["check_values", "check_method_params", "check_before_training", "check_device_available",
           "check_extras", "check_fsdp", "check_out_dir", "check_processes"]
