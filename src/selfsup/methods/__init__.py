"""Methods, one small file each, registered by name. Importing this package registers all of them."""

import difflib

from selfsup.methods import byol, simclr  # noqa: F401  (registration side effect)
from selfsup.methods.base import REGISTRY, Method, MethodEntry, forward_views


def get_method(name: str) -> MethodEntry:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "MethodEntry", "forward_views", "get_method"]
