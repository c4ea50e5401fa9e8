"""selfsup: the Cookbook of Self-Supervised Learning (Balestriero et al., 2023) as software.

    import selfsup
    model = selfsup.load_backbone("runs/simclr-.../")     # an exported backbone, ready for your own code
"""

__version__ = "0.1.0"


def load_backbone(path):
    """Load an exported backbone (a run directory, its backbone.safetensors or backbone.json) as an nn.Module."""
    from selfsup.nn.backbones import load_backbone as _load

    return _load(path)


__all__ = ["load_backbone", "__version__"]
