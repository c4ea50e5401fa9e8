"""Typed configuration: dataclass defaults -> a recipe YAML shipped in the package -> `key=value` overrides.

Plain dataclasses plus ~100 lines of validation rather than pydantic/Hydra/OmegaConf: no extra dependency, no API churn,
and the error we want (unknown key -> the closest valid key, wrong type -> the expected type, exit code 2 before any
work) is easy to get exactly right. Method-specific settings live in a section named after the method
(`simclr.temperature=0.2`), typed by the dataclass the method registers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from selfsup.names import closest, did_you_mean


class ConfigError(ValueError):
    """A bad recipe name, key or value. The CLI turns it into exit code 2 before any work is done."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"           # fashion_mnist | mnist | cifar10 | cifar100 | stl10 | folder | hf
    root: str | None = None               # explicit data folder; else $SELFSUP_DATA, standard places, download
    train_split: str = "train"
    test_split: str | None = "test"       # None: no labelled evaluation split
    image_size: int | None = None         # folder and hf: images are resized once to this side (folders: cached);
                                          # None: the images decide (recorded in the run's config.yaml)
    on_error: str = "skip"                # folder only: skip (and count) or raise on unreadable files
    download: bool = True
    verify: bool = True                   # check official files against their published md5 (CIFAR); false for
                                          # your own files in an official format
    holdout: float = 0.1                  # a labelled folder without a test sub-folder: this stratified fraction of
                                          # each class is held out (not trained on) as its test split; 0: none
    imbalance_ratio: float = 1.0          # > 1: train on a power-law class-imbalanced subset of the train split
                                          # (largest / smallest class; selfsup.data.imbalance); the test split stays
    image_column: str = "image"           # hf only (a dataset saved with save_to_disk): the column of images
    label_column: str | None = "label"    # hf only: the column of integer labels; null (or no such column): none


@dataclass
class ModelConfig:
    backbone: str = "resnet18"            # resnet10/18/34/50, vit_tiny/small/base, timm:<name>
    width: int = 64                       # ResNet base width (64 = the standard ResNet)
    stem: str = "cifar"                   # cifar | imagenet | small (ResNet only)
    patch_size: int = 4                   # ViT only
    pool: str = "cls"                     # ViT only: cls | mean
    embed_dim: int = 0                    # ViT only: token width (0 = the named size's: 192 tiny, 384 small, 768 base)
    depth: int = 0                        # ViT only: blocks (0 = the named size's: 12)
    num_heads: int = 0                    # ViT only: attention heads (0 = the named size's: 3 tiny, 6 small, 12 base)
    projector_hidden: int = 2048
    projector_out: int = 128
    projector_layers: int = 2
    projector_last_bn: bool = False


@dataclass
class ViewsConfig:
    """Augmentation settings applied on top of the method's view recipe (SimCLR: two symmetric views; BYOL: the
    asymmetric blur/solarize pair). None means "the method's recipe decides"; the values each view really uses are
    written to the run's config.yaml under `resolved_views`."""
    size: int = 32                        # global crop size
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip_p: float | None = None
    jitter_p: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    gray_p: float | None = None
    blur_p: float | None = None
    solarize_p: float | None = None
    n_local: int = 0                      # multi-crop (cookbook §3.1.1): number of small crops
    local_size: int = 16
    local_scale: tuple[float, float] = (0.05, 0.4)
    min_size: int = 0                     # progressive resolution (FFCV-SSL; selfsup.data.progressive): global crops
                                          # start at this side and grow to `size`; 0: off
    size_ramp: tuple[float, float] = (0.74, 0.86)  # the fractions of training between which the side grows
                                          # (ffcv-imagenet rn50_88_epochs.yaml: 160 -> 192 px over epochs 65-76 of 88)


@dataclass
class OptimConfig:
    name: str = "lars"                    # sgd | adamw | lars
    base_lr: float = 0.3
    lr_rule: str = "linear"               # linear: base_lr*B/256 | sqrt: base_lr*sqrt(B) | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    final_lr: float = 0.0                 # cosine decays to final_lr * lr
    clip_grad: float = 0.0                # clip the global gradient norm to this (0: off; DINO uses 3.0)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW; MAE uses (0.9, 0.95)
    weight_decay_end: float | None = None  # cosine schedule of the weight decay to this (DINO: 0.04 -> 0.4); None: constant
    no_decay_lr_scale: float = 1.0        # lr multiplier of the no-decay group (biases, norms); Barlow Twins
                                          # main.py: 0.0048 / 0.2 = 0.024 (cookbook §3.5.2)


