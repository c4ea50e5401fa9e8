"""Linear probes on frozen features: offline with an LR grid in one pass, and online during pre-training.

Cookbook §3.7.1 ("Linear"): a linear layer on the frozen backbone, trained for ~100 epochs; because it is cheap,
several heads with different hyper-parameters can be trained at the same time (Bao et al., 2021, BEiT), and a probe
can be trained online by cutting the gradient to the representation (Fig. 13, Bordes et al., 2023).

Offline protocol "fmnist-linear" (DESIGN.md §4): standardize features with the train split's mean/std, hold out a
stratified ``val_fraction`` of the *train* split, train every (lr, weight decay) head of the grid in one pass, pick the
head with the best validation top-1 and report its test top-1. The test split is only read after the choice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.holdout import stratified_split  # noqa: F401  (re-exported: the probes' validation split)

# SGD + momentum 0.9 with cosine decay, as in MoCo/SimCLR linear evaluation. The lr grid brackets the best lr for
# standardized features: 0.01 on raw Fashion-MNIST pixels, 0.001-0.003 on noisy random 512-d features, 0.3-1.0 on
# the default SimCLR run's 256-d features (val 88.20 / 88.27 / 87.63 % at 0.3 / 1 / 3 with wd 1e-4: the grid's top end
# was its best lr before 1.0 was added). Weight decay 1e-4 helps the larger lrs a little; 1e-3 was never chosen.
# 30 epochs: on raw Fashion-MNIST pixels test top-1 is 84.2 / 84.3 / 84.3 % at 10 / 30 / 100 epochs (the grid
# compensates); 60k x 256 features x 14 heads take ~10 s on one CPU thread.
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4)

# The probes run their small computations on one CPU thread, whatever torch.get_num_threads() says: matrix products
# and reductions split their work by thread count, so float32 sums came out in a different order at 1 and 2 threads
# (linear top-1 81.99 vs 81.96 % on one run's features). One thread is available on every machine; the probes are
# small (the linear grid on 60k x 256 features: ~10 s), so the cost is a few seconds (see the issue-13 note).
PROBE_THREADS = 1


@contextlib.contextmanager
def fixed_num_threads(n: int = PROBE_THREADS) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the caller's thread count afterwards.

    Makes CPU results independent of the caller's thread count (the same work split, so the same float rounding);
    on CUDA it changes nothing. Exceptions propagate after the count is restored.
    """
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Subtract the train mean and divide by the train std (per feature) in ``train`` and every other split."""
    mean, std = train.mean(dim=0), train.std(dim=0)
    return tuple((x - mean) / (std + eps) for x in (train, *others))


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps (Loshchilov & Hutter, 2017, without restarts)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _head_logits(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits ``(B, G, C)`` of G linear heads stored as ``weight (D, G, C)``, ``bias (G, C)``: one matmul."""
    d, g, c = weight.shape
    return (x @ weight.reshape(d, g * c)).view(-1, g, c) + bias


@torch.no_grad()
def sgd_step_heads(
    xb: Tensor,
    yb: Tensor,
    weight: Tensor,
    bias: Tensor,
    buf_w: Tensor,
    buf_b: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    momentum: float,
) -> None:
    """One in-place SGD-momentum step of G softmax-regression heads (``weight (D, G, C)``, ``bias (G, C)``).

    The step of :func:`train_linear_heads` (and of the augmented probe): closed-form gradient of the mean
    cross-entropy, d/d(logits) = (softmax - one_hot) / B for every head at once, weight decay on the weight only,
    per-head ``lr (G,)`` already scaled by the schedule.
    """
    grad_logits = _head_logits(xb, weight, bias).softmax(dim=2)
    grad_logits -= F.one_hot(yb, weight.shape[2])[:, None, :]
    grad_logits /= len(yb)
    grad_w = (xb.T @ grad_logits.view(len(yb), -1)).view_as(weight)
    buf_w.mul_(momentum).add_(grad_w + weight_decay[:, None] * weight)
    buf_b.mul_(momentum).add_(grad_logits.sum(dim=0))
    weight.sub_(lr[:, None] * buf_w)
    bias.sub_(lr[:, None] * buf_b)


