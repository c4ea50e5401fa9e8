"""The contract between a method and the trainer, and the registry that maps names to methods.

A method is an `nn.Module` that owns everything it trains and everything it must carry through a resume (teacher,
queues, centers live in modules and buffers, so `state_dict()` holds them). The trainer only ever calls:

    views = method.view_maker(uint8_batch, generator)   # list of tensors on the device
    out = method(views)                                  # {"loss": scalar, "features": backbone features of view 0,
                                                         #  **other scalars to log}
    logs = method.on_step_end(step, total_steps)         # once per optimizer step, after it (EMA, queues, ...)

and `method.encoder` for evaluation and export. It never knows which method it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class Method(nn.Module):
    encoder: nn.Module
    view_maker: Callable

    def on_step_end(self, step: int, total_steps: int) -> dict | None:
        """Called once per optimizer step (not per micro-batch) with the number of steps done so far."""
        return None


def forward_views(module: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run `module` on each view, batching consecutive views of the same shape into one call.

    One call per resolution is faster than one per view, and batch-norm then normalizes over all views of a size
    together, as SimCLR's and BYOL's reference implementations do.
    """
    outs: list[torch.Tensor] = []
    i = 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape == views[i].shape:
            j += 1
        y = module(torch.cat(views[i:j]) if j - i > 1 else views[i])
        outs += list(y.chunk(j - i)) if j - i > 1 else [y]
        i = j
    return outs


@dataclass(frozen=True)
class MethodEntry:
    name: str
    build: Callable          # build(cfg: Config, in_chans: int, mean, std) -> Method
    params_cls: type
    family: str
    cookbook: str            # the sections and equations it implements
    summary: str


REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, params_cls: type, family: str, cookbook: str, summary: str):
    def wrap(build: Callable) -> Callable:
        REGISTRY[name] = MethodEntry(name, build, params_cls, family, cookbook, summary)
        return build
    return wrap
