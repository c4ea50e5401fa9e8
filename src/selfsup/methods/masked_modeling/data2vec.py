"""data2vec 2.0 for images (Baevski et al. 2022, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language"; cookbook §2.5): an EMA teacher encodes the whole image ONCE; its
top-K block outputs, instance-normalized and averaged, are the contextualized targets of every patch. The student
(the encoder being trained) sees only the visible tokens (token dropping, as MAE) of ``clone_batch`` differently
masked copies of each image, which share that one teacher pass; a light convolutional decoder fills the masked
positions with noise, mixes them with the visible tokens on the 2-D grid and regresses the targets there (L2, scaled by
1/sqrt(D)), plus a small term pulling the student's [CLS] output to the mean target. Loss:
:mod:`selfsup.losses.masked_modeling.data2vec`.

Defaults are the reference's image pre-training (fairseq ``examples/data2vec/config/v2/base_images_only_task.yaml``,
``models/data2vec2.py``, ``models/modalities/images.py`` and ``modules.py``): inverse block masking of 80% of the
patches (3x3 blocks grown around random centres mark the 20% kept; ``mask_prob_adjust`` 0.07, every image the same
count), K = 10 top layers, instance norm per layer then a LayerNorm of the average, [CLS] weight 0.01, conv decoder
of 6 layers (kernel 3, 16 groups, LayerNorm without affine, GELU, residual) + a linear map, masked inputs N(0, 0.01),
EMA decay 0.9998 -> 0.99999 linearly over the first 100k of 375.3k updates. Sized for a ViT-tiny (said at each
field): ``clone_batch`` 4 (reference 16) and ``decoder_dim`` 192 (reference 768 = a ViT-B's width).

Differences from the reference: the targets are this pre-norm ViT's block outputs (the residual stream), not the
FFN outputs before the residual of the reference's post-norm blocks (``end_of_block_targets: false``), and its
first 2 blocks are not a separate "prenet" (they are blocks 1-2 of 12, so K = 10 averages the same positions). Not
implemented: the reference's ALiBi options (off for images), ``mask_dropout`` (0), even decoder kernels, and its
stop-on-collapse checks (``min_target_var``/``min_pred_var``: 0 for images). Only the student encoder is exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as du
from selfsup.config import ConfigError
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, crop_views
from selfsup.losses.masked_modeling.data2vec import data2vec_cls_term, data2vec_regression, data2vec_targets
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.nn.teacher import ema_update, make_teacher
from selfsup.nn.vit import VisionTransformer


@dataclass
class Data2VecParams:
    average_top_k_layers: int = 10      # average_top_k_layers: 10 (the 10 blocks after a 2-block prenet)
    layer_norm_targets: bool = True     # layer_norm_targets: true (instance_norm_target_layer: true always here)
    clone_batch: int = 4                # clone_batch: 16; 4 keeps a CPU step cheap (untuned)
    mask_prob: float = 0.8              # modalities.image.mask_prob: 0.8 (inverse_mask: true)
    mask_length: int = 3                # mask_length: 3 (3x3 blocks of kept patches)
    mask_prob_adjust: float = 0.07      # mask_prob_adjust: 0.07 (more centres, since blocks overlap)
    mask_noise_std: float = 0.01        # mask_noise_std: 0.01 (the decoder's masked inputs)
    cls_loss: float = 0.01              # cls_loss: 0.01 (summed over the batch's clones, as the reference)
    decoder_dim: int = 192              # decoder.decoder_dim: 768 = ViT-B's width; 192 = ViT-tiny's
    decoder_layers: int = 6             # decoder.decoder_layers: 6
    decoder_kernel: int = 3             # decoder.decoder_kernel: 3
    decoder_groups: int = 16            # decoder.decoder_groups: 16
    ema_decay: float = 0.9998           # ema_decay: 0.9998
    ema_end_decay: float = 0.99999      # ema_end_decay: 0.99999
    ema_anneal_fraction: float = 0.2665  # ema_anneal_end_step 100000 / max_update 375300
    crop_scale_min: float = 0.6         # MaeImageDataset crop_scale=(0.6, 1.0), RandomResizedCrop + flip


def inverse_block_mask(batch: int, grid: tuple[int, int], mask_prob: float, block: int, adjust: float,
                       generator: torch.Generator) -> torch.Tensor:
    """(batch, h*w) bool, True = masked: data2vec 2.0's inverse block mask (fairseq ``compute_block_mask_2d`` with
    ``inverse_mask``). int(N (1 - p + adjust) / block^2) random centres each grow a block x block square (cut at the
    border) of KEPT patches; then kept patches are dropped or added uniformly at random until exactly
    int(N (1 - p)) are kept, and the rest is masked. Drawn from ``generator`` only, on its device."""
    h, w = grid
    n, device = h * w, generator.device
    n_keep = int(n * (1 - mask_prob))
    centres = torch.zeros(batch, n, device=device)
    n_centres = int(n * ((1 - mask_prob) + adjust) / block ** 2)
    if n_centres:
        centres.scatter_(1, torch.randint(0, n, (batch, n_centres), generator=generator, device=device), 1.0)
    lo, hi = block // 2, block - 1 - block // 2  # a centre c covers c-lo .. c+hi on each axis
    region = F.max_pool2d(F.pad(centres.view(batch, 1, h, w), (hi, lo, hi, lo)), block, stride=1).view(batch, n)
    score = 2 * region + torch.rand(batch, n, generator=generator, device=device)  # the region first, random ties
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    return mask.scatter_(1, score.topk(n_keep, dim=1).indices, False)


class CloneMaskViews:
    """One crop per image (``inner``) plus ``clones`` inverse block masks per image, drawn with the batch from the
    step's generator: ``masks["mask"]`` (B * clones, N) bool, ``masks["keep"]`` (B * clones, K) visible indices
    ascending, ``masks["restore"]`` (B * clones, N); rows b * clones .. b * clones + clones - 1 belong to image b."""

    def __init__(self, inner: MultiView, grid: tuple[int, int], clones: int, mask_prob: float, block: int,
                 adjust: float):
        self.inner, self.grid, self.clones = inner, tuple(grid), clones
        self.mask_prob, self.block, self.adjust = mask_prob, block, adjust
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        mask = inverse_block_mask(batch.shape[0] * self.clones, self.grid, self.mask_prob, self.block, self.adjust,
                                  generator)
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # [visible ascending, masked ascending]
        n_keep = int((~mask[0]).sum())
        device = views.crops[0].device
        views.masks.update(mask=mask.to(device), keep=order[:, :n_keep].to(device),
                           restore=torch.argsort(order, dim=1).to(device))
        return views

    def describe(self) -> list[dict]:
        return [{**d, "mask": f"inverse block {self.block}x{self.block}", "mask_ratio": self.mask_prob,
                 "clones": self.clones} for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class ConvDecoder(nn.Module):
    """Visible tokens + N(0, noise_std) at the masked positions, back on the (h, w) grid; ``layers`` x [grouped conv
    (kernel k) -> LayerNorm over channels (no affine) -> GELU, + the layer's input when the widths match]; a linear
    map to the encoder's width (the reference's ``Decoder2d``)."""

    def __init__(self, enc_dim: int, dim: int, layers: int, kernel: int, groups: int, grid: tuple[int, int],
                 noise_std: float):
        super().__init__()
        self.grid, self.noise_std, self.dim = tuple(grid), noise_std, dim
        self.convs = nn.ModuleList(nn.Conv2d(enc_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                             groups=groups) for i in range(layers))
        self.proj = nn.Linear(dim, enc_dim)

    def forward(self, visible: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """visible (B, K, D) in ``keep`` order, restore (B, N) -> predictions (B, N, D) in raster order."""
        B, K, D = visible.shape
        noise = torch.randn(B, restore.shape[1] - K, D, device=visible.device, dtype=visible.dtype) * self.noise_std
        x = torch.gather(torch.cat([visible, noise], 1), 1, restore.unsqueeze(-1).expand(-1, -1, D))
        x = x.transpose(1, 2).reshape(B, D, *self.grid)
        for conv in self.convs:
            y = F.gelu(F.layer_norm(conv(x).permute(0, 2, 3, 1), (self.dim,)).permute(0, 3, 1, 2))
            x = y + x if y.shape == x.shape else y
        return self.proj(x.flatten(2).transpose(1, 2))


def ema_decay(step: int, total_steps: int, start: float, end: float, anneal_fraction: float) -> float:
    """The reference's ``get_annealed_rate``: linear from ``start`` to ``end`` over the first ``anneal_fraction`` of
    the steps, then ``end``."""
    anneal = anneal_fraction * total_steps
    return end if step >= anneal else start + (end - start) * step / anneal


class Data2Vec(Method):
    def __init__(self, encoder: VisionTransformer, decoder: ConvDecoder, view_maker, p: Data2VecParams):
        super().__init__()
        self.encoder, self.decoder, self.view_maker, self.p = encoder, decoder, view_maker, p
        self.teacher = make_teacher(encoder)

    def forward(self, views: Views, progress: Progress) -> dict:
        p, x = self.p, views.crops[0]
        c = p.clone_batch
        mask, keep, restore = views.masks["mask"], views.masks["keep"], views.masks["restore"]
        if mask.shape[0] != x.shape[0] * c:
            raise ValueError(f"data2vec needs {c} masks per image: {mask.shape[0]} masks for {x.shape[0]} images")
        with torch.no_grad():  # one teacher pass per image on the full image, shared by its clones
            self.teacher.eval()  # the reference runs the EMA model in eval mode (no drop path)
            k = p.average_top_k_layers
            layers = self.teacher.forward_features(x, layers=tuple(range(-k, 0)))["layers"]
            target = data2vec_targets(layers, k, 1, p.layer_norm_targets).repeat_interleave(c, 0)
        student = self.encoder.forward_features(x.repeat_interleave(c, 0), keep=keep)
        reg = data2vec_regression(self.decoder(student["tokens"], restore), target, mask)
        # the [CLS] term is a SUM over the images of the whole batch (data2vec_cls_term): this process's share times
        # the process count, so that the average DDP/FSDP take over processes is the 1-process sum (tests/test_fsdp.py)
        cls = (data2vec_cls_term(student["cls"], target, p.cls_loss) * du.get_world_size() if p.cls_loss > 0
               else reg.new_zeros(()))
        return {"loss": reg + cls, "features": student["pooled"][::c], "d2v_regression": reg.detach(),
                "d2v_cls": cls.detach(), "masked_fraction": mask.float().mean()}

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> dict:
        p = self.p
        m = ema_decay(progress.step, progress.total_steps, p.ema_decay, p.ema_end_decay, p.ema_anneal_fraction)
        ema_update(self.teacher, self.encoder, m)
        return {"ema_momentum": m}

    @property
    def guillotine_head(self) -> None:
        return None  # no projector: the representation is the encoder's


@register("data2vec", Data2VecParams, family="masked image modeling", cookbook="§2.5; §3.4 EMA teacher",
          summary="EMA teacher's averaged top-K layers on the full image, regressed at 80%-masked patches of "
                  "several clones by a token-dropping student and a conv decoder")
def build(cfg, data: DataInfo) -> Data2Vec:
    p = cfg.params
    if not 0.0 < p.mask_prob < 1.0 or p.mask_length < 1 or p.clone_batch < 1:
        raise ConfigError(f"data2vec.mask_prob={p.mask_prob} must be in (0, 1), data2vec.mask_length="
                          f"{p.mask_length} and data2vec.clone_batch={p.clone_batch} >= 1 (reference: 0.8, 3, 16)")
    if p.decoder_kernel % 2 == 0 or p.decoder_layers < 1:
        raise ConfigError(f"data2vec.decoder_kernel={p.decoder_kernel} must be odd and data2vec.decoder_layers="
                          f"{p.decoder_layers} >= 1 (reference: 3 and 6)")
    encoder = make_backbone(cfg, data)
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"data2vec drops the masked tokens and averages transformer blocks, so it needs a ViT: set "
                          f"model.backbone=vit_tiny (or vit_small), not {cfg.model.backbone!r}")
    if not 1 <= p.average_top_k_layers <= len(encoder.blocks):
        raise ConfigError(f"data2vec.average_top_k_layers={p.average_top_k_layers} must be in 1..{len(encoder.blocks)}"
                          f" (the encoder's blocks)")
    if encoder.embed_dim % p.decoder_groups or p.decoder_dim % p.decoder_groups:
        raise ConfigError(f"data2vec.decoder_groups={p.decoder_groups} must divide the encoder width "
                          f"{encoder.embed_dim} and data2vec.decoder_dim={p.decoder_dim}")
    size = cfg.views.size
    grid = (size // encoder.patch_size, size // encoder.patch_size)
    if int(grid[0] * grid[1] * (1 - p.mask_prob)) < 1:
        raise ConfigError(f"data2vec.mask_prob={p.mask_prob} keeps no patch of {grid[0]}x{grid[1]}")
    decoder = ConvDecoder(encoder.embed_dim, p.decoder_dim, p.decoder_layers, p.decoder_kernel, p.decoder_groups,
                          grid, p.mask_noise_std)
    # crop + flip only (MaeImageDataset's train transform): no colour jitter, blur, grayscale or solarization
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    views = CloneMaskViews(only, grid, p.clone_batch, p.mask_prob, p.mask_length, p.mask_prob_adjust)
    return Data2Vec(encoder, decoder, views, p)