@torch.no_grad()
def train_linear_heads(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Train G = len(lrs) zero-initialized softmax-regression heads together; returns ``(weight, bias)``.

    Head g follows exactly ``torch.optim.SGD(lr=lrs[g], momentum, weight_decay=weight_decays[g])`` on the mean
    cross-entropy (weight decay on the weight only, not the bias), with a per-step cosine decay of its lr and the
    same seeded mini-batch order for every head. The gradient is the closed form of softmax regression (no
    autograd graph), which makes one step about two matmuls for all heads together.
    """
    n, d = x.shape
    g = len(lrs)
    lr = torch.as_tensor(lrs, dtype=torch.float32, device=x.device)
    wd = torch.as_tensor(weight_decays, dtype=torch.float32, device=x.device)
    weight = torch.zeros(d, g, num_classes, device=x.device)
    bias = torch.zeros(g, num_classes, device=x.device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    gen = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            sgd_step_heads(x[idx], y[idx], weight, bias, buf_w, buf_b, lr * cosine_factor(step, total), wd, momentum)
            step += 1
    return weight, bias


@torch.no_grad()
def head_accuracies(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, chunk: int = 8192) -> Tensor:
    """Top-1 accuracy (percent) of every head; a head with non-finite weights (diverged) gets NaN."""
    correct = torch.zeros(weight.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        pred = _head_logits(x[start : start + chunk], weight, bias).argmax(dim=2)  # (B, G)
        correct += (pred == y[start : start + chunk, None]).sum(dim=0)
    acc = (100.0 * correct / x.shape[0]).cpu()
    finite = torch.isfinite(weight).all(dim=(0, 2)) & torch.isfinite(bias).all(dim=1)
    return torch.where(finite.cpu(), acc, torch.full_like(acc, float("nan")))


def _edge(values: list[float], chosen: float, *, low_is_edge: bool = True) -> str | None:
    """"largest" / "smallest" when ``chosen`` is that end of a grid of several values, else None.

    ``low_is_edge=False``: the smallest end is no edge when it is 0 (a weight decay cannot go lower)."""
    distinct = sorted(set(values))
    if len(distinct) < 2:
        return None
    if chosen == distinct[-1]:
        return "largest"
    if chosen == distinct[0] and (low_is_edge or chosen > 0):
        return "smallest"
    return None


def _widened(values: list[float], edge: str) -> list[float]:
    """The grid extended by x3 and x10 past the edge it was chosen at (a value of 0 is replaced by 1e-5 first)."""
    distinct = sorted(set(values))
    if edge == "largest":
        top = distinct[-1] or 1e-5
        return [*distinct[-2:], 3 * top, 10 * top]
    return [distinct[0] / 10, distinct[0] / 3, *distinct[:2]]


def edge_notes(grid: list[tuple[float, float]], best: int) -> list[str]:
    """One sentence per hyper-parameter chosen at the end of its grid: the best value may lie outside it.

    The config keys named are ``eval.linear_lrs`` / ``eval.linear_weight_decays``."""
    notes = []
    for i, (name, key) in enumerate((("lr", "eval.linear_lrs"), ("weight decay", "eval.linear_weight_decays"))):
        values = [point[i] for point in grid]
        edge = _edge(values, grid[best][i], low_is_edge=i == 0)
        if edge is None:
            continue
        wider = ",".join(f"{v:g}" for v in _widened(values, edge))
        direction = "larger" if edge == "largest" else "smaller"
        notes.append(f"the chosen {name} {grid[best][i]:g} is the {edge} in the grid: a {direction} one may do "
                     f"better; set {key}=[{wider}]")
    return notes


def select_head(grid: list[tuple[float, float]], val_acc: Tensor) -> tuple[int, dict]:
    """Index of the head with the best validation top-1 (first on ties, diverged heads never chosen) and the
    result entries every grid probe reports: val_top1, lr, weight_decay, the edge flags (``lr_edge``,
    ``weight_decay_edge``: "largest", "smallest" or None; ``lr_at_grid_edge``; ``edge_notes``) and the whole grid."""
    if bool(val_acc.isnan().all()):
        lrs = sorted({lr for lr, _ in grid})
        raise RuntimeError(f"every linear-probe head diverged (lrs={lrs}); try smaller learning rates.")
    best = int(torch.nan_to_num(val_acc, nan=-1.0).argmax())
    lr_edge = _edge([lr for lr, _ in grid], grid[best][0])
    return best, {
        "val_top1": val_acc[best].item(),
        # the chosen lr is the grid's smallest or largest: the best lr may lie outside it, widen `lrs`
        "lr_at_grid_edge": lr_edge is not None,
        "lr_edge": lr_edge,
        "weight_decay_edge": _edge([wd for _, wd in grid], grid[best][1], low_is_edge=False),
        "edge_notes": edge_notes(grid, best),
        "lr": grid[best][0],
        "weight_decay": grid[best][1],
        "grid": [{"lr": lr, "weight_decay": wd, "val_top1": acc}
                 for (lr, wd), acc in zip(grid, val_acc.tolist(), strict=True)],
    }


def head_predictions(x: Tensor, weight: Tensor, bias: Tensor, chunk: int = 8192) -> Tensor:
    """Predicted class ``(N,)`` of a single head (``weight (D, 1, C)``, ``bias (1, C)``)."""
    return torch.cat([_head_logits(x[s : s + chunk], weight, bias)[:, 0].argmax(dim=1)
                      for s in range(0, x.shape[0], chunk)]) if x.shape[0] else torch.empty(0, dtype=torch.long)


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` counts, row = true class, column = predicted class (scikit-learn's convention)."""
    idx = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_top1(confusion: Tensor) -> list[float | None]:
    """Recall of every class in percent (diagonal / row sum); None for a class absent from the split."""
    totals = confusion.sum(dim=1)
    return [100.0 * int(confusion[c, c]) / int(n) if int(n) else None for c, n in enumerate(totals)]


def _check_inputs(feats: Tensor, labels: Tensor, name: str) -> None:
    if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} features must be (N, D) with one label each, got {tuple(feats.shape)} features and "
            f"{tuple(labels.shape)} labels."
        )


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 30,
    batch_size: int = 1024,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: bool = False,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    return_predictions: bool = False,
) -> dict:
    """fmnist-linear: the linear probe protocol of DESIGN.md §4; returns test/val top-1 (percent) and the choice.

    Every (lr, weight decay) pair of the grid is one head; all heads train in one pass on the fit part of the
    train split. The head with the best validation top-1 is chosen (first in grid order on ties). With
    ``refit=False`` (default) that head itself is tested; with ``refit=True`` a fresh head with the chosen
    hyper-parameters is retrained on the whole train split and tested. ``epochs=30`` rather than the cookbook's
    ~100: on cached features the problem is convex and the lr grid makes up for it (see ``DEFAULT_LRS``).

    The tested head's ``confusion`` matrix (rows: true class) and ``per_class_top1`` come with the result;
    ``return_predictions=True`` adds its test ``predictions`` (a tensor, not JSON). The work runs on
    ``PROBE_THREADS`` CPU threads (:func:`fixed_num_threads`): the result does not depend on the caller's count.
    """
    with fixed_num_threads():
        return _linear_probe(train_feats, train_labels, test_feats, test_labels, lrs=lrs, weight_decays=weight_decays,
                             epochs=epochs, batch_size=batch_size, momentum=momentum, val_fraction=val_fraction,
                             seed=seed, refit=refit, num_classes=num_classes, device=device,
                             return_predictions=return_predictions)


