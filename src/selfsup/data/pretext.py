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
