"""What good looks like: the pixel baselines of a dataset and the shipped recipes' measured numbers.

**Pixel baselines.** An encoder has learned something only when its features beat the images they come from. So the
run's own protocols (kNN with the same k, temperature and cosine similarity; the linear probe with the same grid,
epochs and held-out choice) are applied to the raw pixels, flattened, with the preprocessing that serves pixels best:
per-pixel standardization with the train split's mean and std. On Fashion-MNIST's test split, kNN (k=20, T=0.07,
cosine) gives 86.2 % on standardized pixels, 84.6 % on raw [0, 1] pixels and 85.7 % with the scalar dataset
normalization; the linear probe about 84.5 % (DESIGN.md §4 "Pixel floors"). Large images (folders of photos) are
area-downsampled to at most 32 x 32 and 4096 values per image first, and at most ``MAX_TRAIN`` train images (a
seeded, class-stratified subset) are used; the result says when either happened.

:func:`pixel_baselines` is a pure function of the images, labels and protocol; :func:`cached_pixel_baselines` keeps
its result in ``$XDG_CACHE_HOME/selfsup/baselines/<key>.json`` (``~/.cache/...``), keyed by a digest of the pixels,
labels and protocol, so the second evaluation on a dataset costs only the digest.

**Recipe references.** ``selfsup/recipes/reference.json`` holds the numbers ``benchmarks/catalog.py`` measured for
each shipped ``method:recipe`` (the table of ``docs/results/fashion_mnist.md``, which the wheel does not ship);
:func:`recipe_reference` returns a run's entry, with what differs between the run and the reference run.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.holdout import stratified_split
from selfsup.evaluate.knn import knn_classify
from selfsup.evaluate.probe import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe, standardize

BASELINE_VERSION = 1  # bump when the computation changes: old cache entries are then never read
MAX_SIDE = 32  # pixels per side after downsampling (CIFAR's size: the largest images the floors were measured on)
MAX_DIMS = 4096  # values per image after downsampling (kNN over 60k x 4096 floats: ~1 GB, a minute on one thread)
MAX_TRAIN = 100_000  # train images used (kNN memory, probe); a seeded stratified subset beyond this
CHUNK = 4096


# ----------------------------------------------------------------------------------------------- pixels


def pixel_shape(image_shape: Sequence[int], max_side: int = MAX_SIDE, max_dims: int = MAX_DIMS) -> tuple[int, int]:
    """``(H', W')`` that keeps the aspect ratio, fits ``max_side`` and ``C * H' * W' <= max_dims``; never upsamples."""
    c, h, w = (int(v) for v in image_shape)
    scale = min(1.0, max_side / max(h, w), math.sqrt(max_dims / (c * h * w)))
    if scale >= 1.0:
        return h, w
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def pixel_features(images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(N, C * H' * W')`` in [0, 1]; area-averaged to ``size`` when given.

    Reads ``images`` in chunks (a memmap-backed tensor is never loaded whole)."""
    out = []
    for start in range(0, images.shape[0], CHUNK):
        x = images[start : start + CHUNK].float().div_(255.0)
        if size is not None and tuple(size) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=tuple(size), mode="area")
        out.append(x.flatten(1))
    return torch.cat(out) if out else torch.empty(0, 0)


def _subset(labels: Tensor, max_n: int, seed: int) -> Tensor | None:
    """Sorted indices of a class-stratified ``max_n`` subset, or None when every sample fits."""
    if len(labels) <= max_n:
        return None
    _, keep = stratified_split(labels, max_n / len(labels), seed)
    return keep


