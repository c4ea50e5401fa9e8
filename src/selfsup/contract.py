"""The contract between a method and the trainer (method contract v2; DESIGN.md §2).

The trainer calls, once per optimizer step and without knowing which method it runs::

    views = method.view_maker(batch, generator)          # Views: crops (global first), masks, geometry, paired
    out = method(views, progress)                        # {"loss", "features", ["embedding"], **scalars to log}
                                                         # (per micro-batch)
    method.before_optimizer_step(progress)               # gradients are reduced across processes: DINO freezes its
                                                         # last layer in epoch 1, SwAV its prototypes
    optimizer.step()
    logs = method.on_step_end(progress_after)            # EMA teachers, centers, queues

``features`` are the backbone's outputs of the first view (the online probe reads them); ``embedding``, optional, is
what the loss compares for that view (a projector's or predictor's output), which the collapse monitor watches
(:mod:`selfsup.monitor`; the features when a method returns none). A step whose loss or gradients are not finite
is skipped: no optimizer step, no ``before_optimizer_step``/``on_step_end``, batch-norm statistics put back; so a
method must change other state only in those hooks, not in ``forward`` (the one exception: a recomputation from
committed state that the next step would repeat identically, like DeepCluster-v2's k-means at an epoch's first step;
``tests/faults/test_step_contract.py`` checks every method).

``progress.step`` is always the number of optimizer steps completed when the call happens: the current step's
0-based index in ``forward`` and ``before_optimizer_step``, one more in ``on_step_end``. Evaluation and export
use ``method.exports()`` (named encoders) and ``method.guillotine_head`` (what the guillotine probe may cut, or None).
State that must survive a resume (teachers, queues, centers) lives in modules and buffers, so ``state_dict()``
carries it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Views:
    """What every view maker returns, for any modality.

    ``crops``: the augmented inputs, the ``n_global`` global crops first, then the local ones (multi-crop).
    ``masks``: named masks made with the batch from the step's generator (e.g. ``{"mim": (B, N) bool}``).
    ``geometry``: per crop, (B, 5) rows (top, left, height, width, flip): the crop box as fractions of the source
    image and 1.0 for a horizontal flip, for dense methods (VICRegL) — None when a view maker does not record it.
    ``paired``: other modalities of the same samples (CLIP: ``{"text": token ids}``).
    ``labels``: the samples' class labels when the data has them (SupCon needs them; a self-supervised method must
    not read them), ``index``: their row numbers in the training set (NPID's memory bank); both (B,) int64, filled
    by the trainer after the view maker, None when unknown.
    A ``Views`` also reads as the sequence of its crops (``len``, iteration, indexing).
    """

    crops: list[torch.Tensor]
    n_global: int
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    geometry: list[torch.Tensor] | None = None
    paired: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __post_init__(self):
        if not 1 <= self.n_global <= len(self.crops):
            raise ValueError(f"n_global={self.n_global} must be between 1 and the number of crops ({len(self.crops)})")

    @property
    def global_crops(self) -> list[torch.Tensor]:
        return self.crops[: self.n_global]

    @property
    def local_crops(self) -> list[torch.Tensor]:
        return self.crops[self.n_global:]

    def map_crops(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Views:
        """The same views with ``fn`` applied to every crop (e.g. a memory format)."""
        return dataclasses.replace(self, crops=[fn(c) for c in self.crops])

    def __len__(self) -> int:
        return len(self.crops)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.crops)

    def __getitem__(self, i):
        return self.crops[i]


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``step`` optimizer steps completed out of ``total_steps``."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        """The 0-based epoch the next step belongs to (epoch 0 is the first)."""
        return self.step // self.steps_per_epoch

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)

    def after(self) -> Progress:
        """The progress once the current step is done."""
        return Progress(self.step + 1, self.total_steps, self.steps_per_epoch)


class Method(nn.Module):
    """Base of every method: an ``nn.Module`` owning everything it trains and everything a resume must restore.

    Subclasses set ``view_maker`` and implement ``forward(views, progress)``; every hook has a default.
    """

    view_maker: Callable[..., Views]
    # Names of sub-modules whose batch norm must stay per call on several processes (not synchronized: see
    # selfsup.nn.sync_bn.synchronize_batchnorm): MoCo v2's key encoder normalizes shuffled groups of its own.
    local_batchnorm: tuple[str, ...] = ()

    def forward(self, views: Views, progress: Progress) -> dict:  # pragma: no cover - abstract
        """``{"loss": scalar tensor, "features": (B, D) backbone outputs of the first view, "embedding": optional
        (B, d) what the loss compares, **scalars to log}``."""
        raise NotImplementedError

    def before_optimizer_step(self, progress: Progress) -> None:
        """After backward (gradients reduced across processes), before the optimizer step."""

    def on_step_end(self, progress: Progress) -> dict | None:
        """Once per optimizer step, after it; returns scalars to log."""
        return None

    def exports(self) -> dict[str, nn.Module]:
        """Named encoders that evaluation uses and the run exports; the image encoder is ``"backbone"``."""
        return {"backbone": self.encoder}

    @property
    def guillotine_head(self) -> nn.Sequential | None:
        """The head the guillotine probe cuts layer by layer (cookbook §3.2, Fig. 10), or None to skip it."""
        head = getattr(self, "projector", None)
        return head if isinstance(head, nn.Sequential) else None

    def param_groups(self, weight_decay: float, no_decay_lr_scale: float = 1.0) -> list[dict]:
        """Optimizer groups: no weight decay or LARS adaptation on biases, norms and ``no_weight_decay()`` names,
        whose lr is the weights' times ``no_decay_lr_scale`` (``optim.no_decay_lr_scale``)."""
        from selfsup.optim import param_groups

        return param_groups(self, weight_decay, no_decay_lr_scale)
