"""Weighted k-nearest-neighbour classification of frozen features (cookbook §3.7.1).

DINO protocol (Caron et al., 2021, ``eval_knn.py``; DESIGN.md §4 "fmnist-knn"): L2-normalize the features, retrieve
the ``k`` training features with the highest cosine similarity ``s``, let each neighbour vote for its label with
weight ``exp(s / T)`` and predict the label with the largest total. Defaults ``k=20, T=0.07`` are DINO's. The
"majority" weighting is the vanilla vote (+1 per neighbour) the cookbook describes first. Vote ties go to the
smallest class index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTINGS = ("exp", "majority")


def _as_ks(k: int | Sequence[int], n_train: int) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(v, int) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive int or a non-empty sequence of positive ints, got {k!r}.")
    if max(ks) > n_train:
        raise ValueError(f"k={max(ks)} is larger than the {n_train} training features; use k <= {n_train}.")
    return sorted(set(ks))


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} must be 1-D with one label per feature row ({n}), got {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}.")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} has negative entries; class labels must be 0..num_classes-1.")
    return labels.long()


def _vote_weights(sims: Tensor, temperature: float, weighting: str) -> Tensor:
    """exp(s / T) per neighbour, divided by the row's largest weight (same argmax, no overflow at small T)."""
    if weighting == "majority":
        return torch.ones_like(sims)
    return ((sims - sims[:, :1]) / temperature).exp()


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor | None = None,
    *,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    weighting: str | Sequence[str] = "exp",
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> dict:
    """kNN top-1 accuracy (percent) of ``test_feats`` against the memory ``train_feats``, for every ``k`` at once.

    The top-``max(k)`` neighbours are retrieved once per chunk of ``chunk_size`` queries, so memory stays at
    ``chunk_size x N_train`` similarities; smaller ``k`` reuse the sorted prefix. ``device`` (default: the device of
    ``train_feats``) is where the similarities are computed.

    Returns ``{"top1": {k: %}, "protocol": {...}}`` when ``test_labels`` is given, otherwise
    ``{"predictions": {k: LongTensor (N_test,)}, "protocol": {...}}``. Several weightings (e.g.
    ``("exp", "majority")``) share one retrieval: ``top1``/``predictions`` are those of the first, and
    ``by_weighting`` holds ``{weighting: {k: %}}`` (or predictions) for each.
    """
    weightings = [weighting] if isinstance(weighting, str) else list(weighting)
    if not weightings or any(w not in WEIGHTINGS for w in weightings):
        raise ValueError(f"weighting must be one of {WEIGHTINGS} (or a sequence of them), got {weighting!r}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train_feats and test_feats must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)}."
        )
    ks = _as_ks(k, train_feats.shape[0])
    train_labels = _check_labels(train_labels, train_feats.shape[0], "train_labels")
    if test_labels is not None:
        test_labels = _check_labels(test_labels, test_feats.shape[0], "test_labels")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if int(train_labels.max()) >= num_classes:
        raise ValueError(f"train_labels has class {int(train_labels.max())} but num_classes={num_classes}.")

    device = train_feats.device if device is None else torch.device(device)
    memory = F.normalize(train_feats.to(device, torch.float32), dim=1)
    memory_labels = train_labels.to(device)
    predictions = {w: {kk: torch.empty(test_feats.shape[0], dtype=torch.long) for kk in ks} for w in weightings}
    for start in range(0, test_feats.shape[0], chunk_size):
        queries = F.normalize(test_feats[start : start + chunk_size].to(device, torch.float32), dim=1)
        sims, idx = (queries @ memory.T).topk(max(ks), dim=1)  # sorted, largest first
        neighbour_labels = memory_labels[idx]
        for w in weightings:
            weights = _vote_weights(sims.double(), temperature, w)
            for kk in ks:
                votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=torch.float64)
                votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
                predictions[w][kk][start : start + queries.shape[0]] = votes.argmax(dim=1).cpu()

    protocol = {
        "k": ks,
        "temperature": temperature,
        "weighting": weighting if isinstance(weighting, str) else weightings,
        "metric": "cosine",
        "num_classes": num_classes,
        "n_train": int(train_feats.shape[0]),
    }
    extra = {} if isinstance(weighting, str) else {"by_weighting": predictions}
    if test_labels is None:
        return {"predictions": predictions[weightings[0]], **extra, "protocol": protocol}
    labels_cpu = test_labels.cpu()
    top1 = {w: {kk: 100.0 * (pred == labels_cpu).double().mean().item() for kk, pred in p.items()}
            for w, p in predictions.items()}
    extra = {} if isinstance(weighting, str) else {"by_weighting": top1}
    return {"top1": top1[weightings[0]], **extra, "protocol": protocol}


def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """fmnist-knn top-1 (percent) for a single ``k``: the DINO-weighted vote of :func:`knn_classify`."""
    result = knn_classify(train_feats, train_labels, test_feats, test_labels, k=k, temperature=temperature)
    return result["top1"][k]
