"""The dataset type shared by every reader: :class:`ImageDataset` (uint8 ``N x C x H x W``) and :class:`DataError`.

Kept apart from :mod:`selfsup.data.datasets` so that the format readers (:mod:`selfsup.data.formats`), the
download helpers (:mod:`selfsup.data.download`) and the folder reader can import them without import cycles;
import them from :mod:`selfsup.data.datasets` (or :mod:`selfsup.data`) in user code (DESIGN.md §2).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class DataInfo:
    """What a method is built from: a description of the data, not the data (method contract v2).

    ``modality``: "image" today ("tabular", "audio", "text", "paired" as they come); ``shape``: one sample, (C, H, W)
    for images; ``mean``/``std``: the per-channel normalization of inputs scaled to [0, 1]; ``num_classes``: None
    without labels; ``name``: the dataset's name (for messages and records); ``num_samples``: the training set's size
    (a memory bank with one row per sample, NPID, needs it; None when unknown).
    """

    modality: str
    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    name: str = ""
    num_samples: int | None = None

    def __post_init__(self) -> None:
        if self.modality == "image":
            if len(self.shape) != 3:
                raise ValueError(f"an image DataInfo needs shape (C, H, W); got {self.shape}")
            if not len(self.mean) == len(self.std) == self.shape[0]:
                raise ValueError(f"mean {self.mean} and std {self.std} need one value per channel "
                                 f"({self.shape[0]})")

    @property
    def channels(self) -> int:
        return int(self.shape[0])


class DataError(RuntimeError):
    """The data is missing, corrupt or unusable; the message names the path and says how to fix it."""


@dataclass
class ImageDataset:
    """Images as ``uint8 (N, C, H, W)`` with ``C`` in {1, 3}, plus optional integer labels.

    ``images`` may be a ``torch.from_numpy`` view on a ``np.memmap`` (never written to), so index it in batches
    (``images[idx]`` copies just those rows) rather than converting the whole tensor.

    ``skipped``: full paths of the files a reader left out (image folders: unreadable, corrupt, broken links...);
    ``skip_reasons``: why, one line each, in the same order (filled with "reason not recorded" when a caller
    passes only ``skipped``). ``fingerprint``: a short digest of the files the images come from (image folders:
    paths, sizes and mtimes of the kept files), for a resumed run to check that it trains on the same images;
    None for the official datasets and arrays, whose content is fixed or unknown.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    name: str
    skipped: list[str] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not self.skip_reasons:
            self.skip_reasons = ["reason not recorded"] * len(self.skipped)
        if len(self.skip_reasons) != len(self.skipped):
            raise ValueError(f"ImageDataset.skip_reasons needs one reason per skipped file: got "
                             f"{len(self.skip_reasons)} reasons for {len(self.skipped)} files")
        x = self.images
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            raise ValueError(f"ImageDataset.images must be a uint8 tensor (N, C, H, W) with C in {{1, 3}}; got "
                             f"{got}. Build datasets from arrays with selfsup.data.datasets.from_arrays().")
        y = self.labels
        if y is not None and (y.dtype != torch.int64 or y.shape != (len(x),)):
            raise ValueError(f"ImageDataset.labels must be int64 of shape ({len(x)},); got {y.dtype} "
                             f"{tuple(y.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        """``len(classes)`` when the names are known, else ``max(label) + 1``, else ``None``."""
        if self.classes is not None:
            return len(self.classes)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def _numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without copying; read-only arrays are fine because datasets are never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        try:
            return torch.from_numpy(a)
        except TypeError as e:
            raise ValueError(f"cannot use a numpy array of dtype {a.dtype} as images or labels: {e}") from e
