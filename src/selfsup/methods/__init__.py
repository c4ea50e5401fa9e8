"""Methods, one small file each, registered by name. Importing this package registers all of them."""

from selfsup.methods import byol, dino, mae, simclr  # noqa: F401  (registration side effect)
from selfsup.methods.base import REGISTRY, Method, MethodEntry, forward_views
from selfsup.names import did_you_mean


def get_method(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}.{did_you_mean(name, REGISTRY)} Available: "
                       f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "MethodEntry", "forward_views", "get_method"]
