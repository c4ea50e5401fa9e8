"""Process-group set-up and the collectives that batch-statistic losses need (cookbook §3.8.1).

`torchrun` and SLURM both describe the job through environment variables; `init_distributed` reads them, so the same
command line runs on one process, several processes on one machine, or a cluster. Losses that use the whole batch
(NT-Xent negatives, covariance terms) call `gather_with_grad`, the cookbook's Algorithm 1: it all-gathers embeddings and,
on the way back, *sums* the gradients of every process, because DDP later divides by the number of processes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-06,09],cpu1"`` -> ``"gpu03"``, ``"rack[1-2]-n[08-09]"`` ->
    ``"rack1-n08"`` (zero padding kept; only the first item and the first value of each bracket are needed)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first item: up to the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end].strip()
    if not item:
        raise ValueError(f"an empty SLURM node list: {nodelist!r}")
    return re.sub(r"\[([^\]]*)\]", lambda m: m[1].split(",")[0].split("-")[0], item)


def slurm_rendezvous(env) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for a job launched with ``srun`` (which sets SLURM_* but not these): the first
    host of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST`` on old versions) and a port derived from ``SLURM_JOB_ID``
    (15000-34999), so that two jobs sharing a node do not collide. Empty outside SLURM or when ``torchrun`` (or the
    user) set them."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or "WORLD_SIZE" in env or "RANK" in env:  # not srun-launched: torchrun / the user decide
        return {}
    out = {}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID", "0")
        out["MASTER_PORT"] = str(15000 + int(job) % 20000 if job.isdigit() else 29500)
    return out


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, ...).

    A single process (no such variables, or WORLD_SIZE=1) gets a `DistInfo` with world_size 1 and no process group.
    The backend is NCCL for CUDA and gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK") or 0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    for key, value in slurm_rendezvous(os.environ).items():  # srun sets no MASTER_ADDR/PORT: derive them
        os.environ.setdefault(key, value)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "WORLD_SIZE > 1 but MASTER_ADDR is not set. Launch with `torchrun --nproc_per_node=N -m selfsup train ...` "
            "or, under SLURM, export MASTER_ADDR and MASTER_PORT in the job script."
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank)


def shutdown() -> None:
    """Destroy this process's process group, if any; for the end of a ``selfsup train`` command (not of
    :func:`selfsup.train.train`, whose Python callers may go on using the group they launched with).

    Left alive until the interpreter exited, gloo's group was torn down in an arbitrary order against the objects
    that use it: a rank sometimes aborted after a complete run ("terminate called without an active exception",
    exit code -6), and torchrun reported the job failed (seen with ``eval=false``; tests/test_resume_processes.py
    checks every launch's output). Destroying it is local to the process: rank 0 may still be evaluating."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # DDP sits in reference cycles: its reducer must go before the group
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GatherLayer(torch.autograd.Function):
    """All-gather that lets gradients flow back to every process (cookbook Algorithm 1).

    Backward all-reduces (sums) the incoming gradients and returns this process's slice: each embedding receives the
    gradient of every process's loss, which DDP's averaging then turns into the gradient of the mean loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every process) from all processes along dim 0, keeping the autograd graph."""
    if get_world_size() == 1:
        return x
    return torch.cat(GatherLayer.apply(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (no gradient); identity on one process."""
    if get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / get_world_size()


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place (no gradient); identity on one process."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()
