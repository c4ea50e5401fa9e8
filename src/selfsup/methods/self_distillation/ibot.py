"""iBOT (Zhou et al. 2022, "Image BERT Pre-Training with Online Tokenizer"; cookbook §2.3, §2.5, §3.4): DINO's
[CLS] self-distillation across multi-crop views, plus masked image modeling in which the EMA teacher's patch head is
the tokenizer: the student sees each global crop with block-wise masked patches (mask tokens) and must match, on
the masked patches, the teacher's centered and sharpened patch distributions of the same crop unmasked.
Loss: :func:`selfsup.losses.self_distillation.ibot_loss`.

Defaults are the released ViT-S/16 run's (bytedance/ibot README: ``--teacher_temp 0.07
--warmup_teacher_temp_epochs 30 --norm_last_layer false --shared_head true --out_dim 8192 --pred_ratio 0 0.3
--pred_ratio_var 0 0.2``) and main_ibot.py's argument defaults otherwise. Views: DINO's multi-crop; each global
crop of each sample is masked with probability 0.5, with a block-wise mask (BEiT) of ratio U(0.1, 0.5)
(``BlockMaskViews``). Local crops are never masked and give [CLS] outputs only. Both centers (the [CLS] one over K
prototypes, the patch one over K' patch prototypes) are updated once per optimizer step from every micro-batch's
teacher outputs, all-reduced across processes, as DINO's.

Not implemented: the reference's ``--pred_start_epoch`` (masking from the first epoch, its default) and the
teacher's own ``--shared_head_teacher`` switch (here the teacher is an EMA copy of the student, head included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup import distributed as du
from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.data.views import BlockMaskViews
from selfsup.losses.self_distillation import dino_teacher_probs, ibot_loss
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_views
from selfsup.nn.heads import IBOTHead
from selfsup.nn.teacher import cosine_momentum, ema_update, make_teacher, warmup_temperature
from selfsup.nn.vit import VisionTransformer


@dataclass
class IBOTParams:
    out_dim: int = 8192                  # --out_dim (README ViT-S/16)
    patch_out_dim: int = 0               # --patch_out_dim, separate heads only; 0 = out_dim (the shared head's)
    shared_head: bool = True             # --shared_head true (README ViT-S/16): one set of prototypes
    hidden_dim: int = 2048               # iBOTHead: 3-layer GELU MLP 2048 -> bottleneck 256
    bottleneck_dim: int = 256
    norm_last_layer: bool = False        # --norm_last_layer false (README ViT-S/16)
    student_temp: float = 0.1            # iBOTLoss student_temp
    teacher_temp: float = 0.07           # --teacher_temp 0.07 (README ViT-S/16), after the warm-up
    warmup_teacher_temp: float = 0.04    # --warmup_teacher_temp
    teacher_patch_temp: float = 0.07     # --teacher_patch_temp
    warmup_teacher_patch_temp: float = 0.04  # --warmup_teacher_patch_temp
    warmup_teacher_temp_epochs: int = 30     # --warmup_teacher_temp_epochs (both temperatures)
    center_momentum: float = 0.9         # iBOTLoss center_momentum (the [CLS] center)
    patch_center_momentum: float = 0.9   # iBOTLoss center_momentum2 (the patch center)
    lambda_cls: float = 1.0              # --lambda1
    lambda_patch: float = 1.0            # --lambda2
    mask_ratio_low: float = 0.1          # --pred_ratio 0.3 --pred_ratio_var 0.2: ratio ~ U(0.1, 0.5)
    mask_ratio_high: float = 0.5
    mask_probability: float = 0.5        # --pred_ratio 0 0.3: loader.py picks 0 or U(0.1, 0.5) with equal odds
    ema_base: float = 0.996              # --momentum_teacher, cosine schedule to 1
    freeze_last_layer_epochs: int = 1    # --freeze_last_layer


class IBOT(Method):
    def __init__(self, encoder: VisionTransformer, head: IBOTHead, view_maker, p: IBOTParams, patch_dim: int):
        super().__init__()
        self.encoder, self.head, self.view_maker, self.p = encoder, head, view_maker, p
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(head)
        self.register_buffer("center", torch.zeros(p.out_dim))
        self.register_buffer("patch_center", torch.zeros(patch_dim))
        # teacher output sums of the current optimizer step (all micro-batches), for the center updates
        self.register_buffer("_cls_sum", torch.zeros(p.out_dim), persistent=False)
        self.register_buffer("_patch_sum", torch.zeros(patch_dim), persistent=False)
        self.register_buffer("_count", torch.zeros(()), persistent=False)

    def temperatures(self, epoch: int) -> tuple[float, float]:
        """The teacher's ([CLS], patch) temperatures at ``epoch``: each warmed up linearly, then constant."""
        p = self.p
        return (warmup_temperature(epoch, p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_epochs),
                warmup_temperature(epoch, p.warmup_teacher_patch_temp, p.teacher_patch_temp,
                                   p.warmup_teacher_temp_epochs))

    @staticmethod
    def _all_tokens(features: dict) -> torch.Tensor:
        return torch.cat([features["cls"][:, None], features["tokens"]], dim=1)  # (B, 1+N, D), [CLS] first

    def forward(self, views: Views, progress: Progress) -> dict:
        p, g = self.p, views.n_global
        masks = views.masks["block"]  # (n_global, B, N)
        if masks.shape[0] != g:
            raise ValueError(f"iBOT needs one block mask per global crop: {masks.shape[0]} masks, {g} global crops")
        # the global crops share a resolution: one encoder call for all of them, as iBOT's MultiCropWrapper
        student = self.encoder.forward_features(torch.cat(views.global_crops), masks=masks.flatten(0, 1))
        s_cls, s_patch = self.head(self._all_tokens(student))
        local_cls = forward_views(lambda x: self.head(self.encoder.forward_features(x)["cls"]), views.local_crops)
        student_cls = list(s_cls.chunk(g)) + local_cls
        with torch.no_grad():
            teacher = self.teacher_encoder.forward_features(torch.cat(views.global_crops))
            t_cls, t_patch = self.teacher_head(self._all_tokens(teacher))
            t_cls, t_patch = t_cls.float(), t_patch.float()
            self._cls_sum += t_cls.sum(dim=0)
            self._patch_sum += t_patch.mean(dim=1).sum(dim=0)  # iBOT: per-image mean over patches, then the batch
            self._count += t_cls.shape[0]
        temp, patch_temp = self.temperatures(progress.epoch)
        cls_probs = [dino_teacher_probs(t, self.center, temp) for t in t_cls.chunk(g)]
        patch_probs = [dino_teacher_probs(t, self.patch_center, patch_temp) for t in t_patch.chunk(g)]
        loss, cls_term, patch_term = ibot_loss(student_cls, cls_probs, list(s_patch.chunk(g)), patch_probs,
                                               list(masks), p.student_temp, p.lambda_cls, p.lambda_patch)
        return {"loss": loss, "features": student["pooled"].chunk(g)[0], "ibot_cls": cls_term.detach(),
                "ibot_patch": patch_term.detach(), "teacher_temp": temp, "masked_fraction": masks.float().mean()}

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.p.freeze_last_layer_epochs:  # iBOT's cancel_gradients_last_layer
            for prm in self.head.last_layer:
                prm.grad = None

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        total = du.all_reduce_sum_(torch.cat([self._cls_sum, self._patch_sum, self._count.view(1)]))
        k = self._cls_sum.numel()
        count = total[-1]
        self.center.mul_(self.p.center_momentum).add_(total[:k] / count, alpha=1 - self.p.center_momentum)
        self.patch_center.mul_(self.p.patch_center_momentum).add_(total[k:-1] / count,
                                                                  alpha=1 - self.p.patch_center_momentum)
        for b in (self._cls_sum, self._patch_sum, self._count):
            b.zero_()
        m = cosine_momentum(progress.step - 1, progress.total_steps, self.p.ema_base, 1.0)  # the step just done
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        return {"ema_momentum": m}

    @property
    def guillotine_head(self) -> nn.Sequential:
        return self.head.cls.mlp


