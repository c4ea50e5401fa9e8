"""Full fine-tuning of a pre-trained encoder with a linear head (cookbook §3.7.1 "Full Fine-tuning", §3.5.4).

MAE (He et al., 2022) made fine-tuning the main evaluation: linear probing does not tell how well a method's
non-linear features serve downstream, and the cookbook ranks it the most expensive protocol. The recipe follows
MAE's fine-tuning (appendix A.3) at CPU size:

- a deep copy of the encoder (the caller's module is never touched) + a linear head, every parameter trained;
- AdamW (betas 0.9, 0.999), weight decay 0.05, linear warm-up over the first 5% of steps (MAE: 5 of 100 epochs)
  then cosine decay, label smoothing 0.1, random-resized-crop + flip views;
- for a ``VisionTransformer``: layer-wise lr decay (LayerDecay, Clark et al. 2020; BEiT, Bao et al. 2021; MAE),
  "the last layer is not affected, while the first has very small learning rate" (cookbook §3.5.4). Layer ids
  follow MAE's ``lr_decay.py``: 0 for patch_embed / cls_token / pos_embed, i + 1 for ``blocks[i]``, L + 1 for the
  final norm and the head; ``lr_scale = layer_decay ** (L + 1 - id)``. ResNets get one lr for every layer;
- no weight decay on biases, norm parameters, ``pos_embed`` and ``cls_token`` (``VisionTransformer.
  no_weight_decay``; 1-D parameters as ``optim.param_groups``);
- the epoch with the best top-1 on a held-out stratified part of the *train* split (the later one on a tie) is
  kept and tested once.

Cost on CPU: one epoch from the reference SimCLR ResNet-10 w32 on Fashion-MNIST (54k images, batch 256, one thread,
AMD EPYC) took 117 s and reached 81.5 % test top-1, below its linear probe (87.4 %): one epoch moves the backbone
away from its pre-trained features before the fresh head has caught up; the protocol needs its ``epochs``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.augment import normalize
from selfsup.evaluate.aug_probe import (
    DEFAULT_CROP_SCALE,
    DEFAULT_RATIO,
    check_image_splits,
    resolve_num_classes,
    train_view,
)
from selfsup.evaluate.probe import stratified_split
from selfsup.nn.vit import VisionTransformer
from selfsup.optim import can_fuse, no_decay_names, warmup_cosine

# MAE fine-tuning (He et al., 2022, Table 9): base lr 5e-4 per 256 images (lr = blr * batch / 256), weight decay
# 0.05, layer decay 0.65 (ViT-B) / 0.75 (ViT-L, ViT-H); the cookbook gives 0.65-0.85 (§3.5.4). 0.75 is the middle of
# that range. ``epochs=10`` is a CPU-sized choice (MAE: 100 epochs for ViT-B on ImageNet).
DEFAULT_VIT_LAYER_DECAY = 0.75
DEFAULT_LR = 5e-4
DEFAULT_BATCH_SIZE = 256
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_WARMUP_FRACTION = 0.05
DEFAULT_LABEL_SMOOTHING = 0.1


class Classifier(nn.Module):
    """``head(encoder(x))``: the encoder's pooled features ``(B, D)`` through a linear layer."""

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE main_finetune.py: a near-zero head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------------------------- parameter groups


