"""``train.compile=true``: ``torch.compile`` for every method (cookbook §3.8.2: the step's speed is a feature).

What is compiled is each network a method owns — its backbone, projector, predictor, heads, decoder and their EMA
teachers: the top-level sub-modules that hold parameters — in place (``nn.Module.compile``), so checkpoints, exports
and ``state_dict`` keys are unchanged and a run can resume with or without it. The method's ``forward`` around them
stays eager: it is the part that differs between methods (gathers across processes, queues, Sinkhorn iterations,
masks, Python control flow on the step), and compiling it would trade graph breaks for little, since the networks
hold nearly all of the step's floating-point work. The view maker is left alone (it has no parameters and draws
from the step's generator).

The first steps are slower (compilation: tens of seconds per network on a CPU); the gain is measured with
``selfsup bench METHOD train.compile=true`` against the same command without it, on the machine that will train.
"""

from __future__ import annotations

from torch import nn


def networks(method: nn.Module) -> dict[str, nn.Module]:
    """The method's top-level sub-modules that hold parameters, by attribute name."""
    return {name: child for name, child in method.named_children()
            if next(child.parameters(), None) is not None}


def compile_networks(method: nn.Module, **options) -> list[str]:
    """Compile each of :func:`networks` in place with ``torch.compile(**options)``; returns their names."""
    compiled = networks(method)
    for module in compiled.values():
        module.compile(**options)
    return list(compiled)
