"""The one "did you mean" of the package: every unknown name (config key, method, recipe, backbone, dataset,
augmentation, evaluation option) is answered with the closest valid one, phrased the same way."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(value: str, valid: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The valid name most similar to ``value`` (difflib's ratio >= ``cutoff``), or None."""
    match = difflib.get_close_matches(value, list(valid), n=1, cutoff=cutoff)
    return match[0] if match else None


def did_you_mean(value: str, valid: Iterable[str], cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` for the closest valid name, or ``""`` when none is close."""
    match = closest(value, valid, cutoff)
    return f" Did you mean {match!r}?" if match else ""
