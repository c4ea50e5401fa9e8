"""Build backbones by name, and export / load them as safetensors + JSON (DESIGN §3).

Every backbone built here has ``forward(x) -> (B, num_features)`` and carries ``selfsup_spec``, the
JSON-serialisable recipe that rebuilds it: ``{"name": ..., "in_chans": ..., **kwargs}``.

Exported layout (``export_backbone(model, DIR)``)::

    DIR/backbone.safetensors   the state_dict (weights and BN statistics)
    DIR/backbone.json          {"spec", "num_features", "format_version", "how_to_load", **extra}

``load_backbone(DIR)`` rebuilds the module from the spec, loads the weights strictly and returns it in eval mode.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from selfsup.nn.resnet import DEPTHS, resnet
from selfsup.nn.vit import SIZES, VisionTransformer, vit
from selfsup.runtime import atomic_write

FORMAT_VERSION = 1
WEIGHTS_FILE = "backbone.safetensors"
CONFIG_FILE = "backbone.json"
TIMM_PREFIX = "timm:"

_RESNET_KWARGS = ("stem", "width", "zero_init_residual")
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
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} {value!r}.{hint} Valid: {', '.join(valid)}")


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


def build_backbone(name: str, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a backbone by name: resnet10/18/34/50 (stem, width, zero_init_residual), vit_tiny/small/base
    (img_size, patch_size, pool, drop_path, depth, embed_dim, ...), or "timm:<model_name>" (timm kwargs).

    The spec needed to rebuild the module is stored on it as ``selfsup_spec`` (see ``backbone_spec``).
    """
    if name.startswith(TIMM_PREFIX):
        spec_kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}  # weights travel in the export
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
    """Write ``directory/backbone.safetensors`` and ``directory/backbone.json``; return the directory."""
    from safetensors.torch import save_file

    spec = backbone_spec(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "spec": spec,
        "num_features": int(model.num_features),
        "format_version": FORMAT_VERSION,
        "how_to_load": f"import selfsup; model = selfsup.load_backbone({str(directory)!r})",
        **(extra or {}),
    }
    text = json.dumps(config, indent=2)  # fail on a bad `extra` before writing anything
    tensors = _tensors_for_safetensors(model.state_dict())
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
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


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported backbone and load its weights strictly; returns the module in eval mode."""
    from safetensors.torch import load_file

    weights, config_path = _export_files(Path(path))
    for f in (weights, config_path):
        if not f.is_file():
            raise FileNotFoundError(f"missing {f}: a backbone export needs both {weights.name} and "
                                    f"{config_path.name} (write them with selfsup.export_backbone)")
    try:
        config = json.loads(config_path.read_text())
        spec = dict(config["spec"])
        name, in_chans = spec.pop("name"), spec.pop("in_chans", 3)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a valid backbone config ({e!r}); re-export the backbone") from e
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version={version}; this selfsup reads {FORMAT_VERSION}")
    model = build_backbone(name, in_chans=in_chans, **spec)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"could not read {weights} ({e}); the file is corrupt or incomplete, re-export it") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {weights} do not match the backbone described in {config_path}: {e}") from e
    return model.to(device).eval()
