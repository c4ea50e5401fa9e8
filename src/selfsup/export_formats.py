"""Backbone exports beyond selfsup's own safetensors + JSON (:func:`selfsup.export_backbone`): ONNX, and timm.

    selfsup export RUN_OR_BACKBONE --format onnx --out encoder.onnx
    selfsup export RUN_OR_BACKBONE --format timm --out encoder-timm/

**ONNX** (:func:`export_onnx`): one input ``images``, float32 ``(batch, C, H, W)`` in [0, 1] (pixels / 255), and
one output ``features`` ``(batch, D)``; the run's normalization is inside the graph, so a deployment divides by 255
and nothing else. The batch axis is dynamic; ``H`` and ``W`` are fixed to the size the model is evaluated at (a
ViT's position embedding is traced for one grid). The graph's metadata (``onnx.load(path).metadata_props``) holds
the selfsup spec, mean, std and the input convention.

**timm** (:func:`export_timm`): a folder in the layout timm reads from the Hugging Face Hub, ``model.safetensors``
(the state dict under timm's key names) + ``config.json`` (architecture, model arguments, input size, mean, std),
for a ``timm:<name>`` backbone, a selfsup ResNet with the ImageNet stem (timm's ``resnet*``) or a selfsup ViT
(timm's ``vit_*``)::

    model = timm.create_model("local-dir:encoder-timm", pretrained=True)            # timm >= 1.0.20
    model = timm.create_model(name, pretrained=True, num_classes=0, **model_args,
                              pretrained_cfg_overlay=dict(file="encoder-timm/model.safetensors"))

(``name`` and ``model_args`` are in ``config.json``; ``how_to_load`` there spells the call out.) A ResNet with the
CIFAR or "small" stem has no timm counterpart: its export is refused with the reason.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from selfsup.config import ConfigError
from selfsup.embed import Encoder, load_encoder

TIMM_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
FORMATS = ("onnx", "timm")


class NoTimmCounterpart(ConfigError):
    """The backbone's architecture is not one timm can build (exit code 2: use another export format)."""


class _Normalized(nn.Module):
    """``network((x - mean) / std)``: the graph an ONNX export holds (images in [0, 1] in, features out)."""

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


def _encoder(source, image_size: int | None) -> Encoder:
    """The encoder of a run directory / export path, or of a module returned by :func:`selfsup.load_backbone`."""
    if isinstance(source, nn.Module):
        from selfsup.nn.backbones import ImageBackbone

        if not isinstance(source, ImageBackbone):
            raise TypeError("pass a run directory, an export path, or a model from selfsup.load_backbone(path) (which "
                            "knows its normalization); a bare network does not")
        spec = getattr(source.backbone, "selfsup_spec", {})
        return Encoder(source.backbone, source.mean.flatten().tolist(), source.std.flatten().tolist(),
                       image_size or spec.get("img_size"), "<module>", spec.get("name"))
    return load_encoder(source, image_size=image_size)


# ----------------------------------------------------------------------------------------------- ONNX


def export_onnx(source, out: str | os.PathLike, *, image_size: int | None = None, opset: int = 17) -> Path:
    """Write the backbone at ``source`` (run directory, export path, or a :func:`selfsup.load_backbone` model) as
    ONNX to ``out`` (atomically); returns ``out``. See the module docstring for the graph's input and output."""
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx (and onnxruntime to run it)") from None
    from selfsup.nn.backbones import backbone_spec
    from selfsup.runtime import atomic_write

    encoder = _encoder(source, image_size)
    size = encoder.image_size or 224
    graph = _Normalized(encoder.network.float().eval().cpu(), encoder.mean, encoder.std).eval()
    example = torch.rand(2, encoder.in_chans, size, size)
    proto = _to_onnx(graph, example, opset)
    meta = {"selfsup_spec": json.dumps(backbone_spec(encoder.network)), "mean": json.dumps(encoder.mean),
            "std": json.dumps(encoder.std), "source": encoder.source,
            "input": f"images: float32 (batch, {encoder.in_chans}, {size}, {size}) in [0, 1] (pixels / 255)",
            "output": f"features: float32 (batch, {encoder.network.num_features})"}
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    out = Path(out)
    atomic_write(out, lambda tmp: onnx.save(proto, tmp))
    return out