@dataclass
class TrainConfig:
    device: str = "auto"                  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    precision: str = "auto"               # auto | fp32 | bf16
    channels_last: str = "auto"           # auto | true | false
    compile: bool = False                 # torch.compile each network of the method (selfsup.compiled); slower first steps
    fsdp: bool = False                    # shard weights, gradients, optimizer state over processes (FSDP2; selfsup.fsdp)
    accumulate: int = 1                   # gradient accumulation steps per optimizer step
    num_threads: int = 0                  # CPU threads for torch (0: torch's default)
    checkpoint_every: int = 0             # steps between checkpoints (0: only at epoch ends)
    log_every: int = 20                   # steps between metrics.jsonl records
    knn_every: int = 1                    # epochs between kNN monitor evaluations (0: off)
    knn_monitor_size: int = 10000         # train images used as kNN memory by the monitor
    online_probe: bool = True             # online linear probe on detached features (cookbook Fig. 13)
    probe_lr: float = 0.1                 # SGD, momentum 0.9 (solo-learn's online classifier)
    max_steps: int = 0                    # stop after this many optimizer steps (0: all epochs); for quick tries
    steps: int = 0                        # the run's length in optimizer steps, the schedule's too (0: epochs x steps per
                                          # epoch); train.budget sets it, the last epoch cut where it ends
    budget: str | None = None             # training time, e.g. 10m, 90s, 1.5h: the steps that fit this machine's measured
                                          # step time (selfsup.budget; sets train.steps; a resume keeps the choice)
    deterministic: bool = False           # deterministic kernels (torch.use_deterministic_algorithms; on CUDA slower):
                                          # the same seed gives the same run on the same machine and software
    collapse: str = "warn"                # off | warn | stop: the collapse monitor (selfsup.monitor; cookbook §2.6.2)
    nonfinite_limit: int = 10             # a step with a NaN/Inf loss or gradient is skipped (nothing updated); this
                                          # many in a row stop the run, naming the last good checkpoint (1: the first)
    wandb: bool = False                   # also log to Weights & Biases (pip install 'selfsup[wandb]'): the config,
                                          # the scalars by step; a resumed run continues the same W&B run
    wandb_project: str = "selfsup"
    wandb_mode: str = "online"            # online | offline (no account: RUN/wandb, uploaded later by `wandb sync`)


@dataclass
class EvalConfig:
    """What `selfsup eval` (and the end of `selfsup train`) runs; cookbook §3.7, §3.2, §2.6.2."""
    enabled: bool = True                  # false (or the shorthand eval=false): `selfsup train` skips the final
                                          # evaluation; `selfsup eval RUN_DIR` runs it later
    knn_k: int = 20                       # fmnist-knn protocol (DESIGN.md §4; DINO): the headline k
    knn_temperature: float = 0.07
    knn_ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # all in one pass (DINO reports 10/20/100/200)
    linear: bool = True
    linear_epochs: int = 30               # on cached features; fits well under a minute on 2 CPU cores
    linear_lrs: list[float] | None = None  # the linear probe's lr grid (None: 0.001 ... 1.0, 7 values; all trained
                                          # in one pass); the report flags a choice at the grid's edge
    linear_weight_decays: list[float] | None = None  # its weight-decay grid (None: [0, 1e-4])
    mlp: bool = True                      # 2-layer MLP probe with early stopping (§3.7.1, Fig. 13)
    linear_aug: bool = False              # linear probe on augmented views: one encoder pass per epoch (slow on CPU)
    finetune: bool = False                # full fine-tuning (§3.5.4; layer-wise lr decay for ViTs): slow on CPU
    finetune_epochs: int = 10
    finetune_train_size: int = 0          # fine-tune on a class-stratified subset of this many train images (0: all)
    finetune_batch_size: int = 256        # fine-tuning batch; smaller for a small train_size (more steps an epoch)
    guillotine: bool = True               # probe + RankMe at the backbone and every projector layer (§3.2, Fig. 10)
    label_free: bool = True               # RankMe (eq. 17), alpha-ReQ, spectra (§3.7.2, §2.6.2)
    lidar_images: int = 1000              # LiDAR on this many images x lidar_views augmented views; 0 = off
    lidar_views: int = 8
    rotation: bool = True                 # rotation-prediction probe as a label-free proxy (§3.7.2)
    decoder: bool = False                 # RCDM-like conditional diffusion decoder (§3.7.4): minutes per representation
    decoder_steps: int = 1500             # ~5 min per representation at 1 thread on a 2-core AVX2 CPU (bf16)
    report: bool = True                   # report.html: curves, spectra, guillotine table, t-SNE map, retrieval grid
    tsne_points: int = 2000
    init_baseline: bool = True            # kNN of the same network at initialization
    baselines: bool = True                # pixel kNN/linear baselines in eval.json and the report (cached per dataset)


