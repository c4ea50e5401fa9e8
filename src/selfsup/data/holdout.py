"""Held-out splits: a seeded, class-stratified fraction of a labelled dataset.

Used by the linear/MLP probes (a validation split of the train features) and by `selfsup train` on a labelled image
folder that has no ``test/`` sub-folder: without one, a test accuracy would have to be measured on training images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.data.types import ImageDataset


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, val)``: a seeded ``val_fraction`` of every class goes to validation."""
    gen = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for cls in labels.unique():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(val_fraction * len(idx))
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def holdout_split(data: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)``: ``fraction`` of every class of a labelled dataset held out (seeded), the rest to train on.

    The held-out images are not trained on, neither by the self-supervised method nor by the probes, so the test
    accuracy is one on unseen images. Both keep the source's classes, skipped files and fingerprint.
    """
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels to stratify a held-out split by")
    keep, held = stratified_split(data.labels, fraction, seed)

    def subset(idx: Tensor, part: str) -> ImageDataset:
        return ImageDataset(data.images[idx], data.labels[idx], data.classes, f"{data.name} ({part})",
                            list(data.skipped), list(data.skip_reasons), data.fingerprint)

    pct = f"{100 * fraction:g}%"
    return subset(keep, f"train, {pct} held out"), subset(held, f"held-out {pct}")
