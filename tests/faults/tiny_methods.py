"""Tiny recipes for every registered method: the ``key=value`` overrides that make each one train in a second or two
on 256 tiny 28x28 Fashion-MNIST-format images (32x32 RGB for colorization), and the data writers they use.

Used by ``benchmarks/faults.py`` (kill -9 at random moments, then resume) and its CI subset ``test_kill.py``. The
per-method settings come from the methods' own tests (``tests/test_methods_*.py``, ``tests/test_dino.py``, ...).
A method registered without an entry in :data:`TINY` fails ``test_kill.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:  # conftest's writers, also when imported from benchmarks/
    sys.path.insert(0, str(_TESTS))
from conftest import synthetic_classes, write_idx  # noqa: E402

# no evaluation after training (linear/MLP probes, rotation, LiDAR, report, guillotine, label-free), no kNN monitor
BASE = ["batch_size=32", "epochs=1", "data.download=false", "train.knn_every=0", "eval.linear=false",
        "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0", "eval.report=false",
        "eval.init_baseline=false", "eval.guillotine=false", "eval.label_free=false"]

_ADAMW = ["optim.name=adamw", "optim.base_lr=1e-3", "optim.lr_rule=none", "optim.warmup_epochs=1"]
_RESNET = ["model.backbone=resnet10", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
           "views.size=16", "views.local_size=8", *_ADAMW]
_RESNET8 = ["model.backbone=resnet10", "model.width=8", "model.stem=small", "views.size=16", *_ADAMW]  # pretext tasks
_VIT = ["model.backbone=vit_tiny", "model.patch_size=4", "views.size=16", "views.local_size=8", *_ADAMW]

TINY: dict[str, list[str]] = {
    # contrastive / deep metric learning
    "simclr": [*_RESNET],
    "moco_v2": [*_RESNET, "moco_v2.queue_size=96", "moco_v2.shuffle_bn_groups=4"],
    "moco_v3": [*_RESNET, "moco_v3.predictor_hidden=32"],
    "nnclr": [*_RESNET, "nnclr.queue_size=96", "nnclr.predictor_hidden=32"],
    "dcl": [*_RESNET, "dcl.weighting=vmf"],
    "supcon": [*_RESNET],
    "supervised": [*_RESNET],
    "npid": [*_RESNET, "npid.dim=16"],
    "meanshift": [*_RESNET, "meanshift.bank_size=96", "meanshift.k=2", "meanshift.predictor_hidden=32"],
    # self-distillation
    "byol": [*_RESNET, "byol.predictor_hidden=32"],
    "simsiam": [*_RESNET, "simsiam.predictor_hidden=8"],
    "directpred": [*_RESNET],
    "dino": [*_RESNET, "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
             "dino.freeze_last_layer_epochs=1", "views.n_local=2", "optim.clip_grad=3.0"],
    "ibot": [*_VIT, "views.n_local=1", "ibot.out_dim=32", "ibot.hidden_dim=16", "ibot.bottleneck_dim=8",
             "ibot.freeze_last_layer_epochs=1"],
    "msn": [*_VIT, "msn.num_prototypes=16", "msn.hidden_dim=32", "msn.out_dim=16", "msn.mask_ratio=0.5"],
    # canonical correlation; SwAV's prototypes unfreeze and its queue fills from epoch 1 (of 2)
    "vicreg": [*_RESNET],
    "barlow_twins": [*_RESNET, "optim.no_decay_lr_scale=0.024"],
    "wmse": [*_RESNET, "wmse.w=32"],
    "swav": [*_RESNET, "epochs=2", "swav.prototypes=16", "swav.queue_length=64", "swav.queue_start_epoch=1",
             "swav.freeze_prototypes_epochs=1", "views.n_local=2"],
    # clustering: k-means over the banks at epoch 1's start, so 2 epochs
    "deepcluster_v2": [*_RESNET, "epochs=2", "deepcluster_v2.prototypes=[8,8,8]", "views.n_local=2"],
    # masked image modelling
    "mae": [*_VIT, "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"],
    "simmim": [*_VIT],
    "ijepa": [*_VIT, "ijepa.predictor_dim=24", "ijepa.predictor_depth=1", "ijepa.min_keep=4"],
    "data2vec": [*_VIT, "data2vec.clone_batch=2", "data2vec.decoder_layers=2"],
    # pretext tasks
    "rotnet": [*_RESNET8],
    "jigsaw": [*_RESNET8, "jigsaw.permutations=10", "jigsaw.tile_dim=8", "jigsaw.hidden=16"],
    "inpainting": [*_RESNET8, "inpainting.decoder_channels=16"],
    "colorization": [*_RESNET8, "data=folder", "data.image_size=16", "colorization.decoder_channels=16",
                     "colorization.output_stride=2"],
}

# the data each method needs: "fmnist" (28x28 grey idx files) unless listed here
DATA: dict[str, str] = {"colorization": "rgb"}


def write_tiny_fmnist(root: str | Path, n_train: int = 256, n_test: int = 64) -> Path:
    """A Fashion-MNIST-format folder (official idx.gz files) of 28x28 synthetic images: a bright bar whose position
    and orientation is the class (4 classes), plus noise."""
    root = Path(root)
    x, y = synthetic_classes(n_train, seed=0, size=28)
    write_idx(root, "train", x, y)
    tx, ty = synthetic_classes(n_test, seed=1, size=28)
    write_idx(root, "t10k", tx, ty)
    return root


def write_tiny_rgb(root: str | Path, n_train: int = 256, n_test: int = 64, size: int = 32) -> Path:
    """An image folder (``train/`` and ``test/``, one sub-folder of PNGs per class) of 32x32 RGB images: a red,
    green or blue square (the class) on a grey background, as in ``tests/test_colorization.py``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    for split, n in [("train", n_train), ("test", n_test)]:
        for i in range(n):
            c = i % 3
            img = np.full((size, size, 3), 120, dtype=np.uint8)
            img += rng.integers(0, 20, img.shape, dtype=np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            img[top:top + size // 2, left:left + size // 2] = 40
            img[top:top + size // 2, left:left + size // 2, c] = 230
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def write_tiny_data(root: str | Path) -> dict[str, Path]:
    """Both data sets under ``root``: ``{"fmnist": ..., "rgb": ...}``, keyed like :data:`DATA`."""
    root = Path(root)
    return {"fmnist": write_tiny_fmnist(root / "fmnist"), "rgb": write_tiny_rgb(root / "rgb")}


def tiny_overrides(method: str, data: dict[str, Path]) -> list[str]:
    """The full override list for ``method``: :data:`BASE`, its :data:`TINY` recipe, and the root of its data."""
    return [*BASE, *TINY[method], f"data.root={data[DATA.get(method, 'fmnist')]}"]
