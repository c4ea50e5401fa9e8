"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture";
cookbook §2.5, and §3.1 where it is the example of learning without hand-made augmentations): from one large context
block of an image, a narrow ViT predictor predicts the *representations* (not the pixels) of a few target blocks, as
given by an EMA copy of the encoder run on the whole image. Loss:
:func:`selfsup.losses.masked_modeling.ijepa.ijepa_loss` on :func:`~selfsup.losses.masked_modeling.ijepa.ijepa_targets`.

- Context encoder: the online ViT on the context patches only (token dropping, ``keep=``), as the reference's
  ``encoder(imgs, masks_enc)``.
- Exported (and evaluated): the target encoder, as the paper does ("We use the target-encoder for evaluation and
  average pool its output", appendix A.1); ``ijepa.export=context`` exports the context encoder instead. The
  predictor is never exported.
- Target encoder: an EMA copy on the FULL image, no gradient; its patch tokens are layer-normed over the feature
  dimension, then gathered at each target block (reference src/train.py ``forward_target``).
- Predictor: linear embed to a narrow width, fixed 2-D sine-cosine positions (the reference's frozen
  ``predictor_pos_embed``) added to the context tokens and to one learned mask token per target patch, a few
  transformer blocks, LayerNorm, linear back to the encoder's width; one pass per target block, the context repeated
  (reference ``VisionTransformerPredictor``).
- Masks (:func:`selfsup.data.masking.multi_block_mask`): 4 targets of scale U(0.15, 0.2), aspect U(0.75, 1.5), one
  context of scale U(0.85, 1.0), aspect 1, with the targets removed (paper §3; configs/in1k_vith14_ep300.yaml
  ``mask:``; ``min_keep`` 10 there). Drawn with the batch from the step's generator (``MultiBlockViews``).
- Augmentation: random resized crop of scale (0.3, 1) only; no flip, colour or blur (``data: crop_scale [0.3, 1.0]
  use_horizontal_flip/use_color_distortion/use_gaussian_blur false``).
- EMA momentum: linear from 0.996 to 1.0 over ``ipe_scale`` x the run (``optimization: ema [0.996, 1.0]
  ipe_scale 1.0``; the reference's ``momentum_scheduler``), updated once per optimizer step.
- Predictor size: the reference uses 384 wide x 12 deep for ViT-H/14 (``meta: pred_emb_dim 384, pred_depth 12``)
  with the encoder's head count (src/helper.py ``init_model``). The default here, 96 x 4, is a narrow, shallow
  choice for a ViT-tiny (half its width), not a paper value; the ImageNet recipe sets the reference's.

Not implemented: the reference's predictor init rescaling (``fix_init_weight``), its start LR of the warm-up
(``start_lr``; warm-up here starts from ~0) and several context blocks (``num_enc_masks`` > 1; the configs use 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.masking import multi_block_mask
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, crop_views
from selfsup.losses.masked_modeling.ijepa import LOSS_KINDS, ijepa_loss, ijepa_targets
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.methods.masked_modeling.mae import sincos_pos_embed
from selfsup.nn.teacher import ema_update, make_teacher
from selfsup.nn.vit import Block, VisionTransformer


@dataclass
class IJEPAParams:
    n_targets: int = 4                                  # mask.num_pred_masks 4 (paper §3 "Targets": M = 4)
    target_scale: tuple[float, float] = (0.15, 0.2)     # mask.pred_mask_scale
    target_aspect: tuple[float, float] = (0.75, 1.5)    # mask.aspect_ratio
    context_scale: tuple[float, float] = (0.85, 1.0)    # mask.enc_mask_scale (unit aspect, paper §3 "Context")
    min_keep: int = 10                                  # mask.min_keep 10 (ImageNet configs)
    predictor_dim: int = 96                             # untuned, narrow for a ViT-tiny; reference 384 (ViT-H)
    predictor_depth: int = 4                            # untuned, shallow for a ViT-tiny; reference 12 (ViT-H)
    predictor_heads: int = 0                            # 0: the encoder's head count (helper.py init_model)
    ema_start: float = 0.996                            # optimization.ema [0.996, 1.0], linear
    ema_end: float = 1.0
    ipe_scale: float = 1.0                              # optimization.ipe_scale: stretches the EMA schedule
    loss: str = "smooth_l1"                             # train.py loss_fn: F.smooth_l1_loss; "l2": paper eq. (1)
    crop_scale_min: float = 0.3                         # data.crop_scale [0.3, 1.0]
    export: str = "target"                              # the paper evaluates the target encoder (appendix A.1)


class MultiBlockViews:
    """A view maker plus I-JEPA's context and target blocks, drawn with the batch from the same generator:
    ``masks["context"]`` (B, Kc) and ``masks["targets"]`` (T, B, Kt) long patch indices, ascending, disjoint."""

    def __init__(self, inner: MultiView, grid: tuple[int, int], p: IJEPAParams):
        self.inner, self.grid, self.n_global = inner, tuple(grid), inner.n_global
        self.options = dict(n_targets=p.n_targets, target_scale=tuple(p.target_scale),
                            target_aspect=tuple(p.target_aspect), context_scale=tuple(p.context_scale),
                            min_keep=p.min_keep)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        m = multi_block_mask(batch.shape[0], self.grid, generator, **self.options)
        device = views.crops[0].device
        views.masks.update(context=m.context.to(device), targets=torch.stack(m.targets).to(device))
        return views

    def describe(self) -> list[dict]:
        return [{**d, "mask": "multi-block", **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in self.options.items()}} for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class IJEPAPredictor(nn.Module):
    """Context tokens (+ their positions) and mask tokens at a target block's positions -> blocks -> the block's
    predicted representations, in the encoder's width."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_pos_embed(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, enc_dim)
        for m in self.modules():  # the reference's _init_weights: trunc normal 0.02, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _pos(self, idx: torch.Tensor) -> torch.Tensor:
        pos = self.pos.expand(idx.shape[0], -1, -1)
        return torch.gather(pos, 1, idx.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """context (B, Kc, E) encoder tokens at ``context_idx`` (B, Kc); targets (T, B, Kt) -> (T, B, Kt, E)."""
        T, B, Kt = targets.shape
        x = self.embed(context) + self._pos(context_idx).to(context.dtype)
        Kc = x.shape[1]
        queries = self.mask_token.to(x.dtype) + self._pos(targets.flatten(0, 1)).to(x.dtype)  # (T*B, Kt, d)
        x = torch.cat([x.repeat(T, 1, 1), queries], dim=1)  # block-major, as the reference's x.repeat(len(masks))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, Kc:]).reshape(T, B, Kt, -1)


class IJEPA(Method):
    def __init__(self, encoder: VisionTransformer, predictor: IJEPAPredictor, view_maker, p: IJEPAParams):
        super().__init__()
        self.encoder, self.predictor, self.view_maker, self.p = encoder, predictor, view_maker, p
        self.teacher_encoder = make_teacher(encoder)

    def momentum(self, step: int, total_steps: int) -> float:
        """The reference's linear schedule: ema_start + step (ema_end - ema_start) / (total_steps x ipe_scale)."""
        span = max(total_steps * self.p.ipe_scale, 1.0)
        return self.p.ema_start + (self.p.ema_end - self.p.ema_start) * min(step / span, 1.0)

    def forward(self, views: Views, progress: Progress) -> dict:
        x, context, targets = views.crops[0], views.masks["context"], views.masks["targets"]
        with torch.no_grad():
            target = ijepa_targets(self.teacher_encoder.forward_features(x)["tokens"], targets)
        out = self.encoder.forward_features(x, keep=context)
        pred = self.predictor(out["tokens"], context, targets)
        loss = ijepa_loss(pred, target, self.p.loss)
        return {"loss": loss, "features": out["pooled"], "context_tokens": float(context.shape[1]),
                "target_tokens": float(targets.shape[-1])}

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        m = self.momentum(progress.step - 1, progress.total_steps)  # the step just done; 0.996 after the first
        ema_update(self.teacher_encoder, self.encoder, m)
        return {"ema_momentum": m}

    def exports(self) -> dict[str, nn.Module]:
        return {"backbone": self.teacher_encoder if self.p.export == "target" else self.encoder}

    @property
    def guillotine_head(self) -> None:
        return None  # no projector: the representation is the encoder's


@register("ijepa", IJEPAParams, family="masked image modeling", cookbook="§2.5; §3.1 (I-JEPA)",
          summary="a ViT on a context block; a narrow predictor regresses an EMA encoder's features of 4 target blocks")
def build(cfg, data: DataInfo) -> IJEPA:
    p = cfg.params
    if p.export not in ("target", "context"):
        raise ValueError(f"ijepa.export={p.export!r}: choose target (the paper's evaluation) or context")
    if p.loss not in LOSS_KINDS:
        raise ValueError(f"ijepa.loss={p.loss!r}: choose one of {LOSS_KINDS}")
    if not 0.0 < p.crop_scale_min <= 1.0:
        raise ValueError(f"ijepa.crop_scale_min={p.crop_scale_min} must be in (0, 1]; I-JEPA's is 0.3")
    encoder = make_backbone(cfg, data)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"I-JEPA drops tokens outside the context block, so it needs a ViT: set "
                         f"model.backbone=vit_tiny (or vit_small), not {cfg.model.backbone!r}")
    size = cfg.views.size
    grid = (size // encoder.patch_size, size // encoder.patch_size)
    heads = p.predictor_heads or encoder.blocks[0].attn.num_heads
    predictor = IJEPAPredictor(encoder.embed_dim, p.predictor_dim, p.predictor_depth, heads, grid)
    # crop only (configs: no flip, colour distortion or blur)
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0), flip=False)
    views = MultiBlockViews(only, grid, p)
    multi_block_mask(1, grid, torch.Generator().manual_seed(0), **views.options)  # a bad mask config fails here
    return IJEPA(encoder, predictor, views, p)