@dataclass
class Config:
    method: str = "simclr"
    recipe: str = "default"
    description: str = ""
    cookbook: str = ""                    # cookbook sections this recipe comes from
    seed: int = 0
    out: str | None = None                # run directory (default runs/<method>-<time>)
    resume: str | None = None             # auto | path to a checkpoint
    epochs: int = 100
    batch_size: int = 256                 # the EFFECTIVE batch: summed over processes and accumulation steps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    params: Any = None                    # the method's own dataclass, shown as a section named after the method
    # Not a setting (never saved or overridden): the view keys whose recipe value was written for another dataset
    # and that nobody set, so they follow the training images once those are known (selfsup.runs.settle_sizes).
    follow_images: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in _NOT_SETTINGS}
        if self.params is not None:
            d[self.method] = to_plain(self.params)
        return d


_NOT_SETTINGS = ("params", "follow_images")  # Config fields that are no `key=value` setting


def to_plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: to_plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return list(v)
    return v


# ---------------------------------------------------------------------------------------------------------------------
# Validation and coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} expects a non-empty list like [10, 20], got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} expects a list of {len(args)} values like [0.2, 1.0], got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML_WORDS:  # eval.linear=no
            return _YAML_WORDS[value.lower()]
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} expects a number, got {value!r}")
        if not math.isfinite(number):  # no setting has a use for NaN or an infinity; a NaN lr trains garbage
            raise ConfigError(f"{key}={value} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads true/false (and on/off, yes/no) as booleans
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _all_keys(v, f"{prefix}{f.name}.")
        elif f.name not in _NOT_SETTINGS:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    match = closest(key, valid, cutoff=0.5)
    if match is None:  # match on the last component, e.g. "lr" -> "optim.base_lr"
        last = {k.split(".")[-1]: k for k in valid}
        tail = closest(key.split(".")[-1], last)
        match = last[tail] if tail else None
    hint = f" Did you mean {match!r}?" if match else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Run `selfsup train METHOD --show-config` to list every key.")


def _set(cfg: Config, key: str, value: Any) -> None:
    # shorthand: eval=false (or off, no) skips the final evaluation
    if key == "eval" and (isinstance(value, bool) or str(value).lower() in _YAML_WORDS):
        key = "eval.enabled"
    parts = key.split(".")
    valid = _all_keys(cfg) + [f"{cfg.method}.{k}" for k in _all_keys(cfg.params)] if cfg.params is not None else \
        _all_keys(cfg)
    if parts[0] == cfg.method and cfg.params is not None:
        obj, parts = cfg.params, parts[1:]
    else:
        obj = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names or part in _NOT_SETTINGS:
            raise _unknown(key, valid)
        f = names[part]
        current = getattr(obj, part)
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(current):
                raise _unknown(key, valid)
            obj = current
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' is a section; set its keys, e.g. {key}.{dataclasses.fields(current)[0].name}=...")
            for k, v in value.items():
                _set(cfg, f"{key}.{k}", v)
        else:
            hints = typing.get_type_hints(type(obj))
            setattr(obj, part, _coerce(value, hints[f.name], key))


def _apply(cfg: Config, tree: dict, prefix: str = "") -> None:
    for k, v in tree.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict):
            _apply(cfg, v, full + ".")
        else:
            _set(cfg, full, v)


_YAML_WORDS = {"on": True, "off": False, "yes": True, "no": False}  # YAML 1.1 booleans that are words too


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with value parsed as YAML (so 0.2 is a float, [0.2,1] a list, null None)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"expected key=value, got {text!r} (e.g. epochs=10 or optim.base_lr=0.5)")
    key, raw = text.split("=", 1)
    if raw.strip().lower() in _YAML_WORDS:  # train.collapse=off means "off", not False (a bool setting reads it)
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of {key}: {raw!r} ({e})") from None
    return key.strip(), value


def _recipes_root():
    return resources.files("selfsup") / "recipes"