def _linear_probe(train_feats, train_labels, test_feats, test_labels, *, lrs, weight_decays, epochs, batch_size,
                  momentum, val_fraction, seed, refit, num_classes, device, return_predictions) -> dict:
    _check_inputs(train_feats, train_labels, "train")
    _check_inputs(test_feats, test_labels, "test")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1) so that the lr is chosen on held-out train data, got "
            f"{val_fraction}."
        )
    if not lrs or not weight_decays or epochs < 1 or batch_size < 1:
        raise ValueError("lrs and weight_decays must be non-empty, epochs and batch_size >= 1.")
    device = torch.device(device)
    y_train = train_labels.long().to(device)
    num_classes = int(y_train.max()) + 1 if num_classes is None else num_classes
    x_train, x_test = standardize(train_feats.to(device, torch.float32), test_feats.to(device, torch.float32))
    fit, val = (i.to(device) for i in stratified_split(y_train.cpu(), val_fraction, seed))
    if len(val) == 0 or len(fit) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(y_train)} train samples leaves an empty split; "
            f"use more samples or a different val_fraction."
        )

    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    heads = train_linear_heads(
        x_train[fit],
        y_train[fit],
        num_classes,
        [lr for lr, _ in grid],
        [wd for _, wd in grid],
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        seed=seed,
    )
    best, choice = select_head(grid, head_accuracies(x_train[val], y_train[val], *heads))
    best_lr, best_wd = grid[best]
    weight, bias = heads[0][:, best : best + 1], heads[1][best : best + 1]
    if refit:
        weight, bias = train_linear_heads(
            x_train,
            y_train,
            num_classes,
            [best_lr],
            [best_wd],
            epochs=epochs,
            batch_size=batch_size,
            momentum=momentum,
            seed=seed,
        )
    y_test = test_labels.long().to(device)
    test_acc = head_accuracies(x_test, y_test, weight, bias)[0].item()
    predictions = head_predictions(x_test, weight, bias)
    num_classes = max(num_classes, int(y_test.max()) + 1 if len(y_test) else 0)
    confusion = confusion_matrix(y_test, predictions, num_classes)
    return {
        "top1": test_acc,
        **choice,
        "confusion": confusion.tolist(),
        "per_class_top1": per_class_top1(confusion),
        **({"predictions": predictions.cpu()} if return_predictions else {}),
        "epochs": epochs,
        "refit": refit,
        "protocol": {
            "name": "fmnist-linear",
            "standardize": "train-split mean/std",
            "optimizer": "sgd",
            "momentum": momentum,
            "schedule": "cosine",
            "batch_size": batch_size,
            "init": "zeros",
            "selection": f"best val top-1 on a stratified {val_fraction:g} of train (seed {seed}); test unused",
            "tested_head": "retrained on full train"
            if refit
            else "the selected head (trained on train - val)",
            "n_fit": len(fit),
            "n_val": len(val),
            "n_test": int(test_feats.shape[0]),
            "threads": PROBE_THREADS,  # whatever torch.get_num_threads() says: thread-count invariant
        },
    }


