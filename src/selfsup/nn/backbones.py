"""Build backbones by name, and export / load them as safetensors + JSON (DESIGN §3).

Every backbone built here has ``forward(x) -> (B, num_features)`` and carries ``selfsup_spec``, the
JSON-serialisable recipe that rebuilds it: ``{"name": ..., "in_chans": ..., **kwargs}``.

Exported layout (``export_backbone(model, DIR)``)::

    DIR/backbone.safetensors   the state_dict (weights and BN statistics)
    DIR/backbone.json          {"spec", "num_features", "format_version", "how_to_load", **extra, "export_id"}

The two files are written together (:func:`selfsup.runtime.atomic_write_all`): a full disk, a crash or ``kill -9``
while exporting leaves the previous pair as it was, never a half-written file. Both carry the same random
``export_id`` (in the JSON, and in the safetensors metadata), so a mixed pair (an export interrupted between its two
renames, or one file copied over from another export) is refused with a clear error instead of loading weights with
the wrong config.

``load_backbone(DIR)`` rebuilds the module from the spec, loads the weights strictly and returns it in eval mode,
wrapped in :class:`ImageBackbone` so that it takes images as a user has them (uint8, or float in [0, 1]) and applies
the run's normalization itself; ``raw=True`` returns the bare network, which expects normalized float input.

A backbone file may come from someone else: ``backbone.json`` is validated (types, size, nesting) and may only
describe an architecture. For ``timm:`` models only the options in ``TIMM_ARCH_KWARGS`` reach ``timm.create_model``;
``pretrained``, ``checkpoint_path``, ``pretrained_cfg_overlay`` and the like are refused (they would download from a
URL of the file's choosing or unpickle a file it names). Weights only ever come from the safetensors file.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from selfsup.names import did_you_mean
from selfsup.nn.resnet import DEPTHS, resnet
from selfsup.nn.vit import SIZES, VisionTransformer, vit
from selfsup.runtime import atomic_write_all

FORMAT_VERSION = 1
WEIGHTS_FILE = "backbone.safetensors"
CONFIG_FILE = "backbone.json"
EXPORT_ID_KEY = "selfsup_export_id"  # safetensors metadata key; equals backbone.json's "export_id"
TIMM_PREFIX = "timm:"

MAX_CONFIG_BYTES = 1 << 20  # a backbone.json is a few hundred bytes; anything this large is not one
_RESNET_KWARGS = ("stem", "width", "zero_init_residual")
# timm.create_model options that only shape the architecture (timm's ResNet / ViT / ConvNeXt families)
TIMM_ARCH_KWARGS = ("img_size", "patch_size", "global_pool", "drop_rate", "drop_path_rate", "embed_dim", "depth",
                    "num_heads", "mlp_ratio", "qkv_bias", "class_token", "reg_tokens", "no_embed_class",
                    "dynamic_img_size", "output_stride", "depths", "dims")
# options that load weights: used when a user builds a model, never stored in or read from an export
_TIMM_WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                       "pretrained_strict")
_VIT_KWARGS = tuple(p for p in inspect.signature(VisionTransformer).parameters if p != "in_chans")


def _registry() -> dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]]:
    """name -> (builder(in_chans=..., **kwargs), accepted kwargs)."""
    reg: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {}
    for name in DEPTHS:
        reg[name] = (lambda n=name, **kw: resnet(n, **kw), _RESNET_KWARGS)
    for name in SIZES:
        reg[name] = (lambda n=name, **kw: vit(n, **kw), _VIT_KWARGS)
    return reg


def backbone_names() -> list[str]:
    """Names accepted by ``build_backbone`` (plus any ``timm:<model_name>``)."""
    return sorted(_registry())


def _unknown(what: str, value: str, valid: list[str]) -> ValueError:
    return ValueError(f"unknown {what} {value!r}.{did_you_mean(value, valid)} Valid: {', '.join(valid)}")


class TimmBackbone(nn.Module):
    """A timm model built with ``num_classes=0`` so ``forward`` returns pooled features (B, num_features)."""

    def __init__(self, model_name: str, in_chans: int = 3, **kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"backbone 'timm:{model_name}' needs timm: pip install selfsup[timm]") from e
        self.model = timm.create_model(model_name, num_classes=0, in_chans=in_chans, **kwargs)
        self.num_features = int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The package's named outputs from timm's ``forward_features`` / ``forward_head(pre_logits=True)``:
        ``pooled`` always, ``map`` (B, C, h, w) for ConvNets, ``tokens`` (B, N, D) patch tokens for transformers
        (prefix tokens such as [cls] dropped, as ``cls`` when there is one). Token masks are not passed to timm."""
        if masks is not None or keep is not None:
            raise ValueError("token masks (masks=, keep=) need the package's own ViT (model.backbone=vit_tiny ...)")
        feats = self.model.forward_features(x)
        out = {"pooled": self.model.forward_head(feats, pre_logits=True)}
        if feats.ndim == 4:
            out["map"] = feats
        elif feats.ndim == 3:
            prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            out["tokens"] = feats[:, prefix:]
            if prefix:
                out["cls"] = feats[:, 0]
        return out