def recipe_names(method: str) -> list[str]:
    folder = _recipes_root() / method
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section (a key ``top`` sets replaces the base's; lists are replaced)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(method: str, recipe: str, root=None) -> dict:
    """A recipe's settings, with what it ``extends`` underneath.

    ``extends: NAME`` (or a list, applied in order) names recipes this one states the differences from: ``default``
    is a recipe of the same method (``recipes/<method>/default.yaml``), ``datasets/cifar10`` a file under
    ``recipes/`` shared by every method (a dataset preset). The bases are merged section by section, then this
    file's values on top. ``description`` and ``cookbook`` are never inherited: every recipe states its own.
    """
    return _resolve_recipe(method, recipe, root or _recipes_root(), ())


def _resolve_recipe(method: str, name: str, root, chain: tuple[str, ...]) -> dict:
    *folders, stem = name.split("/")
    path = root.joinpath(*(folders or [method]), f"{stem}.yaml")
    if not path.is_file():
        if chain:
            raise ConfigError(f"recipe {chain[-1]!r} extends {name!r}, which does not exist ({path})")
        names = recipe_names(method) if root == _recipes_root() else []
        raise ConfigError(f"method {method!r} has no recipe {name!r}.{did_you_mean(name, names)} "
                          f"Available: {', '.join(names)}")
    if name in chain:
        raise ConfigError(f"recipes extend each other in a circle: {' -> '.join((*chain, name))}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold key: value settings, not a {type(tree).__name__}")
    bases = tree.pop("extends", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _resolve_recipe(method, str(base), root, (*chain, name)))
    merged.pop("description", None)
    merged.pop("cookbook", None)
    return _merge(merged, tree)


def build_config(method: str, overrides: list[str] | None = None, *, params_cls: type | None = None) -> Config:
    """Resolve a full config: defaults, then the recipe (`recipe=` override or 'default'), then the overrides."""
    pairs = [parse_override(o) for o in overrides or []]
    recipe = next((v for k, v in pairs if k == "recipe"), "default")
    cfg = Config(method=method, recipe=str(recipe), params=params_cls() if params_cls else None)
    tree = load_recipe(method, str(recipe))
    tree.pop("method", None)
    tree.pop("recipe", None)
    _apply(cfg, tree)
    recipe_data = cfg.data.name
    explicit = set()
    for k, v in pairs:
        if k == "data" and isinstance(v, str):  # shorthand: data=cifar10 means data.name=cifar10
            k = "data.name"
        if k == "method":
            raise ConfigError(f"method={v} is not a setting: the method is the command's argument (selfsup train "
                              f"{v} ...); drop method=")
        if k != "recipe":
            _set(cfg, k, v)
            explicit.add(k)
    _check(cfg)
    cfg.follow_images = views_following_images(recipe_data, cfg.data.name, explicit)
    return cfg


def views_following_images(recipe_data: str, data: str, explicit: set[str]) -> frozenset[str]:
    """The view sizes that follow the training images: ``views.size`` and ``views.local_size`` when the data is not
    the dataset the recipe was written for (its 28-pixel Fashion-MNIST views would shrink a folder of photos) and
    the overrides did not set them. Empty when the recipe's own data is used: its sizes are the recipe's choice."""
    from selfsup.data.datasets import canonical_name

    if canonical_name(data) == canonical_name(recipe_data) or explicit & {"views", "views.size"}:
        return frozenset()
    return frozenset({"views.size"} | ({"views.local_size"} if "views.local_size" not in explicit else set()))


def config_from_dict(d: dict, params_cls: type | None = None) -> Config:
    """Rebuild a Config from a saved config.yaml (used by resume and `selfsup eval`)."""
    d = dict(d)
    method = d.pop("method")
    cfg = Config(method=method, params=params_cls() if params_cls else None)
    _apply(cfg, d)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    choices = {
        "optim.name": (cfg.optim.name, ("sgd", "adamw", "lars")),
        "optim.lr_rule": (cfg.optim.lr_rule, ("linear", "sqrt", "none")),
        "train.precision": (cfg.train.precision, ("auto", "fp32", "bf16")),
        "train.channels_last": (cfg.train.channels_last, ("auto", "true", "false")),
        "data.on_error": (cfg.data.on_error, ("skip", "raise")),
        "train.collapse": (cfg.train.collapse, ("off", "warn", "stop")),
        "train.wandb_mode": (cfg.train.wandb_mode, ("online", "offline")),
        "model.stem": (cfg.model.stem, ("cifar", "imagenet", "small")),
        "model.pool": (cfg.model.pool, ("cls", "mean")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    from selfsup.data.datasets import canonical_name
    from selfsup.nn.backbones import backbone_names

    if not cfg.model.backbone.startswith("timm:") and cfg.model.backbone not in backbone_names():
        hint = did_you_mean(cfg.model.backbone, backbone_names())
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} is unknown.{hint} Valid: "
                          f"{', '.join(backbone_names())}, or timm:<model name>")
    try:
        canonical_name(cfg.data.name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.name: {e.args[0] if e.args else e}") from None
    from selfsup.checks import check_processes, check_values

    check_values(cfg)
    check_processes(cfg, 1)  # with 1 process here; check_before_training checks the launch's world size
