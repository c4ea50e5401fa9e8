"""Linear probe trained on features of augmented views (cookbook §3.7.1 "Linear", Fig. 13).

The offline linear probe (``probe.linear_probe``, DESIGN.md §4 fmnist-linear) encodes every image once, without
augmentation ("In the offline setting no data-augmentation is employed", cookbook Fig. 13). The classic linear
evaluation of SimCLR / MoCo (Chen et al., 2020 appendix B.6; He et al., 2020) instead trains the linear layer on
random-resized-crop + flip views of the training images, through the frozen encoder. This module implements that
variant with the one-pass LR grid of ``probe.train_linear_heads`` (Bao et al., 2021: several heads at once):

- every epoch, each fit image gets a fresh crop + flip draw (``selfsup.data.augment``, seeded generator), the
  frozen encoder (eval mode, no grad) encodes the batch, and every (lr, weight decay) head takes one SGD step;
- features are standardized with the mean/std of the *un-augmented* train features;
- the head is chosen on un-augmented held-out train images and tested on un-augmented test images.

Cost: ``epochs`` forward passes of the encoder over the train split (plus one over train and test without
augmentation), against one for the offline probe; this is why ``selfsup eval`` leaves it off by default.
Measured on the reference SimCLR run (ResNet-10 w32, Fashion-MNIST, one CPU thread, AMD EPYC): 10 epochs take
~130 s and give 84.9 % test top-1 (crop scale (0.08, 1): 83.1 %), below the offline probe's 87.0 % (10 epochs) /
87.4 % (30 epochs): on this data the probe gains nothing from seeing crops it is not tested on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from selfsup.data.augment import normalize_float, resized_crop, sample_crop_boxes
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.probe import (
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    cosine_factor,
    head_accuracies,
    select_head,
    sgd_step_heads,
    stratified_split,
)

# Crop area fraction ~ U(0.5, 1): milder than the pre-training views of the reference SimCLR recipe (0.4, 1) and
# than torchvision's (0.08, 1), which is sized for 224-px ImageNet images; a probe should see the object.
DEFAULT_CROP_SCALE = (0.5, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop


def as_uint8_images(images: Tensor | np.ndarray, name: str) -> Tensor:
    """``images`` as a uint8 ``(N, C, H, W)`` CPU tensor (NumPy arrays are wrapped without a copy)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"{name} images must be uint8 (N, C, H, W) in [0, 255], got dtype {images.dtype} and shape "
            f"{tuple(images.shape)}; add a channel axis to (N, H, W) arrays (images[:, None]) and pass raw "
            f"pixels, not normalized floats."
        )
    return images


def check_image_splits(train_images, train_labels, test_images, test_labels) -> tuple[Tensor, Tensor]:
    """Validate two labelled uint8 image splits; returns the (train, test) images as tensors."""
    train_images = as_uint8_images(train_images, "train")
    test_images = as_uint8_images(test_images, "test")
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{name} needs one label per image: {images.shape[0]} images but labels of shape "
                f"{tuple(labels.shape)}."
            )
        if labels.is_floating_point() or labels.is_complex() or (labels.numel() and int(labels.min()) < 0):
            raise ValueError(f"{name} labels must be integer class indices >= 0.")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"train and test images differ in shape ({tuple(train_images.shape[1:])} vs "
            f"{tuple(test_images.shape[1:])}); evaluate splits of one dataset."
        )
    return train_images, test_images


def resolve_num_classes(train_labels: Tensor, test_labels: Tensor, num_classes: int | None) -> int:
    """``num_classes`` or ``max(train label) + 1``; raises when a label of either split does not fit."""
    num_classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    top = max(int(train_labels.max()), int(test_labels.max()))
    if top >= num_classes:
        raise ValueError(
            f"labels go up to {top} but num_classes={num_classes}; pass num_classes covering every class of "
            f"both splits."
        )
    return num_classes


def train_view(
    images_uint8: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] | None,
    flip: bool,
    generator: torch.Generator | None,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> Tensor:
    """One normalized training view per image, at the input size: random resized crop (area fraction ~
    U(crop_scale), aspect ratio ~ logU(ratio)) and a horizontal flip with p = 0.5, one draw per image.

    ``crop_scale=None`` keeps the whole image and ``flip=False`` never flips, so both off give the
    un-augmented, normalized image (up to float rounding of the 1/255 scaling).
    """
    n, _, h, w = images_uint8.shape
    device = images_uint8.device
    if crop_scale is None:
        boxes = torch.tensor([[0, 0, h, w]], device=device).expand(n, 4)
    else:
        boxes = sample_crop_boxes(n, h, w, crop_scale, ratio, generator, device)
    flips = None
    if flip:
        rng_device = generator.device if generator is not None else device
        flips = (torch.rand(n, generator=generator, device=rng_device) < 0.5).to(device)
    return normalize_float(resized_crop(images_uint8, boxes, (h, w), flips), mean, std, inplace=True)


