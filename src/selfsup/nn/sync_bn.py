"""Batch norm whose statistics cover every process's samples, on any backend (gloo on CPUs too).

PyTorch's ``nn.SyncBatchNorm`` runs only on CUDA tensors, so a CPU run on several processes used to normalize each
process's half batch with its own mean and variance: a different computation from one process on the whole batch,
and a different model (cookbook §3.8.1: the statistics of a batch-statistic layer must be those of the whole batch;
SimCLR and BYOL train with synchronized BN). ``GlobalBatchNorm`` computes them over all processes:

    μ = Σ_p Σ_i x_pi / n,    σ² = Σ_p Σ_i (x_pi − μ)² / n,    y = γ (x − μ) / sqrt(σ² + ε) + β,

with n the number of values per channel over all processes, in two all-reduces (sums and counts, then squared
deviations: the two-pass variance, as exact as one process's). The all-reduce is differentiable (its backward sums
the gradients of every process, as ``selfsup.distributed.gather_with_grad`` does), so autograd gives each process the
gradient of every process's loss through the shared statistics, and DDP's averaging then equals one process on the
whole batch. Running statistics follow ``nn.BatchNorm`` (momentum on the mean and the unbiased variance of all n).

On one process, in eval mode, or without a process group it is ``nn.BatchNorm``'s own computation. On CUDA,
``torch.nn.SyncBatchNorm`` (faster kernels) is used instead: see :func:`convert_global_batchnorm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward sums the incoming gradients over processes too (each process's loss depends
    on the global sum, so each input receives the gradient of every process's loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm1d/2d/3d`` with the batch statistics of all processes (any input of 2+ dimensions, channels in
    dim 1). Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``: checkpoints move between the two."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got a {x.dim()}-d tensor")

    synchronize = True  # False: this process's statistics only (desynchronize_batchnorm), a plain batch norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.synchronize or _world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        # statistics in float32 at least (bf16/fp16 activations under autocast lose the sums), the count in float64
        # (exact far beyond float32's 2^24 values per channel); the output in the input's dtype, as nn.BatchNorm's
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_n = x.numel() // x.shape[1]
        # 1st all-reduce: per-channel sums and the count (the count rides along, so uneven batches are exact)
        sums = _AllReduceSum.apply(torch.cat([xs.sum(dims).double(), xs.new_full((1,), float(local_n),
                                                                                 dtype=torch.float64)]))
        n = sums[-1].detach()
        if int(n) < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel over all processes, got {int(n)}")
        mean = (sums[:-1] / n).to(xs.dtype)
        # 2nd all-reduce: squared deviations from the global mean (the two-pass variance)
        var = _AllReduceSum.apply(((xs - mean.view(shape)) ** 2).sum(dims)) / n.to(xs.dtype)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.to(xs.dtype))
        y = (xs - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1))
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def _global_batchnorm_of(module: nn.modules.batchnorm._BatchNorm, synchronize: bool) -> GlobalBatchNorm:
    """A :class:`GlobalBatchNorm` holding ``module``'s very Parameters and running statistics (optimizers still hold
    them), in its training mode."""
    new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    new.synchronize, new.training = synchronize, module.training
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    if module.track_running_stats:
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
    return new


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` under ``module`` by a :class:`GlobalBatchNorm` holding the same
    parameters and running statistics (returns the new module when ``module`` itself is one). For CPU runs on
    several processes; CUDA runs use ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm,
                                                                                        nn.SyncBatchNorm)):
        return _global_batchnorm_of(module, synchronize=True)
    for name, child in module.named_children():
        new = convert_global_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def desynchronize_batchnorm(module: nn.Module) -> nn.Module:
    """Make every synchronized batch norm under ``module`` use this process's statistics only, keeping its parameters
    and running statistics (in place; returns the new module when ``module`` itself is one): for what one process
    does alone after a multi-process run (rank 0's evaluation, whose fine-tune runs batch norm in train mode while
    the other processes have finished)."""
    if isinstance(module, GlobalBatchNorm):
        module.synchronize = False
        return module
    if isinstance(module, nn.SyncBatchNorm):
        return _global_batchnorm_of(module, synchronize=False)
    for name, child in module.named_children():
        new = desynchronize_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def synchronize_batchnorm(method: nn.Module, device_type: str) -> nn.Module:
    """Batch norm over every process's samples for a run on several processes: ``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` elsewhere (gloo). Sub-modules named in ``method.local_batchnorm`` keep their own
    (MoCo v2's shuffled-BN key encoder). Returns ``method`` with its batch norms replaced in place."""
    keep = set(getattr(method, "local_batchnorm", ()))
    unknown = keep - {name for name, _ in method.named_children()}
    if unknown:
        raise ValueError(f"{type(method).__name__}.local_batchnorm names {sorted(unknown)}, which are not sub-modules")
    convert = nn.SyncBatchNorm.convert_sync_batchnorm if device_type == "cuda" else convert_global_batchnorm
    for name, child in list(method.named_children()):
        if name not in keep:
            new = convert(child)
            if new is not child:
                setattr(method, name, new)
    return method