@register("ibot", IBOTParams, family="self-distillation",
          cookbook="§2.3 eq. (12) on [CLS]; §2.5 masked modeling with an online tokenizer; §3.4 teacher",
          summary="DINO on the [CLS] token plus self-distillation of block-masked patch tokens from an EMA teacher")
def build(cfg, data: DataInfo) -> IBOT:
    p = cfg.params
    if not 0.0 <= p.mask_ratio_low <= p.mask_ratio_high < 1.0:
        raise ConfigError(f"ibot.mask_ratio_low={p.mask_ratio_low}, ibot.mask_ratio_high={p.mask_ratio_high}: "
                          "need 0 <= low <= high < 1 (fractions of the patches masked)")
    if not 0.0 <= p.mask_probability <= 1.0:
        raise ConfigError(f"ibot.mask_probability={p.mask_probability} must be in [0, 1]")
    if p.shared_head and p.patch_out_dim not in (0, p.out_dim):
        raise ConfigError(f"ibot.patch_out_dim={p.patch_out_dim} with ibot.shared_head=true: a shared head uses the "
                          f"[CLS] prototypes (out_dim={p.out_dim}); set ibot.shared_head=false for separate ones")
    encoder = make_backbone(cfg, data, mask_token=True)
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"iBOT masks patch tokens, so it needs a ViT: set model.backbone=vit_tiny (or vit_small), "
                          f"not {cfg.model.backbone!r}")
    patch_dim = p.out_dim if p.shared_head or p.patch_out_dim == 0 else p.patch_out_dim
    head = IBOTHead(encoder.num_features, p.out_dim, patch_dim, p.hidden_dim, p.bottleneck_dim,
                    norm_last_layer=p.norm_last_layer, shared=p.shared_head)
    grid = (cfg.views.size // encoder.patch_size,) * 2
    views = BlockMaskViews(make_views(cfg, "multicrop", data), grid, (p.mask_ratio_low, p.mask_ratio_high),
                           p.mask_probability)
    return IBOT(encoder, head, views, p, patch_dim)
