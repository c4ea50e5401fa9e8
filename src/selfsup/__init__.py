"""selfsup: the Cookbook of Self-Supervised Learning (Balestriero et al., 2023) as software.

    import selfsup
    model = selfsup.load_backbone("runs/simclr-.../")     # an exported backbone, ready for your own code
    features = model(images)                              # uint8 (B, C, H, W) or float in [0, 1] -> (B, D)
"""

__version__ = "0.1.0"


def load_backbone(path, device="cpu", *, raw=False):
    """Load an exported backbone (a run directory, its backbone.safetensors or backbone.json) as an nn.Module.

    It takes images as you have them, uint8 (B, C, H, W) or float in [0, 1], and applies the normalization of its
    training run itself; ``raw=True`` gives the bare network, which expects normalized input.
    See :func:`selfsup.nn.backbones.load_backbone`.
    """
    from selfsup.nn.backbones import load_backbone as _load

    return _load(path, device, raw=raw)


def export_backbone(model, directory, extra=None):
    """Write ``directory/backbone.safetensors`` + ``backbone.json`` (see :func:`selfsup.nn.backbones.export_backbone`).

    Pass ``extra={"mean": [...], "std": [...]}`` (per channel, images in [0, 1]) so that ``load_backbone`` can
    normalize images itself; a model returned by ``load_backbone`` keeps its own.
    """
    from selfsup.nn.backbones import export_backbone as _export

    return _export(model, directory, extra)


__all__ = ["export_backbone", "load_backbone", "__version__"]