def build_backbone(name: str, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a backbone by name: resnet10/18/34/50 (stem, width, zero_init_residual), vit_tiny/small/base
    (img_size, patch_size, pool, drop_path, depth, embed_dim, ...), or "timm:<model_name>" (timm kwargs).

    The spec needed to rebuild the module is stored on it as ``selfsup_spec`` (see ``backbone_spec``).
    """
    if name.startswith(TIMM_PREFIX):
        spec_kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_WEIGHT_KWARGS}  # weights travel in the export
        model: nn.Module = TimmBackbone(name[len(TIMM_PREFIX):], in_chans=in_chans, **kwargs)
    else:
        registry = _registry()
        if name not in registry:
            raise _unknown("backbone", name, backbone_names() + [TIMM_PREFIX + "<model_name>"])
        builder, accepted = registry[name]
        for key in kwargs:
            if key not in accepted:
                raise _unknown(f"argument for backbone {name!r}:", key, list(accepted))
        spec_kwargs = dict(kwargs)
        model = builder(in_chans=in_chans, **kwargs)
    model.selfsup_spec = {"name": name, "in_chans": in_chans, **spec_kwargs}
    return model


def backbone_spec(model: nn.Module) -> dict:
    """The JSON-serialisable spec that rebuilds ``model`` via ``build_backbone(**spec)``."""
    spec = getattr(model, "selfsup_spec", None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no selfsup_spec; build it with selfsup.nn.backbones."
                         "build_backbone(name, ...) so it can be exported and rebuilt")
    try:
        json.dumps(spec)
    except TypeError as e:
        raise ValueError(f"backbone spec {spec!r} is not JSON-serialisable ({e}); pass plain numbers, "
                         "strings, booleans or lists as backbone arguments") from e
    return dict(spec)


def _tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is cloned
    (safetensors refuses shared storage; loading then restores both keys, and strict loading still passes)."""
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def export_backbone(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``directory/backbone.safetensors`` and ``directory/backbone.json``; return the directory.

    Both files are written to temporary files first and renamed only once both are complete, so a write error (full
    disk: :class:`selfsup.runtime.WriteError`, naming the file) leaves the previous export, if any, whole and
    loadable, and no temporary file behind. Both record the same ``export_id``, checked by :func:`load_backbone`.
    """
    from safetensors.torch import save

    if isinstance(model, ImageBackbone):  # keep its normalization with it
        extra = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), **(extra or {})}
        model = model.backbone
    spec = backbone_spec(model)
    _validated_spec(spec, "the backbone to export")  # fail now rather than when someone loads it
    directory = Path(directory)
    export_id = uuid.uuid4().hex
    config = {
        "spec": spec,
        "num_features": int(model.num_features),
        "format_version": FORMAT_VERSION,
        "how_to_load": f"import selfsup; model = selfsup.load_backbone({str(directory)!r})",
        **(extra or {}),
        "export_id": export_id,
    }
    text = json.dumps(config, indent=2) + "\n"  # fail on a bad `extra` before writing anything
    # Serialized in memory (one extra copy of the weights) and written by our writer, not by safetensors'
    # save_file: that one writes its own ".tmpXXXXXX" file, which a kill -9 leaves behind under no known name, makes
    # the file 0600, and reports a full disk as its own error type.
    weights = save(_tensors_for_safetensors(model.state_dict()), metadata={"format": "pt", EXPORT_ID_KEY: export_id})
    atomic_write_all([
        (directory / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(weights)),
        (directory / CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(text.encode())),
    ])
    return directory


def _export_files(path: Path) -> tuple[Path, Path]:
    """(weights, config) paths for a directory, a .safetensors file or a .json file."""
    if path.is_dir():
        return path / WEIGHTS_FILE, path / CONFIG_FILE
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if not path.exists():
        raise FileNotFoundError(f"no exported backbone at {path}: expected a directory written by "
                                "export_backbone, or its backbone.safetensors / backbone.json file")
    raise ValueError(f"{path} is not a backbone export: pass the directory, or its .safetensors or .json file")


def _read_config(config_path: Path) -> dict:
    """backbone.json as a dict, refusing files that are huge, nested too deeply or not JSON objects."""
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_path} is {size} bytes: not a backbone config (those are under 1 KB)")
    try:
        config = json.loads(config_path.read_text())
    except RecursionError:
        raise ValueError(f"{config_path} is not a valid backbone config: its JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not a valid backbone config ({e}); re-export the backbone") from None
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict):
        raise ValueError(f"{config_path} is not a valid backbone config: expected an object with a 'spec' object")
    return config


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_fields(config: dict, config_path: Path) -> tuple[int | None, str | None]:
    """(num_features, export_id) of a backbone.json, after checking its top-level fields' types.

    Required: ``format_version`` (this reader's) and ``spec`` (checked by ``_validated_spec``). Optional, checked
    when present: ``num_features`` (a positive integer; older hand-written files lack it), ``export_id`` (a string;
    exports before it was added lack it). Other fields (``how_to_load``, a run's ``extra``) are informational.
    """
    version = config.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        what = "is missing" if "format_version" not in config else f"is {version!r}"
        raise ValueError(f"{config_path}: field 'format_version' {what} (format_version={version!r}); this selfsup "
                         f"reads format_version {FORMAT_VERSION}. Re-export the backbone with this selfsup")
    num_features = config.get("num_features")
    if num_features is not None and not (_is_int(num_features) and num_features > 0):
        raise ValueError(f"{config_path}: field 'num_features' must be a positive integer, got {num_features!r}")
    export_id = config.get("export_id")
    if export_id is not None and not (isinstance(export_id, str) and 0 < len(export_id) <= 64):
        raise ValueError(f"{config_path}: field 'export_id' must be a short string, got {export_id!r}")
    return num_features, export_id


def _check_same_export(weights: Path, config_path: Path, export_id: str | None) -> None:
    """Refuse a weights file and a config from different exports (both record the export's ``export_id``)."""
    if export_id is None:  # an export older than export_id: nothing to compare
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            found = (f.metadata() or {}).get(EXPORT_ID_KEY)
    except Exception:  # a corrupt weights file: reported with its own message when it is loaded
        return
    if found != export_id:
        raise ValueError(f"{weights} and {config_path} come from different exports (export_id {found!r} in the "
                         f"weights, {export_id!r} in the config): an export was interrupted, or one of the files was "
                         "replaced by another export's. Export the backbone again, or copy both files from one export")


def _is_plain(v) -> bool:
    """A JSON scalar, or a short flat list of them: all an architecture option ever is."""
    if isinstance(v, list):
        return len(v) <= 16 and all(isinstance(x, (bool, int, float, str)) or x is None for x in v)
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def _validated_spec(spec: dict, where: str) -> tuple[str, int, dict]:
    """(name, in_chans, kwargs) of a spec whose every key is a known architecture option with a plain value."""
    spec = dict(spec)
    name, in_chans = spec.pop("name", None), spec.pop("in_chans", 3)
    if not isinstance(name, str):
        raise ValueError(f"{where}: spec.name must be a backbone name, got {name!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or not 1 <= in_chans <= 64:
        raise ValueError(f"{where}: spec.in_chans must be an integer from 1 to 64, got {in_chans!r}")
    if name.startswith(TIMM_PREFIX):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name[len(TIMM_PREFIX):]):
            raise ValueError(f"{where}: {name!r} is not a timm model name")
        allowed = TIMM_ARCH_KWARGS
    elif name in (registry := _registry()):
        allowed = registry[name][1]
    else:
        raise _unknown(f"backbone in {where}:", name, backbone_names() + [TIMM_PREFIX + "<model_name>"])
    refused = sorted(k for k in spec if k not in allowed)
    if refused:
        weights = [k for k in refused if k in _TIMM_WEIGHT_KWARGS]
        why = (f" ({', '.join(weights)} would load weights from elsewhere: an export's weights come only from its "
               f"{WEIGHTS_FILE})") if weights else ""
        raise ValueError(f"{where}: refused backbone options {refused}{why}. A backbone config may only hold "
                         f"architecture options: {', '.join(allowed)}. Remove the others.")
    bad = sorted(k for k, v in spec.items() if not _is_plain(v))
    if bad:
        raise ValueError(f"{where}: options {bad} must be numbers, strings, booleans or short lists of them")
    return name, in_chans, spec


def _normalization(config: dict, in_chans: int, config_path: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) recorded at export, checked; None when the export records none."""
    mean, std = config.get("mean"), config.get("std")
    if mean is None and std is None:
        return None
    ok = all(isinstance(v, list) and len(v) == in_chans and
             all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
             for v in (mean, std))
    if not ok or min(std) <= 0:
        raise ValueError(f"{config_path}: mean and std must be lists of {in_chans} finite numbers (std > 0), got "
                         f"mean={mean!r} std={std!r}")
    return [float(x) for x in mean], [float(x) for x in std]


class ImageBackbone(nn.Module):
    """An exported backbone that takes images as a user has them and normalizes them as its training run did.

    Input: ``(B, C, H, W)`` uint8 in 0..255, or float in [0, 1]. Output: ``(B, num_features)``. Anything else (other
    dtypes, floats outside [0, 1] such as already-normalized images, the wrong channel count) is refused with a
    message, because it would otherwise give wrong features without a word. ``.backbone`` is the bare network.
    """

    def __init__(self, backbone: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.in_chans = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__} (use torch.from_numpy)")
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(images.shape)}"
                             + (" (add a batch dimension: x[None])" if images.ndim == 3 else "")
                             + (" (channels last? use x.permute(0, 3, 1, 2))" if images.ndim == 4
                                and images.shape[-1] == self.in_chans else ""))
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
            if x.numel():
                lo, hi = torch.aminmax(x)
                lo, hi = float(lo), float(hi)
                if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
                    raise ValueError(
                        f"float images must lie in [0, 1]; these lie in [{lo:.3g}, {hi:.3g}]. This backbone "
                        "normalizes its input itself (mean/std of its training data): pass uint8 images or floats "
                        "in [0, 1], not already-normalized ones; for the bare network use load_backbone(..., raw=True)")
        else:
            raise TypeError(f"images of dtype {images.dtype}: pass uint8 (0..255) or float in [0, 1]")
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(((x - self.mean) / self.std).to(dtype))


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu", *, raw: bool = False) -> nn.Module:
    """Rebuild an exported backbone and load its weights strictly; returns the module in eval mode.

    By default an :class:`ImageBackbone`: give it uint8 images or floats in [0, 1]; it applies the normalization
    recorded at export. ``raw=True``: the bare network, which expects images already normalized with that mean/std.
    """
    from safetensors.torch import load_file

    weights, config_path = _export_files(Path(path))
    for f in (weights, config_path):
        if not f.is_file():
            raise FileNotFoundError(f"missing {f}: a backbone export needs both {weights.name} and "
                                    f"{config_path.name} (write them with selfsup.export_backbone)")
    config = _read_config(config_path)
    num_features, export_id = _checked_fields(config, config_path)
    name, in_chans, spec = _validated_spec(config["spec"], str(config_path))
    stats = _normalization(config, in_chans, config_path)
    if stats is None and not raw:
        raise ValueError(f"{config_path} records no input normalization (mean, std), so selfsup cannot prepare "
                         "images for this backbone. Load the bare network with load_backbone(path, raw=True) and "
                         "normalize its input yourself, or re-export it with extra={'mean': [...], 'std': [...]}")
    _check_same_export(weights, config_path, export_id)
    try:
        model = build_backbone(name, in_chans=in_chans, **spec)
    except (TypeError, ValueError) as e:  # e.g. width="8": the option names are right, a value is not
        raise ValueError(f"{config_path}: spec {config['spec']!r} does not build a backbone: {e}") from None
    if num_features is not None and num_features != model.num_features:
        raise ValueError(f"{config_path}: field 'num_features' is {num_features} but its spec builds a backbone with "
                         f"{model.num_features} features; the file was edited or is corrupt: re-export the backbone")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"could not read {weights} ({e}); the file is corrupt or incomplete, re-export it") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {weights} do not match the backbone described in {config_path}: {e}") from e
    model = model.eval()
    return (model if raw else ImageBackbone(model, *stats).eval()).to(device)


def export_info(path: str | os.PathLike) -> dict:
    """What an export's ``backbone.json`` says, checked as :func:`load_backbone` checks it, without the weights:
    ``{"name", "in_chans", "kwargs", "spec", "mean", "std", "num_features", "export_id", "config_path"}``; ``mean`` and
    ``std`` are None when the export records no normalization. For tools that need the recipe before (or instead of)
    the network: ``selfsup embed``, ONNX and timm exports."""
    _, config_path = _export_files(Path(path))
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {config_path}: not a backbone export (write one with selfsup.export_backbone)")
    config = _read_config(config_path)
    num_features, export_id = _checked_fields(config, config_path)
    name, in_chans, kwargs = _validated_spec(config["spec"], str(config_path))
    stats = _normalization(config, in_chans, config_path)
    return {"name": name, "in_chans": in_chans, "kwargs": kwargs, "spec": dict(config["spec"]),
            "mean": stats[0] if stats else None, "std": stats[1] if stats else None,
            "num_features": num_features, "export_id": export_id, "config_path": str(config_path)}
