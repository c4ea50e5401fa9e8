"""Labels made from the data itself for the pretext tasks of cookbook §2.1 (what a method trains on, and what the
rotation probe of :mod:`selfsup.evaluate.rotation` measures)."""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor


def rotate_all(images: Tensor) -> tuple[Tensor, Tensor]:
    """``(4N, C, H, W)`` images rotated by 0/90/180/270 degrees (counter-clockwise) and their rotation index
    (Gidaris et al. 2018): the N images rotated by 0 first, then by 90, 180 and 270 degrees."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"rotation prediction needs square images (N, C, H, H) so every rotation has the same shape, got "
            f"{tuple(images.shape)}; center-crop them first."
        )
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return rotated, torch.arange(4, device=images.device).repeat_interleave(images.shape[0])


@functools.lru_cache(maxsize=8)
def hamming_permutations(count: int, tiles: int = 9, seed: int = 0) -> Tensor:
    """The jigsaw puzzle's permutation set (Noroozi & Favaro 2016, §3.2 and Algorithm 1, the "maximal" variant):
    start from one random permutation of ``tiles`` tiles, then repeatedly add the permutation whose summed Hamming
    distance to those already chosen is largest. Far-apart permutations make the task well posed (two permutations
    differing in two tiles are nearly indistinguishable); the paper's best set is 1000 permutations of 9 tiles
    with an average Hamming distance near 8.

    Returns (count, tiles) long, row j the tile order of class j. Deterministic for a given ``seed`` (ties go to the
    lowest index); built once per argument set and cached (enumerating 9! = 362,880 permutations takes ~1 s).
    """
    if tiles < 2 or tiles > 9:
        raise ValueError(f"tiles must be in 2..9 (9! permutations are enumerated), got {tiles}")
    every = torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.int8)
    if not 1 <= count <= len(every):
        raise ValueError(f"count must be in 1..{len(every)} for {tiles} tiles, got {count}")
    first = int(torch.randint(len(every), (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    total = torch.zeros(len(every), dtype=torch.int32)
    taken = torch.zeros(len(every), dtype=torch.bool)
    taken[first] = True
    for _ in range(count - 1):
        total += (every != every[chosen[-1]]).sum(1, dtype=torch.int32)
        j = int(torch.where(taken, -1, total).argmax())
        chosen.append(j)
        taken[j] = True
    return every[chosen].long()


def jigsaw_tiles(images: Tensor, grid: int, tile: int, offsets: Tensor, order: Tensor) -> Tensor:
    """Cut each image into ``grid`` x ``grid`` cells of ``size // grid`` pixels, take a ``tile``-pixel tile in each
    cell at ``offsets``, shuffle the tiles and normalize each on its own (Noroozi & Favaro 2016, §3.2: the random gap
    between tiles and the per-tile normalization remove edge-continuity and low-level-statistics shortcuts).

    ``images`` (B, C, H, W); ``offsets`` (B, grid², 2) long, each cell's tile (row, col) offset in
    [0, cell - tile]; ``order`` (B, grid²) long: position j of the puzzle shows the tile of cell order[b, j].
    Returns (B, grid², C, tile, tile).
    """
    b, c, h, w = images.shape
    cell = min(h, w) // grid
    if not 1 <= tile <= cell:
        raise ValueError(f"tile={tile} px must fit a {cell}-px cell ({grid}x{grid} cells of a {h}x{w} image)")
    n = grid * grid
    cells = torch.arange(n, device=images.device)
    top = (cells // grid) * cell + offsets[..., 0]                     # (B, n)
    left = (cells % grid) * cell + offsets[..., 1]
    r = torch.arange(tile, device=images.device)
    rows = (top[..., None] + r)[..., :, None].expand(b, n, tile, tile)  # (B, n, t, t)
    cols = (left[..., None] + r)[..., None, :].expand(b, n, tile, tile)
    tiles = images[torch.arange(b, device=images.device)[:, None, None, None], :, rows, cols]  # (B, n, t, t, C)
    tiles = tiles.permute(0, 1, 4, 2, 3)
    tiles = torch.gather(tiles, 1, order[:, :, None, None, None].expand_as(tiles))
    flat = tiles.flatten(2)
    flat = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + 1e-5)
    return flat.view_as(tiles)


def square_holes(batch: int, size: int, side: int, generator: torch.Generator) -> Tensor:
    """One ``side`` x ``side`` square per image at a uniformly random position inside a ``size`` x ``size`` view
    (the context encoder's "random block" masks, Pathak et al. 2016 §3.3, as one block). (B, size, size) bool,
    True inside the hole, on the generator's device."""
    if not 1 <= side < size:
        raise ValueError(f"the hole side ({side} px) must be in [1, {size}) for a {size}-px view")
    dev = generator.device
    top, left = (torch.randint(size - side + 1, (2, batch), generator=generator, device=dev))
    r = torch.arange(size, device=dev)
    rows = (r >= top[:, None]) & (r < top[:, None] + side)
    cols = (r >= left[:, None]) & (r < left[:, None] + side)
    return rows[:, :, None] & cols[:, None, :]


_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.950456, 1.0, 1.088754)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1], (B, 3, H, W) -> CIE L*a*b* (D65): L in [0, 100], a and b roughly in [-110, 110] (the
    colour space of Zhang et al. 2016). sRGB's gamma is undone, then the linear RGB -> XYZ matrix and the Lab
    non-linearity f(t) = t^(1/3) above (6/29)^3, linear below."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab takes (B, 3, H, W) RGB images, got {tuple(rgb.shape)}")
    rgb = rgb.float().clamp(0, 1)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin) / torch.tensor(_D65_WHITE, device=rgb.device)[:, None, None]
    d = 6 / 29
    f = torch.where(xyz > d ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * d * d) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


@functools.lru_cache(maxsize=4)
def ab_bins(grid: float = 10.0) -> Tensor:
    """The centres (Q, 2) of the in-gamut cells of a ``grid``-wide quantization of the ab plane (Zhang et al. 2016,
    §2.1: grid 10 gives their Q = 313): the cells that some sRGB colour falls in, found by converting a 64^3 RGB
    cube. Centres are multiples of ``grid``, ordered by (a, b)."""
    v = torch.linspace(0, 1, 64)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(cube)[0, 1:, :, 0].T
    return torch.unique(torch.round(ab / grid), dim=0) * grid


def soft_encode(ab: Tensor, centres: Tensor, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Zhang et al. 2016's soft target (§2.1): each pixel's ab value spread over its ``neighbours`` nearest bin
    centres with Gaussian weights (sigma 5), normalized to sum to 1. ``ab`` (B, 2, H, W) -> (B, Q, H, W)."""
    b, _, h, w = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    dist = torch.cdist(flat, centres.to(flat))
    d, idx = dist.topk(neighbours, dim=1, largest=False)
    weight = torch.softmax(-d.pow(2) / (2 * sigma * sigma), dim=1)
    out = torch.zeros(flat.shape[0], centres.shape[0], device=ab.device).scatter_(1, idx, weight)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)
