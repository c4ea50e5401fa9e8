"""Pieces every method builds from the config: backbone, projector, view maker."""

from __future__ import annotations

import dataclasses

from torch import nn

from selfsup.config import Config, ConfigError
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, build_view_maker
from selfsup.nn.backbones import build_backbone
from selfsup.nn.heads import projector

VIT_SIZE_KEYS = ("embed_dim", "depth", "num_heads")


def make_backbone(cfg: Config, data: DataInfo, **vit_options) -> nn.Module:
    """The image encoder of ``model.*`` for samples of ``data.shape`` (a ViT's positions follow ``views.size``).
    ``vit_options`` go to a ViT only (e.g. ``mask_token=True`` for a method that feeds it masks)."""
    if data.modality != "image":
        raise ValueError(f"model.backbone={cfg.model.backbone!r} is an image backbone; the data is {data.modality}")
    m, in_chans = cfg.model, data.channels
    size = {k: v for k in VIT_SIZE_KEYS if (v := getattr(m, k))}  # a ViT's width, depth, heads other than its name's
    if size and not m.backbone.startswith("vit"):
        raise ConfigError(f"model.{'/'.join(size)} set for model.backbone={m.backbone!r}: these size a ViT (vit_tiny, "
                          f"vit_small, vit_base); remove them or choose a ViT")
    if m.backbone.startswith("resnet"):
        return build_backbone(m.backbone, in_chans=in_chans, width=m.width, stem=m.stem)
    if m.backbone.startswith("vit"):
        return build_backbone(m.backbone, in_chans=in_chans, img_size=cfg.views.size, patch_size=m.patch_size,
                              pool=m.pool, **size, **vit_options)
    return build_backbone(m.backbone, in_chans=in_chans)


def make_projector(cfg: Config, in_dim: int) -> nn.Module:
    m = cfg.model
    return projector(in_dim, m.projector_hidden, m.projector_out, num_layers=m.projector_layers,
                     last_bn=m.projector_last_bn)


def make_views(cfg: Config, kind: str, data: DataInfo) -> MultiView:
    """The method's view recipe (`kind`), with every value the user set in `views.*` applied on top.

    `views.n_local > 0` adds multi-crop (cookbook §3.1.1) to any method: the method's own global views plus small
    crops of `views.local_size` pixels at `views.local_scale`, photometrically like the first global view.
    """
    v, mean, std, channels = cfg.views, data.mean, data.std, data.channels
    names = ("scale", "ratio", "hflip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "gray_p",
             "blur_p", "solarize_p")
    overrides = {k: getattr(v, k) for k in names if getattr(v, k) is not None}
    if kind == "multicrop":  # DINO's own local crops (blur 0.5, no solarization); views.scale is the global scale
        if "scale" in overrides:
            overrides["global_scale"] = overrides.pop("scale")
        return build_view_maker(kind, v.size, mean, std, channels, n_local=v.n_local, local_size=v.local_size,
                                local_scale=v.local_scale, **overrides)
    views = build_view_maker(kind, v.size, mean, std, channels, **overrides)
    if v.n_local == 0:
        return views
    local = dataclasses.replace(views.global_cfgs[0], size=v.local_size, scale=v.local_scale)
    return MultiView(views.global_cfgs, local, v.n_local)
