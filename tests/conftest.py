import gzip
import os
import struct

import numpy as np
import pytest
import torch

# 2 intra-op threads on these 2-core machines; 1 per worker when pytest-xdist runs two workers (`make test` does):
# two workers of 2 threads each would oversubscribe the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The tests' caches (pixel baselines, decoded folders) in a temporary folder, not the user's ~/.cache."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def write_idx(folder, prefix, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def synthetic_classes(n: int, seed: int, size: int = 16, classes: int = 4):
    """Images whose class is a bright bar's orientation/position, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, size, size))
    for i, c in enumerate(y):
        if c % 2 == 0:
            x[i, :, (c // 2) * 4 + 2:(c // 2) * 4 + 6] += 180
        else:
            x[i, (c // 2) * 4 + 2:(c // 2) * 4 + 6, :] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def one_thread():
    """For tests sized (and timed) for 1 thread: small tensors gain nothing from intra-op threads, whose wake-ups
    cost seconds on a loaded 2-core machine. This conftest otherwise asks for 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_fmnist(tmp_path):
    """A Fashion-MNIST-format folder (official idx.gz files) with 256 train and 128 test synthetic images."""
    root = tmp_path / "fmnist"
    xtr, ytr = synthetic_classes(256, 0)
    xte, yte = synthetic_classes(128, 1)
    write_idx(root, "train", xtr, ytr)
    write_idx(root, "t10k", xte, yte)
    return root
