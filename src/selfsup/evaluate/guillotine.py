"""Guillotine probing (cookbook §3.2, Fig. 10; Bordes et al., 2022a): the representation at every cut of the head.

SSL trains ``backbone -> projector`` and throws the projector away: probing the backbone output is "guillotine
regularization". Which cut is best is an empirical question (Chen et al. 2020c found an intermediate projector
layer sometimes wins), so we measure each: the backbone output, the output of every hidden block of the projector
(after its activation), and the projector output. Comparing the singular-value spectra before and after the
projector shows where dimensional collapse happens (cookbook §2.6.2, Fig. 9).

The projector is run on the *cached* backbone features, in eval mode (BatchNorm with its running statistics), so the
cuts cost one small MLP pass, not another pass of the backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU)


def _describe(layers: list[nn.Module]) -> str:
    return "->".join(type(m).__name__.replace("BatchNorm1d", "BN") for m in layers)


def projector_cuts(projector: nn.Module) -> list[tuple[str, int]]:
    """``(name, end)`` for every cut of an ``nn.Sequential`` projector: after each activation, and the output.

    ``end`` is the number of leading modules to apply. Names read ``projector.1 (Linear->BN->ReLU)`` for hidden
    block 1 and ``projector.out (Linear)`` for the output, so a table shows what each cut has gone through.
    """
    if not isinstance(projector, nn.Sequential) or len(projector) == 0:
        raise ValueError(
            f"guillotine probing needs the projector as a non-empty nn.Sequential of layers to cut between, got "
            f"{type(projector).__name__}; wrap a custom head in nn.Sequential(...) or probe its output only."
        )
    mods = list(projector)
    cuts, start, block = [], 0, 0
    for i, m in enumerate(mods):
        if isinstance(m, _ACTIVATIONS) and i < len(mods) - 1:
            block += 1
            cuts.append((f"projector.{block} ({_describe(mods[start:i + 1])})", i + 1))
            start = i + 1
    cuts.append((f"projector.out ({_describe(mods[start:])})", len(mods)))
    return cuts


@torch.no_grad()
def projector_features(
    backbone_feats: Tensor, projector: nn.Module, *, batch_size: int = 4096, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Features at every cut of ``projector`` (see :func:`projector_cuts`) for cached backbone features ``(N, D)``.

    Returns ``{"backbone": backbone_feats, "projector.1 (...)": ..., "projector.out (...)": ...}`` in order, float32
    on the CPU. The projector runs in eval mode; its training flag is restored afterwards.
    """
    if backbone_feats.ndim != 2:
        raise ValueError(f"backbone_feats must be (N, D), got shape {tuple(backbone_feats.shape)}.")
    cuts = projector_cuts(projector)
    first = next((m for m in projector if isinstance(m, nn.Linear)), None)
    if first is not None and first.in_features != backbone_feats.shape[1]:
        raise ValueError(
            f"the projector expects {first.in_features}-d inputs but the backbone features are "
            f"{backbone_feats.shape[1]}-d: the projector and backbone come from different models."
        )
    mods = list(projector)
    was_training = projector.training
    projector.eval()
    out: dict[str, list[Tensor]] = {name: [] for name, _ in cuts}
    try:
        for s in range(0, backbone_feats.shape[0], batch_size):
            h = backbone_feats[s:s + batch_size].to(device)
            done = 0
            for name, end in cuts:
                for m in mods[done:end]:
                    h = m(h)
                done = end
                out[name].append(h.float().cpu())
    finally:
        projector.train(was_training)
    return {"backbone": backbone_feats, **{k: torch.cat(v) for k, v in out.items()}}