class OnlineLinearProbe(nn.Module):
    """Linear classifier trained during pre-training on detached features (cookbook Fig. 13, §3.7.1).

    ``BatchNorm1d(affine=False)`` then ``nn.Linear`` as in MAE's linear probe (He et al., 2022), zero-initialized
    so that building the probe draws nothing from the RNG (a run with labels keeps the same model init as one
    without). The probe owns its optimizer (SGD, momentum 0.9; lr 0.1 as solo-learn's online classifier), so the
    trainer and the method's optimizer stay separate: the trainer only calls :meth:`step` each training step.

    Exact resume: :meth:`state_dict` carries the optimizer state (momentum buffers, lr) through
    ``get_extra_state`` under the key ``"_extra_state"``, so it nests inside any parent module's state_dict and
    loads with ``torch.load(weights_only=True)``. Under ``torch.distributed`` gradients are averaged across ranks
    (batch-norm running statistics stay per rank).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False)
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.SGD(
            self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features))

    def step(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """One optimizer step on ``features.detach()``; returns detached ``loss`` and batch ``acc`` (percent).

        Values are tensors so that logging them does not force a device sync every step.
        """
        features = features.detach().float()
        was_training = self.training
        self.train()
        with torch.enable_grad(), torch.autocast(device_type=features.device.type, enabled=False):
            logits = self(features)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._average_gradients_across_ranks()
        self.optimizer.step()
        self.train(was_training)
        acc = 100.0 * (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss.detach(), "acc": acc}

    def _average_gradients_across_ranks(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for p in self.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
