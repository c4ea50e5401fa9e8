"""2-D maps of a frozen embedding (cookbook §3.7.4, visual evaluation): t-SNE (or UMAP) of a test subset.

A map is a picture, not a metric: distances between far-apart clusters and cluster sizes in t-SNE mean little
(Wattenberg et al., "How to use t-SNE effectively", Distill 2016). It shows at a glance whether classes form
separate groups and which ones the encoder confuses.

Defaults and their sources:

- features are L2-normalized first, because the kNN protocol (cookbook §3.7.1, DINO) compares them by cosine;
- PCA to 50 dimensions before t-SNE (van der Maaten & Hinton 2008, §4; scikit-learn's TSNE documentation);
- ``perplexity=30``, ``learning_rate="auto"`` (Belkina et al. 2019), ``init="pca"`` and 1000 iterations:
  scikit-learn's defaults;
- ``n=2000`` points, a subset stratified by class when labels are given: the map stays readable and t-SNE takes
  about 6 s on one CPU thread;
- ``threads=1``: t-SNE runs its 1000 small OpenMP parallel loops under a one-thread limit. With more OpenMP threads
  than free cores (e.g. after ``torch.set_num_threads(2)``, which sets the OpenMP runtime that scikit-learn shares,
  on a busy 2-core machine) the threads' spin-waiting made 180 points take 27 s instead of 0.6 s (measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

PCA_DIMS = 50  # van der Maaten & Hinton (2008), §4: PCA to 50 dimensions before t-SNE
METHODS = ("tsne", "umap")


def _as_numpy_2d(features, name: str) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; check the encoder output (diverged training?).")
    return x


def _as_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the features, got {y.shape}.")
    return y.astype(np.int64)


def subset_indices(n_total: int, n: int, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ``min(n, n_total)`` points: seeded, and stratified by ``labels`` when given.

    Stratified means each class keeps its share of the subset (largest-remainder rounding), so rare classes still
    appear on the map.
    """
    rng = np.random.default_rng(seed)
    if n >= n_total:
        return np.arange(n_total)
    if labels is None:
        return np.sort(rng.choice(n_total, size=n, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / n_total
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: n - int(take.sum())]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _tsne(x: np.ndarray, seed: int, perplexity: float, threads: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(limits=threads, user_api="openmp"):
        if x.shape[1] > PCA_DIMS:
            x = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(x)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
        return tsne.fit_transform(x)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError as err:
        raise ValueError(
            "method='umap' needs the umap-learn package, which is not installed: `pip install umap-learn`, "
            "or use method='tsne' (scikit-learn)."
        ) from err
    # UMAP's n_neighbors plays the role of the perplexity; 15 is umap-learn's default.
    return umap.UMAP(n_components=2, n_neighbors=15, random_state=seed).fit_transform(x)


def embed_2d(
    features: Tensor | np.ndarray,
    *,
    n: int = 2000,
    seed: int = 0,
    method: str = "tsne",
    perplexity: float = 30.0,
    labels: Tensor | np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of a seeded subset of ``features`` (N, D): returns ``(coords (m, 2), index (m,))``.

    ``m = min(n, N)``; ``index`` holds the sorted rows of ``features`` that were mapped (use it to pick their
    labels or images). With ``labels`` the subset is stratified by class. Rows are L2-normalized, reduced to 50
    dimensions by PCA, then embedded with scikit-learn's t-SNE (``method="tsne"``) or umap-learn
    (``method="umap"``, only if installed). Deterministic for a given ``seed``. ``threads`` caps the OpenMP
    threads t-SNE uses (see the module docstring for why the default is 1).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if n < 2:
        raise ValueError(f"n must be >= 2 points, got {n}.")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    x = _as_numpy_2d(features, "features")
    y = _as_labels(labels, x.shape[0])
    index = subset_indices(x.shape[0], n, seed, y)
    if method == "tsne" and not 0 < perplexity < len(index):
        raise ValueError(
            f"t-SNE needs 0 < perplexity < number of points, got perplexity={perplexity} for {len(index)} points; "
            f"use more points or a smaller perplexity (5-50 is the usual range, van der Maaten & Hinton 2008)."
        )
    x = x[index]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    coords = _tsne(x, seed, perplexity, threads) if method == "tsne" else _umap(x, seed)
    return np.asarray(coords, dtype=np.float64), index


def class_colors(num_classes: int) -> list:
    """One distinct color per class: matplotlib's tab10 up to 10 classes, tab20 up to 20, then a hue wheel."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](i) for i in range(num_classes)]
    return [colormaps["hsv"](i / num_classes) for i in range(num_classes)]


def plot_embedding_map(
    coords: np.ndarray,
    labels: Tensor | np.ndarray | None,
    class_names: Sequence[str] | None,
    path: str | Path,
    title: str = "Embedding map",
) -> Path:
    """Scatter plot of 2-D ``coords`` (m, 2) colored by ``labels`` (legend with ``class_names``); writes a PNG.

    Axes carry no ticks: t-SNE/UMAP coordinates have no units. Legends are drawn for up to 20 classes.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (m, 2), got shape {coords.shape}.")
    y = _as_labels(labels, coords.shape[0])
    fig = Figure(figsize=(7.2, 6.0), dpi=110)
    ax = fig.add_subplot()
    point_size = 8 if len(coords) > 1000 else 16
    if y is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=point_size, color="tab:blue", alpha=0.6, linewidths=0)
    else:
        num_classes = int(y.max()) + 1 if y.size else 0
        if class_names is not None and len(class_names) < num_classes:
            raise ValueError(f"labels go up to {num_classes - 1} but only {len(class_names)} class names were given.")
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        colors = class_colors(num_classes)
        for c in range(num_classes):
            keep = y == c
            ax.scatter(coords[keep, 0], coords[keep, 1], s=point_size, color=colors[c], alpha=0.7, linewidths=0)
        if num_classes <= 20:
            handles = [Line2D([], [], marker="o", linestyle="", color=colors[c], markersize=7, label=names[c])
                       for c in range(num_classes)]
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=10)
    ax.set_title(title, fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    for spine in ax.spines.values():
        spine.set_color("#bbbbbb")
    fig.tight_layout()
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
