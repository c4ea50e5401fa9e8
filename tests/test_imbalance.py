"""Power-law class-imbalanced subsets (data.imbalance_ratio): the class sizes follow their formula, the rows are
real rows of the split chosen from the seed, the test split is untouched, and bad requests are refused."""

import numpy as np
import pytest
import torch
from conftest import write_idx

from selfsup.config import build_config
from selfsup.data.datasets import from_arrays
from selfsup.data.imbalance import power_law_sizes, power_law_subset
from selfsup.methods import get_method
from selfsup.runs import load_data


def test_sizes_follow_the_power_law():
    # ratio 10 over 10 classes: a = 1 (Zipf), the sizes the module docstring states for Fashion-MNIST
    assert power_law_sizes(6000, 10, 10.0) == [6000, 3000, 2000, 1500, 1200, 1000, 857, 750, 667, 600]
    sizes = power_law_sizes(1000, 4, 100.0)  # a = ln 100 / ln 4: largest / smallest = 100 exactly
    assert sizes[0] == 1000 and sizes[-1] == 10 and sizes == sorted(sizes, reverse=True)
    assert power_law_sizes(50, 3, 1.0) == [50, 50, 50]
    with pytest.raises(ValueError, match="must be >= 1"):
        power_law_sizes(10, 3, 0.5)


def _data(n_per_class=(40, 30, 50)):
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1)
    images = images.expand(-1, 1, 2, 2).contiguous()
    images[:, 0, 1, 1] = labels.to(torch.uint8)  # each image carries its label, to check rows stay paired
    return from_arrays(images, labels, classes=["a", "b", "c"], name="toy/train")


def test_subset_keeps_real_rows_with_their_labels_chosen_from_the_seed():
    data = _data()
    sub = power_law_subset(data, 9.0, seed=3)  # n_max = 30 (the smallest class); a = ln 9 / ln 3 = 2
    assert torch.bincount(sub.labels).tolist() == [30, 8, 3]
    assert torch.equal(sub.images[:, 0, 1, 1].long(), sub.labels)  # images and labels still paired
    assert power_law_subset(data, 9.0, seed=3).images.equal(sub.images)
    assert not power_law_subset(data, 9.0, seed=4).images.equal(sub.images)
    assert sub.classes == data.classes and "power-law imbalance 9" in sub.name
    with pytest.raises(ValueError, match="has no labels"):
        power_law_subset(from_arrays(data.images), 2.0)


def test_config_subsamples_the_train_split_only(tmp_path, capsys):
    root = tmp_path / "fmnist"  # the Fashion-MNIST format with all 10 classes, 20 images each
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    write_idx(root, "train", rng.integers(0, 256, (200, 8, 8)), labels)
    write_idx(root, "t10k", rng.integers(0, 256, (30, 8, 8)), np.arange(30) % 10)
    params = get_method("simclr").params_cls
    train, test = load_data(build_config("simclr", [f"data.root={root}", "data.imbalance_ratio=10"],
                                         params_cls=params))
    assert torch.bincount(train.labels).tolist() == power_law_sizes(20, 10, 10.0)  # 20, 10, 7, 5, 4, ... 2
    assert "class sizes [20, 10, 7, 5, 4, 3, 3, 2, 2, 2]" in capsys.readouterr().out
    full, full_test = load_data(build_config("simclr", [f"data.root={root}"], params_cls=params))
    assert len(full) == 200 and torch.equal(test.images, full_test.images)
