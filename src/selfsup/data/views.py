"""View makers: a batch -> ``Views`` (cookbook §3.1 augmentations, §3.1.1 multi-crop).

A view maker is the only thing a method knows about its data pipeline, so other modalities (tabular,
audio, text) plug in by implementing the same ``ViewMaker`` protocol. The image view makers here are
built from ``AugmentConfig``s, one per view, which allows asymmetric views (BYOL, DINO).

Recipes, each default sourced:
- ``simclr_views``: 2 symmetric views, SimCLR (Chen et al. 2020, appendix A). Blur p=0.5 on ImageNet-sized
  images; SimCLR's CIFAR-10 recipe (appendix B.9) drops blur, so blur_p defaults to 0 for size <= 32.
- ``byol_views``: 2 asymmetric views, BYOL (Grill et al. 2020, Table 6): jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale 0.2; view 1 blur p=1.0 and no solarization, view 2 blur p=0.1 and solarization p=0.2.
- ``multicrop_views``: DINO (Caron et al. 2021, main_dino.py defaults): 2 global crops at scale (0.4, 1) with
  BYOL's asymmetric photometric ops, plus ``n_local`` small crops at scale (0.05, 0.4) with blur p=0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from selfsup.config import to_plain
from selfsup.contract import Views
from selfsup.data.augment import Augment, AugmentConfig, config_field_names, to_float01
from selfsup.data.masking import block_mask, group_mask, random_mask
from selfsup.names import did_you_mean

VIEW_KINDS = ("simclr", "byol", "multicrop")


@runtime_checkable
class ViewMaker(Protocol):
    """Turns a batch (on the training device) into :class:`selfsup.contract.Views`. Modality-agnostic.

    ``describe()`` lists what each crop does (written to the run's config.yaml as ``resolved_views``), so nobody
    needs to read a view maker's internals."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views: ...

    def describe(self) -> list[dict]: ...


class MultiView:
    """``len(global_cfgs)`` global views (one config each) followed by ``n_local`` views of ``local_cfg``.

    Each view draws its own per-image parameters, in view order, from the same ``generator``.
    """

    def __init__(
        self, global_cfgs: Sequence[AugmentConfig], local_cfg: AugmentConfig | None = None, n_local: int = 0
    ):
        global_cfgs = list(global_cfgs)
        if not global_cfgs or not all(isinstance(c, AugmentConfig) for c in global_cfgs):
            raise ValueError("MultiView needs a non-empty list of AugmentConfig, one per global view")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        if n_local > 0 and local_cfg is None:
            raise ValueError(f"n_local={n_local} local views need a local_cfg (an AugmentConfig)")
        self.global_cfgs = global_cfgs
        self.local_cfg = local_cfg
        self.n_global = len(global_cfgs)
        self.n_local = n_local
        self._global_augs = [Augment(c) for c in global_cfgs]
        self._local_aug = Augment(local_cfg) if local_cfg is not None and n_local > 0 else None

    def __repr__(self) -> str:
        return (
            f"MultiView(n_global={self.n_global}, n_local={self.n_local}, "
            f"global_cfgs={self.global_cfgs}, local_cfg={self.local_cfg})"
        )

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        # Convert once when several views read the batch; a single view folds the 1/255 into its crop.
        x = to_float01(batch) if batch.dtype == torch.uint8 and self.n_global + self.n_local > 1 else batch
        augs = self._global_augs + [self._local_aug] * (self.n_local if self._local_aug is not None else 0)
        made = [aug.apply(x, generator) for aug in augs]
        return Views([c for c, _ in made], self.n_global, geometry=[g for _, g in made])

    def describe(self) -> list[dict]:
        """One dict of augmentation settings per crop, global crops first."""
        cfgs = self.global_cfgs + [self.local_cfg] * (self.n_local if self._local_aug is not None else 0)
        return [to_plain(c) for c in cfgs]

    def global_views(self) -> MultiView:
        """The global crops alone (one resolution: what LiDAR and other view-based evaluations draw)."""
        return MultiView(self.global_cfgs)


class RandomMaskViews:
    """A view maker plus MAE's random patch mask, drawn with the batch from the same generator
    (:func:`selfsup.data.masking.random_mask`): ``masks["mask"]`` (B, N) bool, ``masks["keep"]`` (B, K) and
    ``masks["restore"]`` (B, N) long."""

    def __init__(self, inner: MultiView, num_patches: int, ratio: float):
        self.inner, self.num_patches, self.ratio = inner, num_patches, ratio
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        pm = random_mask(batch.shape[0], self.num_patches, self.ratio, generator)
        views.masks.update(mask=pm.mask, keep=pm.keep, restore=pm.restore)
        return views

    def describe(self) -> list[dict]:
        return [{**d, "mask": "random", "mask_ratio": self.ratio} for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class GroupMaskViews:
    """A view maker plus SimMIM's mask of random square groups of patches, drawn with the batch from the same
    generator (:func:`selfsup.data.masking.group_mask`): ``masks["mask"]`` (B, N) bool, True where the encoder
    sees the mask token."""

    def __init__(self, inner: MultiView, grid: tuple[int, int], group: int, ratio: float):
        self.inner, self.grid, self.group, self.ratio = inner, tuple(grid), group, ratio
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        mask = group_mask(batch.shape[0], self.grid, self.group, self.ratio, generator)
        views.masks["mask"] = mask.to(views.crops[0].device)
        return views

    def describe(self) -> list[dict]:
        return [{**d, "mask": f"groups of {self.group}x{self.group} patches", "mask_ratio": self.ratio}
                for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class BlockMaskViews:
    """A view maker plus iBOT's block-wise masks of every global crop (Zhou et al. 2022; BEiT's Alg. 1 through
    :func:`selfsup.data.masking.block_mask`), drawn with the batch from the same generator:
    ``masks["block"]`` (n_global, B, N) bool, True where the student sees the mask token.

    Each global crop of each sample is masked with probability ``probability`` and then with a ratio drawn from
    U(``ratio``); the others stay whole. iBOT's release scripts (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``,
    loader.py ``random.choice``) give probability 0.5 and ratio U(0.1, 0.5).
    """

    def __init__(self, inner: MultiView, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5),
                 probability: float = 0.5, min_block: int | None = None):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"the masking probability must be in [0, 1], got {probability}")
        self.inner, self.grid, self.ratio, self.probability = inner, tuple(grid), tuple(ratio), probability
        # iBOT's loader.py: the smallest block is (min(h, w) // 3) ** 2 patches (16 on 14x14, 1 on 4x4)
        self.min_block = min_block if min_block is not None else max(1, (min(grid) // 3) ** 2)
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        b, device = batch.shape[0], views.crops[0].device
        masks = []
        for _ in range(views.n_global):
            m = block_mask(b, self.grid, self.ratio, generator, min_block=self.min_block)
            chosen = torch.rand(b, generator=generator, device=m.device) < self.probability
            masks.append(m & chosen[:, None])
        views.masks["block"] = torch.stack(masks).to(device)
        return views

    def describe(self) -> list[dict]:
        mask = {"mask": "block", "mask_ratio": list(self.ratio), "mask_probability": self.probability}
        return [{**d, **mask} if i < self.n_global else d for i, d in enumerate(self.inner.describe())]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


# --------------------------------------------------------------------------------------------- recipes


def _check_overrides(overrides: dict[str, Any]) -> None:
    valid = config_field_names()
    for name in overrides:
        if name not in valid:
            raise ValueError(f"unknown augmentation override {name!r}.{did_you_mean(name, valid)} Valid names: "
                             f"{', '.join(valid)}")


def _base(
    size: int, mean: Sequence[float], std: Sequence[float], channels: int, **fields: Any
) -> dict[str, Any]:
    """Shared fields of a recipe's views; color-only ops are switched off for 1-channel images so the
    resolved config says what actually happens."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    for name, v in (("mean", mean), ("std", std)):
        if len(tuple(v)) not in (1, channels):
            raise ValueError(
                f"{name} has {len(tuple(v))} values for {channels}-channel images; give 1 or {channels}"
            )
    base = dict(size=size, mean=tuple(mean), std=tuple(std), **fields)
    if channels == 1:
        base.update(saturation=0.0, hue=0.0, gray_p=0.0)
    return base


def _configs(
    base: dict[str, Any], per_view: Sequence[dict[str, Any]], overrides: dict[str, Any]
) -> list[AugmentConfig]:
    _check_overrides(overrides)
    return [AugmentConfig(**{**base, **view, **overrides}) for view in per_view]


def simclr_views(
    size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3, **overrides: Any
) -> MultiView:
    """SimCLR: two views from the same distribution (Chen et al. 2020, appendix A; CIFAR: appendix B.9)."""
    base = _base(size, mean, std, channels, blur_p=0.0 if size <= 32 else 0.5)
    return MultiView(_configs(base, [{}, {}], overrides))


def crop_views(
    size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3, scale: tuple[float, float] = (0.2, 1.0),
    flip: bool = True,
) -> MultiView:
    """One random resized crop (+ a horizontal flip unless ``flip=False``) and nothing photometric: the views of the
    masked-modeling methods (MAE appendix A.1, SimMIM, I-JEPA without the flip, data2vec 2.0) and the pretext
    tasks, whose objectives do not need colour invariance."""
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"the crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    base = _base(size, mean, std, channels, blur_p=0.0)
    only = {"scale": tuple(scale), "jitter_p": 0.0, "gray_p": 0.0, "solarize_p": 0.0}
    return MultiView(_configs(base, [only], {} if flip else {"hflip_p": 0.0}))


def byol_views(
    size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3, **overrides: Any
) -> MultiView:
    """BYOL: asymmetric views (Grill et al. 2020, Table 6). Overrides apply to both views."""
    base = _base(size, mean, std, channels, saturation=0.2)
    per_view = [dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2)]
    return MultiView(_configs(base, per_view, overrides))


def multicrop_views(
    size: int,
    local_size: int,
    n_local: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    **overrides: Any,
) -> MultiView:
    """DINO multi-crop (Caron et al. 2021; cookbook §3.1.1): 2 global views (BYOL's asymmetric photometric
    ops) at ``size`` and scale ``global_scale``, plus ``n_local`` views at ``local_size``, ``local_scale``,
    blur p=0.5. Crop scales are set with global_scale/local_scale, not the ``scale`` override."""
    if "scale" in overrides or "size" in overrides:
        raise ValueError(
            "multicrop_views sets crop scale/size per view kind: use global_scale/local_scale and "
            "size/local_size instead of the 'scale'/'size' overrides"
        )
    base = _base(size, mean, std, channels, saturation=0.2)
    per_view = [
        dict(scale=global_scale, blur_p=1.0, solarize_p=0.0),
        dict(scale=global_scale, blur_p=0.1, solarize_p=0.2),
    ]
    globals_ = _configs(base, per_view, overrides)
    local = _configs({**base, "size": local_size}, [dict(scale=local_scale, blur_p=0.5)], overrides)[0]
    return MultiView(globals_, local, n_local)


def default_local_size(size: int) -> int:
    """DINO's local/global side ratio, 96/224, applied to ``size`` (224 -> 96, 32 -> 14, 28 -> 12)."""
    return max(1, round(size * 96 / 224))


def build_view_maker(
    kind: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    n_local: int = 0,
    local_size: int | None = None,
    **overrides: Any,
) -> ViewMaker:
    """Build a view maker by name: 'simclr', 'byol' or 'multicrop' (config-driven entry point).

    For 'multicrop', ``global_scale``/``local_scale`` may be given among the overrides and ``local_size``
    defaults to ``default_local_size(size)``.
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view maker kind {kind!r}.{did_you_mean(kind, VIEW_KINDS)} Valid kinds: "
                         f"{', '.join(VIEW_KINDS)}")
    if kind != "multicrop":
        if n_local:
            raise ValueError(f"n_local={n_local} local crops need kind='multicrop' (got kind={kind!r})")
        maker = simclr_views if kind == "simclr" else byol_views
        return maker(size, mean, std, channels, **overrides)
    scales = {k: tuple(overrides.pop(k)) for k in ("global_scale", "local_scale") if k in overrides}
    local_size = default_local_size(size) if local_size is None else local_size
    return multicrop_views(size, local_size, n_local, mean, std, channels, **scales, **overrides)


def override_names() -> tuple[str, ...]:
    """The names ``**overrides`` accept (AugmentConfig fields)."""
    return config_field_names()


__all__ = [
    "VIEW_KINDS",
    "MultiView",
    "ViewMaker",
    "build_view_maker",
    "byol_views",
    "default_local_size",
    "multicrop_views",
    "override_names",
    "simclr_views",
]