def _to_onnx(graph: nn.Module, example: torch.Tensor, opset: int):
    """The ONNX ModelProto of ``graph`` with a dynamic batch axis: PyTorch's TorchScript exporter when this torch has
    it (a second per model, no onnxscript needed), else the dynamo exporter."""
    import onnx

    names = dict(input_names=["images"], output_names=["features"])
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # size checks (H % patch) become constants of the trace: right, since H and W are fixed
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), buffer, opset_version=opset, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, **names)
        return onnx.load_model_from_string(buffer.getvalue())
    except Exception as first:  # noqa: BLE001 - a torch without the TorchScript exporter, or a model it cannot trace
        try:
            batch = torch.export.Dim("batch", min=1)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                            dynamic_shapes={"images": {0: batch}}, **names)
            return program.model_proto
        except Exception as second:  # noqa: BLE001
            raise RuntimeError(f"ONNX export failed with both of PyTorch's exporters: TorchScript: {first}; dynamo: "
                               f"{second}") from second


# ----------------------------------------------------------------------------------------------- timm


def timm_equivalent(network: nn.Module) -> tuple[str, dict, dict[str, str], list[str]]:
    """``(timm model name, model_args, key renames, keys to drop)`` for a selfsup backbone timm can build.

    Renames are ``{selfsup prefix: timm prefix}`` applied to every key (first match; one starting with "." matches
    inside the key). Raises :class:`NoTimmCounterpart`, naming the reason, for a backbone timm cannot build.
    """
    from selfsup.nn.backbones import TIMM_PREFIX, backbone_spec
    from selfsup.nn.resnet import ResNet
    from selfsup.nn.vit import VisionTransformer

    spec = backbone_spec(network)
    name, in_chans = spec["name"], spec.get("in_chans", 3)
    if name.startswith(TIMM_PREFIX):
        args = {k: v for k, v in spec.items() if k not in ("name", "in_chans")}
        return name[len(TIMM_PREFIX):], {"in_chans": in_chans, **args}, {"model.": ""}, []
    if isinstance(network, ResNet):
        return (*_timm_resnet(network, name, spec, in_chans), [])
    if isinstance(network, VisionTransformer):
        return _timm_vit(network, name, in_chans)
    raise NoTimmCounterpart(f"backbone {name!r} has no timm counterpart; use the safetensors or ONNX export")