def find_vit(model: nn.Module) -> tuple[str, VisionTransformer] | None:
    """``(prefix, vit)`` for the one ``VisionTransformer`` in ``model`` (prefix "" when it is the model)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, VisionTransformer)]
    if len(found) > 1:
        raise ValueError(
            f"model holds {len(found)} VisionTransformers ({[n for n, _ in found]}); layer-wise lr decay needs "
            "exactly one to number the layers."
        )
    if not found:
        return None
    name, vit = found[0]
    return (name + "." if name else ""), vit


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of a ViT parameter name (relative to the ViT), as MAE's ``get_layer_id_for_vit``."""
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (module docstring) for a model holding one ViT.

    One group per (layer id, decayed or not), sorted that way, each with ``params``, ``weight_decay``,
    ``layer_id``, ``lr_scale = layer_decay ** (L + 1 - layer_id)`` and ``lr = base_lr * lr_scale``. Parameters
    outside the ViT (the head) sit at layer L + 1 with the full lr; frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = no decay; cookbook: 0.65-0.85), got {layer_decay}.")
    located = find_vit(model)
    if located is None:
        raise ValueError(
            f"layer-wise lr decay numbers the blocks of a selfsup VisionTransformer, and {type(model).__name__} "
            "holds none; use layer_decay=None (one lr for all layers) for other backbones."
        )
    prefix, vit = located
    depth = len(vit.blocks)
    no_decay = no_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name[len(prefix) :], depth) if name.startswith(prefix) else depth + 1
        decay = name not in no_decay
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault(
            (layer, decay),
            {"params": [], "weight_decay": weight_decay if decay else 0.0, "layer_id": layer,
             "lr_scale": scale, "lr": base_lr * scale},
        )  # fmt: skip
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def plain_param_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """Two groups at one lr: weights (decayed) and 1-D parameters plus any ``no_weight_decay()`` names (not)."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "lr": base_lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "lr": base_lr})
    return groups


# --------------------------------------------------------------------------------------------- fine-tuning


@torch.no_grad()
def _top1(model: nn.Module, images: Tensor, labels: Tensor, mean, std, batch_size: int, device) -> float:
    """Top-1 (percent) on un-augmented, normalized images, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        correct += int((model(x).argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    return 100.0 * correct / images.shape[0]


def _num_features(encoder: nn.Module, sample: Tensor) -> int:
    """The encoder's feature width: ``num_features`` when it declares one, else read off a forward pass."""
    if isinstance(getattr(encoder, "num_features", None), int):
        return encoder.num_features
    was_training = encoder.training
    with torch.no_grad():
        out = encoder.eval()(sample)
    encoder.train(was_training)
    if out.ndim != 2:
        raise ValueError(
            f"the encoder must return pooled features (batch, D), got shape {tuple(out.shape)}; pool or flatten "
            "its output first."
        )
    return out.shape[1]


def _resolve_layer_decay(layer_decay, is_vit: bool) -> float | None:
    if layer_decay == "auto":
        return DEFAULT_VIT_LAYER_DECAY if is_vit else None
    if layer_decay is not None and not is_vit:
        raise ValueError(
            "layer_decay applies to selfsup VisionTransformer encoders (it numbers their blocks); pass "
            "layer_decay=None for this encoder."
        )
    return layer_decay


def finetune(
    encoder: nn.Module,
    train_images: Tensor | np.ndarray,
    train_labels: Tensor,
    test_images: Tensor | np.ndarray,
    test_labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_classes: int | None = None,
    epochs: int = 10,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    layer_decay: float | None | str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    crop_scale: tuple[float, float] | None = DEFAULT_CROP_SCALE,
    flip: bool = True,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    return_model: bool = False,
) -> dict:
    """Fine-tune a copy of ``encoder`` with a linear head (module docstring); returns test top-1 of the best-val epoch.

    Images are uint8 ``(N, C, H, W)`` normalized with ``mean``/``std``. ``layer_decay="auto"`` means 0.75 for a
    ``VisionTransformer`` and ``None`` (one lr) otherwise. ``max_steps`` caps the optimizer steps (the schedule is
    then sized to it), for tests and quick checks; validation runs after every epoch and after the last step.
    ``train_size`` fine-tunes on a seeded, class-stratified subset of that many train images (fit + val), a
    low-label fine-tune (cookbook §3.7.1 reports 1% / 10% label fine-tunes) and what fits a CPU budget.
    The run is seeded (head init, batch order, views, drop-path) without changing the global RNG state.

    Returns ``top1`` (test), ``val_top1``, ``best_epoch``, ``epochs`` (run), ``steps``, ``lr``, ``layer_decay``,
    ``curve`` (per epoch: ``epoch``, ``steps``, ``train_loss``, ``val_top1``) and ``protocol``; with
    ``return_model=True`` also ``model``, the fine-tuned ``Classifier`` (best-val weights, eval mode).
    """
    train_images, test_images = check_image_splits(train_images, train_labels, test_images, test_labels)
    if epochs < 1 or batch_size < 2 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"need epochs >= 1, batch_size >= 2 and max_steps >= 1 or None, got {epochs}, "
                         f"{batch_size}, {max_steps}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1): the kept epoch is chosen on held-out train data, got "
                         f"{val_fraction}.")
    if not (0.0 <= warmup_fraction < 1.0 and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"warmup_fraction and label_smoothing must be in [0, 1), got {warmup_fraction} and "
                         f"{label_smoothing}.")
    layer_decay = _resolve_layer_decay(layer_decay, find_vit(encoder) is not None)
    device = torch.device(device)
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    num_classes = resolve_num_classes(train_labels, test_labels, num_classes)
    if train_size is not None:
        if not 0 < train_size <= len(train_labels):
            raise ValueError(f"train_size must be in [1, {len(train_labels)}] (the train images), got {train_size}; "
                             "pass None to fine-tune on all of them.")
        if train_size < len(train_labels):
            _, kept = stratified_split(train_labels, train_size / len(train_labels), seed)
            train_images, train_labels = train_images[kept], train_labels[kept]
    fit, val = stratified_split(train_labels, val_fraction, seed)
    if len(val) == 0 or len(fit) < 2:
        raise ValueError(f"val_fraction={val_fraction} of {len(train_labels)} train images leaves a split too "
                         "small; use more images or another val_fraction.")
    mean, std = tuple(float(m) for m in np.atleast_1d(mean)), tuple(float(s) for s in np.atleast_1d(std))

    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        backbone = copy.deepcopy(encoder).to(device)
        sample = normalize(train_images[:2].to(device), mean, std)
        model = Classifier(backbone, _num_features(backbone, sample), num_classes).to(device)
        model.requires_grad_(True)  # fine-tuning trains everything, a frozen patch embedding included
        groups = (
            layer_decay_param_groups(model, lr, weight_decay, layer_decay)
            if layer_decay is not None
            else plain_param_groups(model, lr, weight_decay)
        )
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999),  # fused: selfsup.optim.can_fuse
                                      fused=can_fuse([q for g in groups for q in g["params"]]))
        steps_per_epoch = math.ceil(len(fit) / batch_size)
        total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        warmup = round(warmup_fraction * total)
        curve, best_state = _train(
            model, optimizer, train_images, train_labels, fit, val, mean, std,
            batch_size=batch_size, total=total, warmup=warmup, crop_scale=crop_scale, flip=flip,
            label_smoothing=label_smoothing, seed=seed, device=device,
        )  # fmt: skip
    best = max(reversed(curve), key=lambda row: row["val_top1"])  # ties: the later epoch, as _train keeps
    model.load_state_dict(best_state)
    result = {
        "top1": _top1(model, test_images, test_labels, mean, std, batch_size, device),
        "val_top1": best["val_top1"],
        "best_epoch": best["epoch"],
        "epochs": len(curve),
        "steps": total,
        "lr": lr,
        "layer_decay": layer_decay,
        "curve": curve,
        "protocol": {
            "name": "finetune",
            "model": f"deep copy of the encoder + Linear({num_classes}) head (trunc-normal std 2e-5), all trained",
            "optimizer": "adamw, betas (0.9, 0.999)",
            "lr": f"{lr:g} peak" + (f", layer decay {layer_decay:g} (lr_scale = decay^(L+1-layer))"
                                    if layer_decay is not None else ", same for every layer"),
            "weight_decay": f"{weight_decay:g}; none on biases, norms, pos_embed, cls_token",
            "schedule": f"linear warm-up {warmup} steps, cosine to 0 at step {total}",
            "batch_size": batch_size,
            "label_smoothing": label_smoothing,
            "augmentation": ("none" if crop_scale is None else f"random resized crop scale {tuple(crop_scale)}, "
                             f"ratio {DEFAULT_RATIO}") + (" + horizontal flip p=0.5" if flip else ""),
            "selection": f"best val top-1 after each epoch on un-augmented stratified {val_fraction:g} of train "
            f"(seed {seed}); test read once, with those weights",
            "train_size": "all train images" if train_size is None else f"stratified seeded subset: {len(train_labels)}",
            "n_fit": len(fit),
            "n_val": len(val),
            "n_test": int(test_images.shape[0]),
        },
    }
    if return_model:
        result["model"] = model.eval()
    return result


