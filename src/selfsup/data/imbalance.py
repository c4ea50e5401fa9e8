"""Class-imbalanced subsets of a labelled training split, for studying pretraining on unbalanced data (cookbook §3.3:
methods with a hidden uniform cluster prior, such as SwAV, DINO and MSN, assume balanced classes).

:func:`power_law_subset` keeps, of class k (classes ranked by label, 0 the largest), n_k = round(n_max (k + 1)^-a)
images, where n_max is the smallest class's size in the full split (so every class can supply its share) and
a = ln(ratio) / ln(C) makes the largest class ``ratio`` times the smallest: on Fashion-MNIST with ratio 10,
a = 1 (Zipf) and the sizes are 6000, 3000, 2000, 1500, 1200, 1000, 857, 750, 667, 600 (17,574 images).
"""

from __future__ import annotations

import math

import torch

from selfsup.data.types import ImageDataset


def power_law_sizes(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """n_k = round(n_max (k + 1)^-a), a = ln(ratio) / ln(num_classes), k = 0 .. num_classes - 1."""
    if not ratio >= 1.0:
        raise ValueError(f"the imbalance ratio (largest / smallest class) must be >= 1, got {ratio}")
    if num_classes < 2:
        raise ValueError(f"an imbalanced subset needs at least 2 classes, got {num_classes}")
    a = math.log(ratio) / math.log(num_classes)
    return [max(1, round(n_max * (k + 1) ** -a)) for k in range(num_classes)]


def power_law_subset(data: ImageDataset, ratio: float, seed: int = 0) -> ImageDataset:
    """The images of ``data`` kept by the power law of ratio ``ratio`` (module docstring), chosen uniformly at
    random within each class from ``seed``, in their original order. Needs labels; ratio 1 keeps n_max per class."""
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels: a class-imbalanced subset needs them (data.imbalance_ratio)")
    labels = data.labels
    num_classes = data.num_classes or 0
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"{data.name}: class(es) {(counts == 0).nonzero().flatten().tolist()} have no image; "
                         "a power-law subset needs every class")
    sizes = power_law_sizes(int(counts.min()), num_classes, ratio)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k, n in enumerate(sizes):
        rows = (labels == k).nonzero().flatten()
        keep.append(rows[torch.randperm(len(rows), generator=g)[:n]])
    idx = torch.cat(keep).sort().values
    # skipped files and the source's fingerprint carry over: the subset is a function of them, ratio and seed
    return ImageDataset(data.images[idx], labels[idx], data.classes, f"{data.name} (power-law imbalance {ratio:g})",
                        list(data.skipped), list(data.skip_reasons), data.fingerprint)