def _timm_resnet(network, name: str, spec: dict, in_chans: int) -> tuple[str, dict, dict[str, str]]:
    stem = spec.get("stem", "imagenet")
    if stem != "imagenet":
        raise NoTimmCounterpart(f"this {name} has the {stem!r} stem (3x3 conv{'' if stem == 'cifar' else ' stride 2'}, no "
                         "max-pool), which no timm ResNet has: timm's start with a 7x7 stride-2 conv and a max-pool "
                         "(selfsup's model.stem=imagenet). Use the safetensors export (selfsup.load_backbone) or ONNX")
    from selfsup.nn.resnet import DEPTHS

    block, layers = DEPTHS[name]
    timm_name = "resnet50" if block == "bottleneck" else ("resnet34" if layers == (3, 4, 6, 3) else "resnet18")
    args: dict = {"in_chans": in_chans}
    if layers != {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[timm_name]:
        args["layers"] = list(layers)
    width = network.stem[0].out_channels
    if width != 64:  # timm's ResNet stem has 64 channels whatever its stage widths
        raise NoTimmCounterpart(f"this {name} has width {width}; timm's ResNets have a 64-channel stem (selfsup's "
                         "model.width=64). Use the safetensors export (selfsup.load_backbone) or ONNX")
    return timm_name, args, {"stem.0.": "conv1.", "stem.1.": "bn1.", ".shortcut.": ".downsample."}


def _timm_vit(network, name: str, in_chans: int) -> tuple[str, dict, dict[str, str], list[str]]:
    block = network.blocks[0]
    dim = network.embed_dim
    args = {"in_chans": in_chans, "img_size": network.grid[0] * network.patch_size, "patch_size": network.patch_size,
            "embed_dim": dim, "depth": len(network.blocks), "num_heads": block.attn.num_heads,
            "mlp_ratio": block.mlp[0].out_features / dim, "qkv_bias": block.attn.qkv.bias is not None,
            "global_pool": "token" if network.pool == "cls" else "avg"}
    if network.pool == "mean":  # selfsup norms every token, then averages: timm's "avg" without its fc_norm
        args["fc_norm"] = False
    timm_name = f"{name}_patch16_224"  # vit_tiny / vit_small / vit_base; model_args set every size
    renames = {"patch_embed.": "patch_embed.proj.", ".mlp.0.": ".mlp.fc1.", ".mlp.2.": ".mlp.fc2."}
    return timm_name, args, renames, ["mask_token"]


def timm_state_dict(network: nn.Module) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(timm model name, model_args, state dict under timm's key names)`` of a selfsup backbone."""
    timm_name, args, renames, drop = timm_equivalent(network)
    state = {}
    for key, value in network.state_dict().items():
        if key in drop:
            continue
        state[_rename(key, renames)] = value
    return timm_name, args, state


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if old.startswith("."):
            if old in key:
                return key.replace(old, new, 1)
        elif key.startswith(old):
            return new + key[len(old):]
    return key


def _timm_layer_names(network: nn.Module) -> dict:
    """timm's ``classifier`` and ``first_conv`` names: with them, ``create_model(..., num_classes=10)`` adds a new head
    instead of failing on the missing one."""
    from selfsup.nn.resnet import ResNet
    from selfsup.nn.vit import VisionTransformer

    if isinstance(network, ResNet):
        return {"classifier": "fc", "first_conv": "conv1"}
    if isinstance(network, VisionTransformer):
        return {"classifier": "head", "first_conv": "patch_embed.proj"}
    cfg = getattr(getattr(network, "model", None), "pretrained_cfg", None) or {}  # a timm: backbone knows its own
    return {k: cfg[k] for k in ("classifier", "first_conv") if cfg.get(k)}


def export_timm(source, out_dir: str | os.PathLike, *, image_size: int | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` (timm key names) + ``out_dir/config.json``; returns ``out_dir``."""
    from selfsup.nn.backbones import _tensors_for_safetensors
    from selfsup.runtime import atomic_write_all

    encoder = _encoder(source, image_size)
    timm_name, args, state = timm_state_dict(encoder.network)
    size = args.get("img_size") or encoder.image_size or 224
    out_dir = Path(out_dir)
    config = {
        "architecture": timm_name,
        "num_classes": 0,
        "num_features": int(encoder.network.num_features),
        "model_args": args,
        "pretrained_cfg": {"input_size": [encoder.in_chans, size, size], "mean": encoder.mean, "std": encoder.std,
                           "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": 0,
                           **_timm_layer_names(encoder.network)},
        "selfsup_source": encoder.source,
        "how_to_load": (f"timm.create_model('local-dir:{out_dir}', pretrained=True), or timm.create_model("
                        f"{timm_name!r}, pretrained=True, num_classes=0, **model_args, pretrained_cfg_overlay="
                        f"dict(file='{out_dir / TIMM_WEIGHTS}'))"),
    }
    from safetensors.torch import save

    weights = save(_tensors_for_safetensors(state), metadata={"format": "pt"})
    text = json.dumps(config, indent=2) + "\n"
    atomic_write_all([(out_dir / TIMM_WEIGHTS, lambda tmp: Path(tmp).write_bytes(weights)),
                      (out_dir / TIMM_CONFIG, lambda tmp: Path(tmp).write_bytes(text.encode()))])
    return out_dir


def export(source, fmt: str, out: str | os.PathLike, *, image_size: int | None = None) -> Path:
    """`selfsup export`: ``fmt`` is "onnx" or "timm"."""
    if fmt == "onnx":
        return export_onnx(source, out, image_size=image_size)
    if fmt == "timm":
        return export_timm(source, out, image_size=image_size)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
