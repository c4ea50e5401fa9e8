"""The view size follows the training images unless someone chose it (issue "A user's first hour"): the default
recipe's 28-pixel Fashion-MNIST views are not used on a folder of 48-pixel images, an explicit views.size wins, and
the run's config.yaml records the settled size for resume and `selfsup eval`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from selfsup.config import build_config
from selfsup.data.datasets import from_arrays
from selfsup.methods import get_method
from selfsup.runs import config_from_saved, load_data, settle_sizes


def _cfg(method: str, *overrides: str):
    return build_config(method, list(overrides), params_cls=get_method(method).params_cls)


@pytest.fixture(scope="module")
def folder_48(tmp_path_factory):
    """12 RGB images of 48x48 in 2 class folders, with a test sub-folder."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the folder reader's cache, per test


def test_a_folder_with_the_default_recipe_gets_views_of_its_image_size(folder_48, capsys):
    cfg = _cfg("simclr", "data=folder", f"data.root={folder_48}")
    assert cfg.views.size == 28  # the recipe's (Fashion-MNIST) value until the images are known
    train, test = load_data(cfg)
    assert train.image_shape == (3, 48, 48) and test.image_shape == (3, 48, 48)
    settle_sizes(cfg, train)
    assert (cfg.views.size, cfg.data.image_size) == (48, 48)
    assert "views.size follows the images: 48 (set views.size=N to choose" in capsys.readouterr().out
    # what config.yaml records is what a resume and `selfsup eval` rebuild: the same size, the same images
    saved = config_from_saved(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert (saved.views.size, saved.data.image_size, saved.follow_images) == (48, 48, frozenset())
    assert load_data(saved)[0].image_shape == (3, 48, 48)
    settle_sizes(saved, train)
    assert saved.views.size == 48 and "follows" not in capsys.readouterr().out


def test_an_explicit_view_size_wins(folder_48, capsys):
    cfg = _cfg("simclr", "data=folder", f"data.root={folder_48}", "views.size=32")
    train, _ = load_data(cfg)
    settle_sizes(cfg, train)
    assert cfg.views.size == 32 and train.image_shape == (3, 32, 32)  # a folder is read at the chosen size
    assert "follows" not in capsys.readouterr().out


def test_the_recipes_own_dataset_keeps_the_recipes_size(capsys):
    cfg = _cfg("simclr")
    assert cfg.data.name == "fashion_mnist" and not cfg.follow_images
    settle_sizes(cfg, from_arrays(np.zeros((4, 28, 28), np.uint8)))
    assert cfg.views.size == 28 and capsys.readouterr().out == ""
    assert not _cfg("simclr", "data=fmnist").follow_images  # an alias of the recipe's dataset is that dataset


def test_multi_crop_local_size_keeps_the_recipes_ratio():
    cfg = _cfg("dino", "data=cifar10")  # the recipe: 28-px global, 12-px local crops (Fashion-MNIST)
    assert (cfg.views.size, cfg.views.local_size) == (28, 12) and cfg.views.n_local > 0
    settle_sizes(cfg, from_arrays(np.zeros((4, 32, 32, 3), np.uint8)))
    assert (cfg.views.size, cfg.views.local_size) == (32, round(32 * 12 / 28))
    chosen = _cfg("dino", "data=cifar10", "views.local_size=10")
    settle_sizes(chosen, from_arrays(np.zeros((4, 32, 32, 3), np.uint8)))
    assert (chosen.views.size, chosen.views.local_size) == (32, 10)


def test_a_vit_gets_a_multiple_of_its_patch_size(capsys):
    cfg = _cfg("simclr", "data=cifar10", "model.backbone=vit_tiny", "model.patch_size=4")
    settle_sizes(cfg, from_arrays(np.zeros((4, 34, 34, 3), np.uint8)))
    assert cfg.views.size == 32
    assert "a multiple of model.patch_size=4" in capsys.readouterr().out
