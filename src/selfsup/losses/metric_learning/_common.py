"""What the metric-learning losses share: argument checks and the batch-wide collectives (cookbook Algorithm 1).

Two exact patterns under DDP (W processes, each holding n = N/W samples):

- *local queries*: a process scores its own n anchors against the N gathered keys (gathered with gradient), and
  returns its share of the batch mean. When every anchor counts, that share is the plain mean over its anchors; when
  some anchors or pairs are skipped (a class with one sample has no positive), the count differs per process, so the
  share is ``W * local_sum / global_count`` (`share_of_mean`), with the global count read off the gathered labels.
  The mean over processes is then the one-process loss, and the gradients match too: `gather_with_grad` sums the
  key gradients over processes and DDP divides by W.
- *full batch*: every process computes the loss of the whole gathered batch; the gather's backward sums W identical
  contributions and DDP divides by W. Used where the normalization is global (NCA's eq. (2) form).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from selfsup.distributed import gather_with_grad, get_rank, get_world_size


def check_positive(value: float, name: str, fn: str) -> None:
    if not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")


def check_embeddings(z: torch.Tensor, fn: str, name: str = "z") -> None:
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty (batch, dim) tensor, got shape {tuple(z.shape)}")


def check_pair(a: torch.Tensor, b: torch.Tensor, fn: str, names: tuple[str, str] = ("z1", "z2")) -> None:
    check_embeddings(a, fn, names[0])
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same (batch, dim) shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_labels(labels: torch.Tensor | None, n: int, fn: str) -> None:
    if labels is None:
        raise ValueError(f"{fn} needs class labels (one per sample), got labels=None")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{fn}: labels must have shape ({n},), one per sample, got {tuple(labels.shape)}")


def upcast(z: torch.Tensor) -> torch.Tensor:
    """Half precision in, float32 math: exponentials of logits / temperature overflow float16."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def gather(z: torch.Tensor) -> torch.Tensor:
    """All processes' rows, in rank order, with gradient (identity on one process)."""
    return gather_with_grad(z)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All processes' labels / indices, in rank order (no gradient; every process must hold the same count)."""
    if get_world_size() == 1:
        return x
    x = x.detach()
    if x.dtype == torch.bool:
        x = x.long()
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def local_offset(n: int) -> int:
    """Index of this process's first row in the gathered batch."""
    return get_rank() * n


def share_of_mean(local_sum: torch.Tensor, global_count: int | torch.Tensor) -> torch.Tensor:
    """This process's share of a mean over terms spread unevenly over processes: the mean over processes of
    `W * local_sum / global_count` is the sum of all terms over their global count. No terms at all: 0 (with graph).
    A tensor count stays on its device (no host sync)."""
    count = torch.as_tensor(global_count, device=local_sum.device).to(local_sum.dtype).clamp(min=1)
    return local_sum * get_world_size() / count
