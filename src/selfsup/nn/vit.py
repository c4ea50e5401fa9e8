"""Vision Transformer (Dosovitskiy et al., 2021) in pure PyTorch, sized for SSL (cookbook §3.5.4).

Pre-norm blocks (x + attn(LN(x)), x + mlp(LN(x))), attention through ``F.scaled_dot_product_attention``,
a learned position embedding that is bicubically interpolated when the input size differs from ``img_size``
(so multi-crop local crops work, DINO), a final LayerNorm, and ``pool`` "cls" or "mean" (mean of the patch
tokens; Zhai et al. 2022 find it as good as [cls] when a method does not need the token, cookbook §3.5.4).

Options from §3.5.4: ``drop_path`` (stochastic depth, rate rising linearly with depth as in DeiT/DINO; the
cookbook notes it tends to hurt small models, so the default is 0), and ``freeze_patch_embed`` (a random,
frozen patch projection stabilises MoCo v3 / SimCLR / BYOL ViT training, Chen et al. 2021b).

Masked modeling (cookbook §2.5): ``keep`` drops tokens (MAE: the encoder sees only the visible patches), and with
``mask_token=True`` the model owns a learned [mask] embedding that ``masks`` substitutes for the masked patches'
embeddings before the position embedding is added (BEiT, SimMIM, iBOT). ``forward_features`` also returns the
outputs of chosen blocks (data2vec averages the top-K).

Sizes (timm / DeiT): tiny 192-d 3 heads, small 384-d 6 heads, base 768-d 12 heads; all depth 12.
Initialisation: truncated normal std 0.02 for linear layers, [cls] and position embedding (timm, DINO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("cls", "mean")
SIZES = {  # name -> (embed_dim, num_heads); depth 12 for all
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample, rescale the rest."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, SDPA, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, h*w, D) patch position embedding laid out on ``grid`` to ``new_grid``, bicubically."""
    if tuple(grid) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    pos = pos.reshape(1, grid[0], grid[1], D).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=new_grid, mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)


class VisionTransformer(nn.Module):
    """ViT trunk with a [cls] token; ``forward(x) -> (B, embed_dim)``, ``forward_tokens(x) -> (B, 1+N, D)``,
    ``forward_features(x, masks, keep, layers) -> {"pooled", "cls", "tokens", "layers"}``."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pool: str = "cls", drop_path: float = 0.0, freeze_patch_embed: bool = False,
                 mask_token: bool = False):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.pool = pool
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        # only when a method substitutes masked patches: an unused parameter would break DDP for the others
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear rule, DeiT / DINO
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # BEiT / iBOT
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names usually excluded from weight decay (timm convention)."""
        return {"pos_embed", "cls_token"} | ({"mask_token"} if self.mask_token is not None else set())

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, h*w, D) patch position embedding for a ``grid`` of patches, interpolated if needed."""
        return interpolate_pos_embed(self.pos_embed[:, 1:], self.grid, grid)

    def _run(self, x: torch.Tensor, masks: torch.Tensor | None, keep: torch.Tensor | None,
             layers: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-normed tokens (B, 1+K, D) and the raw outputs of the blocks listed in ``layers``."""
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of patch_size={p}; resize or crop to a multiple")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this ViT has no mask token: build it with mask_token=True to pass masks=")
            if masks.shape != tokens.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(f"masks must be bool (B, N) = {tuple(tokens.shape[:2])}, got {masks.dtype} "
                                 f"{tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.patch_pos_embed((H // p, W // p))
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        wanted = {i % len(self.blocks) for i in layers}
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return self.norm(tokens), outputs

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens (B, 1+N, D): [cls] first, then patches in raster order.

        ``keep`` (B, K) long indices of patches to keep (MAE / iBOT-style token dropping, applied after the
        position embedding is added); the output then holds 1+K tokens.
        """
        return self._run(x, None, keep, ())[0]

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         layers: tuple[int, ...] = ()) -> dict:
        """Named outputs: ``pooled`` (B, D) as ``forward`` pools, ``cls`` (B, D), ``tokens`` (B, K, D) the normed
        patch tokens (K = N, or the kept ones), and ``layers``: the un-normed outputs (B, 1+K, D) of the blocks
        whose indices are listed (negative counts from the last, e.g. (-1, -2, -3) for data2vec's top 3), in block
        order. ``masks`` (B, N) bool: patches replaced by the mask token (needs ``mask_token=True``)."""
        for i in layers:
            if not -len(self.blocks) <= i < len(self.blocks):
                raise ValueError(f"layer {i} does not exist: the model has {len(self.blocks)} blocks")
        tokens, outputs = self._run(x, masks, keep, tuple(layers))
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return {"pooled": pooled, "cls": tokens[:, 0], "tokens": tokens[:, 1:], "layers": outputs}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.forward_tokens(x, keep)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def vit(name: str, **kwargs) -> VisionTransformer:
    """Build "vit_tiny", "vit_small" or "vit_base"; any VisionTransformer argument may be overridden."""
    if name not in SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(SIZES)}")
    embed_dim, num_heads = SIZES[name]
    return VisionTransformer(**{"embed_dim": embed_dim, "num_heads": num_heads, **kwargs})