def pixel_baselines(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    linear_epochs: int = 30,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    seed: int = 0,
    max_train: int = MAX_TRAIN,
) -> dict:
    """kNN and linear-probe top-1 (percent) of per-pixel standardized pixels under the run's protocols.

    kNN: DINO's weighted vote (:func:`selfsup.evaluate.knn.knn_classify`) with ``knn_k``, ``knn_temperature``,
    cosine similarity, memory = the train images. Linear: :func:`selfsup.evaluate.probe.linear_probe` (it
    standardizes per feature, i.e. per pixel, itself), the grid ``lrs`` x ``weight_decays`` chosen on a held-out
    10 % of train. Returns ``{"knn_top1", "linear_top1", "linear": {lr, weight_decay, lr_edge}, "pixels",
    "preprocessing", "notes", "protocol"}``.
    """
    if train_labels is None or test_labels is None:
        raise ValueError("pixel baselines need labelled train and test splits (kNN and the linear probe use labels)")
    if tuple(train_images.shape[1:]) != tuple(test_images.shape[1:]):
        raise ValueError(f"train and test images differ in shape ({tuple(train_images.shape[1:])} vs "
                         f"{tuple(test_images.shape[1:])}); the pixel baselines compare them pixel by pixel")
    c, h, w = (int(v) for v in train_images.shape[1:])
    size = pixel_shape((c, h, w))
    notes = []
    if size != (h, w):
        notes.append(f"images area-downsampled from {h}x{w} to {size[0]}x{size[1]} before flattening "
                     f"(at most {MAX_SIDE} px a side and {MAX_DIMS} values per image)")
    keep = _subset(train_labels, max_train, seed)
    if keep is not None:
        notes.append(f"a class-stratified subset of {len(keep)} of the {len(train_labels)} train images (seed {seed})")
        train_images, train_labels = train_images[keep], train_labels[keep]
    x_train, x_test = pixel_features(train_images, size), pixel_features(test_images, size)
    k = min(knn_k, x_train.shape[0])
    s_train, s_test = standardize(x_train, x_test)  # per pixel, train statistics
    knn = knn_classify(s_train, train_labels, s_test, test_labels, k=k, temperature=knn_temperature)
    lin = linear_probe(x_train, train_labels, x_test, test_labels, lrs=lrs, weight_decays=weight_decays,
                       epochs=linear_epochs, seed=seed)
    return {
        "knn_top1": round(float(knn["top1"][k]), 2),
        "linear_top1": round(float(lin["top1"]), 2),
        "linear": {"lr": lin["lr"], "weight_decay": lin["weight_decay"], "lr_edge": lin["lr_edge"],
                   "val_top1": round(float(lin["val_top1"]), 2)},
        "pixels": f"{c}x{size[0]}x{size[1]} = {x_train.shape[1]} values per image",
        "preprocessing": "per-pixel standardization with the train split's mean and std",
        "notes": notes,
        "protocol": {"knn": {"k": k, "temperature": knn_temperature, "metric": "cosine",
                             "n_train": int(x_train.shape[0])},
                     "linear": {"epochs": linear_epochs, "lrs": list(lrs), "weight_decays": list(weight_decays),
                                "selection": "best val top-1 on a stratified 0.1 of train", "seed": seed},
                     "n_test": int(x_test.shape[0])},
    }


# ----------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/selfsup/baselines`` (``~/.cache/selfsup/baselines``)."""
    from selfsup.data.download import cache_home

    return cache_home() / "baselines"


def _digest_images(h, images: Tensor) -> None:
    h.update(repr(tuple(images.shape)).encode())
    for start in range(0, images.shape[0], CHUNK):
        h.update(np.ascontiguousarray(images[start : start + CHUNK].cpu().numpy()).tobytes())


