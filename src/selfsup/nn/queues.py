"""Queues, memory banks and support sets: state that outlives a batch (cookbook §2.2: MoCo's queue of keys, NPID's
memory bank; NNCLR's support set; SwAV's queue of features for small batches, §3.8.1).

One rule for all of them, so that many processes and gradient accumulation change nothing:

- ``stage(...)`` during ``forward`` (once per micro-batch) only remembers detached tensors;
- ``commit()`` in the method's ``on_step_end`` (once per optimizer step) gathers what every process staged, in rank
  order, and writes it. Every process writes the same rows, so the buffers stay equal across processes without DDP's
  buffer broadcast (which the trainer turns off), and a run on W processes fills them exactly as one process does
  with the whole batch (the trainer gives rank r the r-th slice of the batch).

The contents, the write pointer and the fill count are buffers: ``state_dict()`` carries them, so resume is exact.
Staged tensors are not state: a checkpoint is written between steps, when nothing is staged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import get_world_size


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` from every process concatenated along dim 0 in rank order (no gradient). Processes may hold different
    row counts (a last uneven batch): sizes are exchanged first."""
    x = x.detach().contiguous()
    world = get_world_size()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class FeatureQueue(nn.Module):
    """A first-in-first-out queue of ``size`` vectors of ``dim`` entries (MoCo's keys, NNCLR's support set, SwAV's
    queued features).

    ``init="random"`` fills it with L2-normalized Gaussian vectors and counts it as full (MoCo v1/v2's reference
    starts from random normalized keys); ``init="empty"`` starts it at zeros and :meth:`filled` rows only (SwAV uses
    its queue once full; NNCLR looks neighbours up among the rows filled so far).
    """

    def __init__(self, size: int, dim: int, init: str = "random", seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a queue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        if init == "random":
            g = torch.Generator().manual_seed(seed)
            start = F.normalize(torch.randn(size, dim, generator=g), dim=1)
        else:
            start = torch.zeros(size, dim)
        self.register_buffer("features", start)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.tensor(size if init == "random" else 0, dtype=torch.long))
        self._staged: list[torch.Tensor] = []

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @property
    def full(self) -> bool:
        return int(self.count) >= self.size

    def filled(self) -> torch.Tensor:
        """The rows written so far (all of them once full), oldest position first."""
        return self.features if self.full else self.features[: int(self.count)]

    def stage(self, x: torch.Tensor) -> None:
        """Remember ``x`` (rows to enqueue at :meth:`commit`), detached."""
        if x.ndim != 2 or x.shape[1] != self.features.shape[1]:
            raise ValueError(f"this queue holds (n, {self.features.shape[1]}) rows, got {tuple(x.shape)}")
        self._staged.append(x.detach())

    @torch.no_grad()
    def commit(self) -> int:
        """Enqueue what every process staged since the last commit (rank order), overwriting the oldest rows;
        returns the number of rows written (0 when nothing was staged)."""
        if not self._staged:
            return 0
        rows = gather_rows(torch.cat(self._staged)).to(self.features.dtype)
        self._staged = []
        if rows.shape[0] > self.size:  # more rows than the queue holds: the newest ones stay
            rows = rows[-self.size:]
        n, p = rows.shape[0], int(self.ptr)
        idx = (torch.arange(n, device=rows.device) + p) % self.size
        self.features[idx] = rows
        self.ptr.fill_((p + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))
        return n

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.features.shape[1]}"


class MemoryBank(nn.Module):
    """One L2-normalized vector per training sample (NPID, Wu et al. 2018; cookbook §2.2 eq. (5)), updated as
    v_i <- normalize(m v_i + (1 - m) f_i) with momentum ``m`` (NPID: 0.5) for the samples of each step.

    Starts from L2-normalized Gaussian vectors (NPID's reference draws uniform ones and normalizes them: both are
    unrelated to the data; a Gaussian is uniform on the sphere).

    ``first_visit`` says what a row's first update does. ``"mix"`` (NPID's reference code, lemniscate.pytorch) mixes
    the random start in like any older value, so after k visits the noise still weighs about m^k in every row (with
    m = 0.5, 12.5% after 3 epochs: a large share of a short run). ``"write"`` stores the sample's
    embedding on its first visit and mixes only later ones (a ``written`` buffer, saved with the bank, records which
    rows hold data), so the random start never outlives the first epoch. Over NPID's 200 epochs the two coincide.
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5, seed: int = 0, first_visit: str = "mix"):
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ValueError(f"a memory bank needs num_samples >= 1 and dim >= 1, got {num_samples}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if first_visit not in ("mix", "write"):
            raise ValueError(f"first_visit must be 'mix' (NPID's reference) or 'write' (a row's first update stores "
                             f"the embedding), got {first_visit!r}")
        self.momentum, self.first_visit = momentum, first_visit
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim, generator=g), dim=1))
        if first_visit == "write":  # only then: checkpoints of "mix" banks keep their keys
            self.register_buffer("written", torch.zeros(num_samples, dtype=torch.bool))
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def stage(self, index: torch.Tensor, x: torch.Tensor) -> None:
        if index is None:
            raise ValueError("a memory bank needs each sample's row in the training set (Views.index); the "
                             "trainer provides it")
        if index.shape != (x.shape[0],) or x.ndim != 2 or x.shape[1] != self.bank.shape[1]:
            raise ValueError(f"stage(index (n,), x (n, {self.bank.shape[1]})) got {tuple(index.shape)} and "
                             f"{tuple(x.shape)}")
        if int(index.max()) >= self.bank.shape[0] or int(index.min()) < 0:
            raise ValueError(f"sample index out of range for a bank of {self.bank.shape[0]} rows: the bank was "
                             "built for another data set size")
        self._staged.append((index.detach(), x.detach()))

    @torch.no_grad()
    def commit(self) -> int:
        """Update the rows of every sample staged on any process since the last commit; returns how many."""
        if not self._staged:
            return 0
        index = gather_rows(torch.cat([i for i, _ in self._staged]).to(self.bank.device))
        x = gather_rows(torch.cat([v for _, v in self._staged]).to(self.bank.dtype))
        self._staged = []
        new = F.normalize(x, dim=1)
        keep = self.momentum
        if self.first_visit == "write":  # 0 on a row's first visit: the embedding is stored
            keep = self.momentum * self.written[index].unsqueeze(1).to(new.dtype)
            self.written[index] = True
        self.bank[index] = F.normalize(keep * self.bank[index] + (1.0 - keep) * new, dim=1)
        return index.shape[0]
