"""A cheap collapse monitor for training (cookbook §2.6.2 and §3.7.2).

Two signals, computed on what the loss sees (the method's ``embedding`` output, e.g. the projector's output; the
backbone ``features`` when a method returns no embedding):

- **std of the L2-normalized embeddings per dimension**, averaged over dimensions and scaled by ``sqrt(d)``
  (SimSiam, Chen & He 2021, §4.1: a collapsed output has std 0; a healthy one ~ 1/sqrt(d), so ~1 after scaling).
  One (B, d) reduction per step.
- **RankMe** (cookbook eq. 17) of a running buffer of the last embeddings, once per epoch: ~1 when every sample maps
  to one direction.

The alarm is for *complete* collapse (every sample mapped to one point or one direction), which no method recovers
from: the window's mean scaled std under ``STD_FLOOR`` or the buffer's RankMe under ``RANK_FLOOR``. Healthy runs
sit far above both (measured on tiny runs: scaled std 0.28-0.74 and RankMe 3.6-17.6 for SimCLR, BYOL, VICReg with and
without its variance term, including a weight decay of 20 that hurts but does not collapse); dimensional collapse
(a low but not minimal rank) is logged (``rankme``) for the reader, not alarmed on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfsup.evaluate.spectrum import rankme

STD_FLOOR = 0.05   # scaled std: 1 ~ isotropic, 0 = one point; healthy tiny runs measured >= 0.17 at their worst step
RANK_FLOOR = 1.5   # RankMe: 1 = one direction


class CollapseError(RuntimeError):
    """The monitor saw a complete collapse and ``train.collapse=stop`` ends the run (a checkpoint is written)."""


class CollapseMonitor:
    """Feed :meth:`update` the detached embeddings of every applied step; read :meth:`window_std` at each metrics
    record and :meth:`check` at each epoch end."""

    def __init__(self, buffer_rows: int = 2048):
        self.buffer_rows = buffer_rows
        self.buffer: list[torch.Tensor] = []
        self.rows = 0
        self.window: list[float] = []

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().float().flatten(1)
        if z.shape[0] < 2:
            return
        zn = F.normalize(z, dim=1)
        self.window.append(float(zn.std(0).mean()) * math.sqrt(z.shape[1]))
        self.buffer.append(z.cpu())
        self.rows += z.shape[0]
        while self.buffer and self.rows - self.buffer[0].shape[0] >= self.buffer_rows:
            self.rows -= self.buffer.pop(0).shape[0]

    def window_std(self) -> float | None:
        """The mean scaled std since the last call (None when no step was fed)."""
        value = sum(self.window) / len(self.window) if self.window else None
        self.window = []
        return value

    def rankme(self) -> float | None:
        if not self.buffer:
            return None
        return float(rankme(torch.cat(self.buffer))["rankme"])

    @staticmethod
    def evidence(std: float | None, rank: float | None) -> str | None:
        """A sentence stating the collapse, or None when neither signal is under its floor."""
        signs = []
        if std is not None and std < STD_FLOOR:
            signs.append(f"the std of the L2-normalized embeddings per dimension is {std:.4f} x 1/sqrt(d) "
                         f"(healthy runs: ~0.2-1; under {STD_FLOOR}: every sample maps to about the same point)")
        if rank is not None and rank < RANK_FLOOR:
            signs.append(f"RankMe of the last embeddings is {rank:.2f} (under {RANK_FLOOR}: one direction)")
        return "; ".join(signs) or None