def _train(model, optimizer, images, labels, fit, val, mean, std, *, batch_size, total, warmup, crop_scale, flip,
           label_smoothing, seed, device) -> tuple[list[dict], dict]:
    """The fine-tuning loop: ``total`` AdamW steps, validation after every epoch; returns (curve, best state)."""
    order_gen = torch.Generator().manual_seed(seed)
    view_gen = torch.Generator().manual_seed(seed + 1)
    curve: list[dict] = []
    best_val, best_state, step, epoch = -1.0, None, 0, 0
    while step < total:
        epoch += 1
        model.train()
        order = fit[torch.randperm(len(fit), generator=order_gen)]
        loss_sum, seen = 0.0, 0
        for start in range(0, len(fit), batch_size):
            if step >= total:
                break
            idx = order[start : start + batch_size]
            factor = warmup_cosine(step, total, warmup, peak=1.0)
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * optimizer.defaults["lr"] * factor
            step += 1
            if len(idx) < 2:  # batch norm cannot train on one image; the order is reshuffled next epoch
                continue
            x = train_view(images[idx].to(device), mean, std, crop_scale, flip, view_gen)
            loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        val_top1 = _top1(model, images[val], labels[val], mean, std, batch_size, device)
        curve.append({"epoch": epoch, "steps": step, "train_loss": loss_sum / max(seen, 1), "val_top1": val_top1})
        if val_top1 >= best_val:  # a tie goes to the later epoch (more training, same val top-1)
            best_val = val_top1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return curve, best_state