def baseline_key(train_images, train_labels, test_images, test_labels, protocol: dict) -> str:
    """Digest of the pixels, the labels, the protocol and ``BASELINE_VERSION``: the cache file's name.

    Reads every image once (~0.1 s for Fashion-MNIST's 70k); different data or settings give a different key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"version": BASELINE_VERSION, **protocol}, sort_keys=True, default=str).encode())
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        _digest_images(h, images)
        h.update(labels.cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def cached_pixel_baselines(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    directory: str | Path | None = None,
    **protocol,
) -> dict:
    """:func:`pixel_baselines`, read from / written to the user's cache (module docstring); ``cache`` says which.

    ``directory`` overrides the cache folder. A cache that cannot be written only costs the recomputation next
    time (a warning says so); a corrupt entry is recomputed and replaced."""
    from selfsup.runtime import save_json

    folder = Path(directory) if directory is not None else cache_dir()
    key = baseline_key(train_images, train_labels, test_images, test_labels, protocol)
    path = folder / f"{key}.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "cache": f"read from {path}"}
        except (OSError, json.JSONDecodeError):
            pass  # corrupt or unreadable: recompute and overwrite
    result = pixel_baselines(train_images, train_labels, test_images, test_labels, **protocol)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_json(path, result)
        where = f"computed, saved to {path}"
    except OSError as e:
        warnings.warn(f"could not cache the pixel baselines in {folder} ({e}); they will be recomputed next time. "
                      "Set XDG_CACHE_HOME to a writable folder to keep them.", stacklevel=2)
        where = "computed (not cached)"
    return {**result, "cache": where}


# ----------------------------------------------------------------------------------------------- verdicts


def below_baseline(result: dict) -> list[str]:
    """A sentence for each headline accuracy (kNN, linear) below its pixel baseline; ``[]`` when none is.

    ``result`` is an eval.json dict (``knn_top1``, ``linear_top1``, ``baselines``, optional ``reference``)."""
    base = result.get("baselines") or {}
    ref = result.get("reference") or {}
    out = []
    for key, name in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        value, floor = result.get(key), base.get(key)
        if not (_number(value) and _number(floor)) or value >= floor:
            continue
        hint = "train longer or see the recipe's reference"
        if _number(ref.get(key)):
            hint = (f"train longer: the recipe's reference run reached {name} {ref[key]:.2f}% after "
                    f"{ref.get('epochs', '?'):g} epochs" if _number(ref.get("epochs")) else
                    f"train longer: the recipe's reference run reached {name} {ref[key]:.2f}%")
        out.append(f"{name} {value:.2f}% is below the pixel baseline {floor:.2f}%: this encoder has not yet learned "
                   f"more than the pixels ({hint})")
    return out


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------- references


def load_references() -> dict:
    """The shipped ``selfsup/recipes/reference.json``: ``{dataset: {"method:recipe": entry}}`` ({} if absent)."""
    path = resources.files("selfsup") / "recipes" / "reference.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def recipe_reference(dataset: str, method: str, recipe: str, *, run: dict | None = None,
                     references: dict | None = None) -> dict | None:
    """The measured reference of ``method:recipe`` on ``dataset``, or None when none was measured.

    ``run`` (``epochs``, ``batch_size`` and optionally ``imbalance_ratio``, ``max_steps``) lists in ``differs`` the
    settings where the run is not the reference run, e.g. ``"epochs 1 (reference 12)"``."""
    refs = load_references() if references is None else references
    entry = (refs.get(dataset) or {}).get(f"{method}:{recipe}")
    if entry is None:
        return None
    differs = []
    run = run or {}
    for key, name in (("epochs", "epochs"), ("batch_size", "batch size")):
        mine, theirs = run.get(key), entry.get(key)
        if _number(mine) and _number(theirs) and float(mine) != float(theirs):
            differs.append(f"{name} {mine:g} (reference {theirs:g})")
    if _number(run.get("imbalance_ratio")) and run["imbalance_ratio"] != 1:
        differs.append(f"data.imbalance_ratio {run['imbalance_ratio']:g} (reference 1)")
    if _number(run.get("max_steps")) and run["max_steps"] > 0:
        differs.append(f"train.max_steps {run['max_steps']:g} (reference: every epoch)")
    return {**entry, "dataset": dataset, "recipe": f"{method}:{recipe}", "differs": differs,
            "source": "selfsup/recipes/reference.json (docs/results/fashion_mnist.md, benchmarks/catalog.py)"}