def standardizer(plain_train: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(mean, scale)`` so that ``(x - mean) * scale`` is ``probe.standardize`` of un-augmented train features.

    A feature that is constant on the un-augmented train images (std <= eps times the largest std; e.g. a unit
    that never fires on whole images) gets scale 0: its std says nothing about augmented views, on which it may
    vary, and dividing by ``eps`` would blow those values up by 1e6. ``standardize`` maps it to ~0 as well.
    """
    std = plain_train.std(dim=0)
    scale = torch.where(std > eps * std.max(), 1.0 / (std + eps), torch.zeros_like(std))
    return plain_train.mean(dim=0), scale


def augmented_linear_probe(
    encoder: nn.Module,
    train_images: Tensor | np.ndarray,
    train_labels: Tensor,
    test_images: Tensor | np.ndarray,
    test_labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    epochs: int = 10,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    crop_scale: tuple[float, float] | None = DEFAULT_CROP_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
    batch_size: int = 1024,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Linear probe on augmented views through the frozen ``encoder`` (module docstring); returns the same keys as
    ``probe.linear_probe`` (``top1``, ``val_top1``, ``lr``, ``weight_decay``, ``epochs``, ``grid``, ``protocol``).

    Costs ``epochs`` forward passes of the encoder over the train split (one per epoch, each on fresh views), so it
    is off by default in ``selfsup eval``. ``encoder`` must already be on ``device``; it runs in eval mode without
    gradients and its training flag is restored. Images are uint8 ``(N, C, H, W)``, normalized here with
    ``mean``/``std``. Heads, lr schedule (cosine per step), batch order and selection are those of
    ``linear_probe`` with the same ``seed``: with ``crop_scale=None, flip=False`` both give the same grid.
    ``epochs=10`` (vs 30 offline) because every epoch costs a pass of the encoder; views are re-drawn each epoch.
    """
    train_images, test_images = check_image_splits(train_images, train_labels, test_images, test_labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1) so that the lr is chosen on held-out train data, got {val_fraction}."
        )
    if not lrs or not weight_decays or epochs < 1 or batch_size < 1:
        raise ValueError("lrs and weight_decays must be non-empty, epochs and batch_size >= 1.")
    device = torch.device(device)
    y_train = train_labels.long().cpu()  # indexes the CPU images
    num_classes = resolve_num_classes(y_train, test_labels, num_classes)
    fit, val = stratified_split(y_train, val_fraction, seed)
    if len(val) == 0 or len(fit) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(y_train)} train samples leaves an empty split; "
            f"use more samples or a different val_fraction."
        )
    mean, std = tuple(float(m) for m in np.atleast_1d(mean)), tuple(float(s) for s in np.atleast_1d(std))

    # un-augmented features: standardization statistics (whole train split, as linear_probe), val and test
    plain_train = extract_features(encoder, train_images, mean, std, batch_size=batch_size, device=device)
    plain_test = extract_features(encoder, test_images, mean, std, batch_size=batch_size, device=device)
    f_mean, f_scale = standardizer(plain_train.to(device))

    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    lr_t = torch.tensor([lr for lr, _ in grid], dtype=torch.float32, device=device)
    wd_t = torch.tensor([wd for _, wd in grid], dtype=torch.float32, device=device)
    weight = torch.zeros(plain_train.shape[1], len(grid), num_classes, device=device)
    bias = torch.zeros(len(grid), num_classes, device=device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    order_gen = torch.Generator().manual_seed(seed)  # the batch order of train_linear_heads(seed=seed)
    view_gen = torch.Generator().manual_seed(seed + 1)
    total = epochs * math.ceil(len(fit) / batch_size)
    was_training = encoder.training
    encoder.eval()
    try:
        step = 0
        for _ in range(epochs):
            order = fit[torch.randperm(len(fit), generator=order_gen)]
            for start in range(0, len(fit), batch_size):
                idx = order[start : start + batch_size]
                views = train_view(train_images[idx].to(device), mean, std, crop_scale, flip, view_gen, ratio)
                with torch.no_grad():
                    feats = (encoder(views).float() - f_mean) * f_scale
                step_lr = lr_t * cosine_factor(step, total)
                sgd_step_heads(feats, y_train[idx].to(device), weight, bias, buf_w, buf_b, step_lr, wd_t, momentum)
                step += 1
    finally:
        encoder.train(was_training)

    standardized = (plain_train[val].to(device) - f_mean) * f_scale
    best, choice = select_head(grid, head_accuracies(standardized, y_train[val].to(device), weight, bias))
    x_test = (plain_test.to(device) - f_mean) * f_scale
    test_acc = head_accuracies(x_test, test_labels.long().to(device), weight[:, best : best + 1], bias[best : best + 1])
    augmentation = "none" if crop_scale is None else f"random resized crop, scale {tuple(crop_scale)}, ratio {ratio}"
    return {
        "top1": test_acc[0].item(),
        **choice,
        "epochs": epochs,
        "protocol": {
            "name": "augmented-linear",
            "augmentation": augmentation + (" + horizontal flip p=0.5" if flip else "")
            + f"; one fresh draw per image per epoch (seed {seed + 1})",
            "encoder": "frozen, eval mode, no grad",
            "encoder_passes": f"{epochs} over the fit split (augmented) + 1 over train and test (plain)",
            "standardize": "mean/std of un-augmented train-split features; features constant there are zeroed",
            "optimizer": "sgd",
            "momentum": momentum,
            "schedule": "cosine",
            "batch_size": batch_size,
            "init": "zeros",
            "selection": f"best val top-1 on un-augmented stratified {val_fraction:g} of train (seed {seed}); "
            "test unused",
            "tested_head": "the selected head (trained on train - val), on un-augmented test images",
            "n_fit": len(fit),
            "n_val": len(val),
            "n_test": int(test_images.shape[0]),
        },
    }
