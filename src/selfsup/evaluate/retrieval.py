"""Nearest-neighbour retrieval in feature space and the picture of it (cookbook §3.7.1 kNN, §3.7.4 visual evaluation).

The kNN classifier of the fmnist-knn protocol votes with the cosine-nearest training images; showing those
neighbours for a few test queries makes its mistakes readable: which classes the encoder confuses, and whether it
matches on shape, texture or brightness.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

SAME_COLOR, DIFFERENT_COLOR, QUERY_COLOR = "#1a9850", "#d73027", "#2b5d9b"


def _check_feats(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}.")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; check the encoder output (diverged training?).")
    return x


@torch.no_grad()
def nearest_neighbors(
    query_feats: Tensor,
    memory_feats: Tensor,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosine neighbours of each query in the memory: ``(sims (Q, k) float32, idx (Q, k) int64)``.

    Similarities are sorted, largest first (ties keep ``torch.topk``'s order). Queries are processed in chunks of
    ``chunk_size``, so memory use is ``chunk_size x M`` similarities. ``exclude_self=True`` is for a query set that
    *is* the memory (query ``i`` is memory row ``i``): each query's own row is never returned. Zero vectors have
    cosine 0 with everything.
    """
    queries = _check_feats(query_feats, "query_feats")
    memory = _check_feats(memory_feats, "memory_feats")
    if queries.shape[1] != memory.shape[1]:
        raise ValueError(
            f"query_feats and memory_feats must have the same dim, got {queries.shape[1]} and {memory.shape[1]}."
        )
    if exclude_self and queries.shape[0] != memory.shape[0]:
        raise ValueError(
            f"exclude_self=True means query i is memory row i, so both need the same number of rows; got "
            f"{queries.shape[0]} queries and {memory.shape[0]} memory rows."
        )
    available = memory.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be between 1 and {available} (memory size{' - 1' if exclude_self else ''}), got {k}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    memory = F.normalize(memory, dim=1)
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk_size):
        s = F.normalize(queries[start : start + chunk_size], dim=1) @ memory.T
        if exclude_self:
            rows = torch.arange(s.shape[0])
            s[rows, rows + start] = float("-inf")
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def _to_numpy_uint8(images, name: str, ndim: int) -> np.ndarray:
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.ndim != ndim or a.dtype != np.uint8:
        shape = "(Q, C, H, W)" if ndim == 4 else "(Q, k, C, H, W)"
        raise ValueError(f"{name} must be uint8 {shape}, got dtype {a.dtype} and shape {a.shape}.")
    if a.shape[-3] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (channel-first), got shape {a.shape}.")
    return a


def _show(ax, image_chw: np.ndarray, border: str, width: float) -> None:
    """One image without ticks, framed by a colored border of ``width`` points."""
    image = image_chw.transpose(1, 2, 0)
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(border)
        spine.set_linewidth(width)


def _label_name(label, class_names: Sequence[str] | None) -> str:
    label = int(label)
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def retrieval_grid(
    query_images,
    neighbor_images,
    path: str | Path,
    query_labels=None,
    neighbor_labels=None,
    class_names: Sequence[str] | None = None,
    neighbor_sims=None,
) -> Path:
    """Write a PNG with one row per query: the query (blue frame), a gap, then its ``k`` neighbours in order.

    ``query_images`` uint8 (Q, C, H, W); ``neighbor_images`` uint8 (Q, k, C, H, W). With labels, each neighbour's
    frame is green when its label equals the query's and red otherwise, and its caption names its class (a red
    "✗" marks a mismatch, so the grid reads without color too). ``neighbor_sims`` (Q, k), optional, adds the
    cosine similarity to each caption.
    """
    queries = _to_numpy_uint8(query_images, "query_images", 4)
    neighbors = _to_numpy_uint8(neighbor_images, "neighbor_images", 5)
    q, k = neighbors.shape[:2]
    if queries.shape[0] != q or queries.shape[1:] != neighbors.shape[2:]:
        raise ValueError(
            f"neighbor_images {neighbors.shape} must be (Q, k, C, H, W) with Q and the image shape of "
            f"query_images {queries.shape}."
        )
    has_labels = query_labels is not None and neighbor_labels is not None
    if has_labels:
        query_labels = np.asarray(query_labels).reshape(q)
        neighbor_labels = np.asarray(neighbor_labels).reshape(q, k)
    if neighbor_sims is not None:
        neighbor_sims = np.asarray(neighbor_sims, dtype=np.float64).reshape(q, k)

    # Absolute layout in inches, so captions keep their size whatever Q and k: cell = image + caption below it.
    image, caption_h, gap, top, bottom = 1.0, 0.45, 0.35, 0.3, 0.05
    width = (k + 1) * image * 1.1 + gap + 0.1
    height = q * (image + caption_h) + top + bottom
    fig = Figure(figsize=(width, height), dpi=100)
    grid = fig.add_gridspec(q, k + 2, width_ratios=[1, gap / image] + [1] * k, wspace=0.1,
                            hspace=caption_h / image, left=0.05 / width, right=1 - 0.05 / width,
                            top=1 - top / height, bottom=(bottom + caption_h) / height)
    for row in range(q):
        ax = fig.add_subplot(grid[row, 0])
        _show(ax, queries[row], QUERY_COLOR, 3.0)
        ax.set_xlabel(_label_name(query_labels[row], class_names) if has_labels else "query", fontsize=9,
                      labelpad=2, color=QUERY_COLOR, fontweight="bold")
        if row == 0:
            ax.set_title("query", fontsize=9, color=QUERY_COLOR, fontweight="bold")
        for j in range(k):
            ax = fig.add_subplot(grid[row, j + 2])
            same = has_labels and int(neighbor_labels[row, j]) == int(query_labels[row])
            border = "#888888" if not has_labels else SAME_COLOR if same else DIFFERENT_COLOR
            _show(ax, neighbors[row, j], border, 2.5 if has_labels else 1.0)
            caption = _label_name(neighbor_labels[row, j], class_names) if has_labels else ""
            if has_labels and not same:
                caption = "\u2717 " + caption
            if neighbor_sims is not None:
                caption = f"{caption}\n{neighbor_sims[row, j]:.2f}" if caption else f"{neighbor_sims[row, j]:.2f}"
            ax.set_xlabel(caption, fontsize=8.5, labelpad=2, color="#222222" if same or not has_labels else border)
            if row == 0:
                ax.set_title(f"#{j + 1}", fontsize=9)
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
