"""The registry that maps method names to builders; the contract itself is :mod:`selfsup.contract`.

A method is a :class:`selfsup.contract.Method`: ``forward(views, progress)``, optional hooks, ``exports()`` and
``guillotine_head``. ``forward_views`` runs a module over views batched by resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.contract import Method, Progress, Views

__all__ = ["REGISTRY", "Method", "MethodEntry", "Progress", "Views", "forward_views", "register"]


def forward_views(module: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run `module` on each view, batching consecutive views of the same shape into one call.

    One call per resolution is faster than one per view, and batch-norm then normalizes over all views of a size
    together, as SimCLR's and BYOL's reference implementations do.
    """
    views = list(views)
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
    build: Callable          # build(cfg: Config, data: DataInfo) -> Method
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
