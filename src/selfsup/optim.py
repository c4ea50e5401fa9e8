"""Optimizers, parameter groups and learning-rate schedules (cookbook §3.5.2, §3.5.3, §3.8.1).

LR scaling is explicit: `scaled_lr(base_lr, effective_batch, rule)` with rule `linear` (Goyal et al. 2017:
base_lr * batch / 256), `sqrt` (SimCLR appendix B.1: base_lr * sqrt(batch), the cookbook's small-batch advice) or
`none`. The trainer prints the result; nothing is rescaled silently.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(base_lr: float, effective_batch: int, rule: str) -> float:
    if rule == "linear":
        return base_lr * effective_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(effective_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr rule {rule!r}; use 'linear', 'sqrt' or 'none'")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay: 1-D ones (biases, norm scales) and every name a submodule
    lists in ``no_weight_decay()`` (ViT position embedding, [cls] and [mask] tokens; timm's convention).

    The one policy of the package: pre-training (``param_groups``) and fine-tuning (``evaluate.finetune``) share it.
    Excluding 1-D parameters follows SimCLR and BYOL (You et al. 2017 §B; Grill et al. 2020 appendix C).
    """
    names = {n for n, p in model.named_parameters() if p.ndim <= 1}
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def param_groups(model: nn.Module, weight_decay: float, no_decay_lr_scale: float = 1.0) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and the ``no_decay_names`` parameters (neither).

    LARS reads the `lars` flag of each group; `set_lr` gives each group ``lr * lr_scale``: 1 for the weights,
    ``no_decay_lr_scale`` for the rest (Barlow Twins' main.py: 0.0048 for biases and norms against 0.2 for the
    weights, i.e. 0.024; cookbook §3.5.2).
    """
    if not no_decay_lr_scale >= 0:
        raise ValueError(f"no_decay_lr_scale must be >= 0 (1 = the weights' lr), got {no_decay_lr_scale}")
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars": True, "lr_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars": False, "lr_scale": no_decay_lr_scale})
    return groups


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), groups: list[dict] | None = None
                    ) -> torch.optim.Optimizer:
    """``name`` (sgd | adamw | lars) over ``groups`` (default: ``param_groups(model, weight_decay)``)."""
    groups = param_groups(model, weight_decay) if groups is None else groups
    for g in groups:  # the starting lr; the trainer's `set_lr` sets it again before every step
        if "lr_scale" in g and "lr" not in g:
            g["lr"] = lr * g["lr_scale"]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    for g in groups:
        g.pop("lars", None)
    fused = can_fuse([p for g in groups for p in g["params"]])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd', 'adamw' or 'lars'")


def can_fuse(params: list[torch.Tensor]) -> bool | None:
    """True when PyTorch's fused SGD/AdamW kernel can update ``params``: plain floating-point tensors on a CPU or a
    CUDA device (not FSDP's DTensors); None (PyTorch's default choice) otherwise.

    On a CPU PyTorch's default is the per-tensor loop, one Python call per tensor and operation: for MSN's `60min` ViT
    (89 tensors, 1.6M values) an AdamW step took 9.89 ms there against 2.27 ms fused (``python
    benchmarks/bench_optimizer.py``, 1 thread, Intel Xeon, 2026-12-08), a tenth of that method's 67-102 ms step. The update
    is the same formula; its floats may differ from the loop's in the last bits (tests/test_optim.py bounds it).
    """
    ok = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
                              and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR/BYOL: SGD with momentum whose per-layer step is scaled by the trust
    ratio eta * ||w|| / ||g + wd * w||. Groups with `lars=False` (biases, norms) take plain SGD-momentum steps.
    eta = 0.001 and momentum 0.9 follow SimCLR's released code.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    d_p = d_p.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d_p)
                p.add_(buf, alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up from ~0 to `peak` over `warmup_steps`, then cosine decay to `final` (cookbook §3.5.2)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float | None = None) -> None:
    """Every group's lr to ``lr`` times its ``lr_scale`` (1 when it has none); groups marked ``"constant_lr": True``
    take ``peak_lr`` times their ``lr_scale`` instead, whatever the schedule (SimSiam's predictor, Chen and He 2021
    §4.2 and the reference's ``--fix-pred-lr``: warm-up and decay skip it)."""
    for g in optimizer.param_groups:
        if g.get("constant_lr", False):
            if peak_lr is None:
                raise ValueError("a param group has constant_lr=True: pass peak_lr (the schedule's peak) to set_lr")
            g["lr"] = peak_lr * g.get("lr_scale", 1.0)
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of every group that has one; groups without (biases, norms, tokens) keep 0."""
    for g in optimizer.param_groups:
        if g.get("weight_decay", 0.0) > 0:
            g["weight_decay"] = weight_decay
