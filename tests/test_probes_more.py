"""MLP probe, augmented linear probe and fine-tuning (cookbook §3.7.1, §3.5.4) against known answers."""

import copy
import math

import pytest
import torch
from torch import nn

from selfsup.evaluate.aug_probe import augmented_linear_probe, train_view
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.finetune import finetune, layer_decay_param_groups
from selfsup.evaluate.mlp_probe import accuracy, fit_mlp, mlp_probe
from selfsup.evaluate.probe import linear_probe
from selfsup.nn.resnet import resnet
from selfsup.nn.vit import VisionTransformer


def clusters(n, num_classes=4, dim=16, spread=0.05, seed=0):
    """Well-separated Gaussian clusters around random directions of norm 3."""
    gen = torch.Generator().manual_seed(seed)
    centers = nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1) * 3
    labels = torch.arange(n) % num_classes
    return centers[labels] + spread * torch.randn(n, dim, generator=gen), labels


def xor(n, seed):
    """Four blobs at (±1, ±1) + 6 noise dims, label = [x1 * x2 > 0]: no linear boundary beats ~50 %."""
    gen = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    which = torch.arange(n) % 4
    x = torch.cat([corners[which], torch.zeros(n, 6)], dim=1) + 0.15 * torch.randn(n, 8, generator=gen)
    return x, (which >= 2).long()


def noisy_overfit(n=400, dim=30, noise=0.2, seed=0):
    """Two classes along feature 0 (shift ±1.5) + 29 noise features, 20 % flipped labels (clean labels returned
    too): an MLP fits the signal in the first epoch, then memorizes the flipped labels and val accuracy falls."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=gen)
    x[:, 0] += 1.5 * (2 * y - 1)
    flipped = torch.rand(n, generator=gen) < noise
    return x, torch.where(flipped, 1 - y, y), y


def blob_images(n, seed, size=16):
    """uint8 (n, 1, size, size): class 0 has a bright 3x3 square, class 1 a bright 8x8 one, anywhere, on noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 40, (n, 1, size, size), generator=gen)
    for i, c in enumerate(labels.tolist()):
        side = 3 if c == 0 else 8
        top, left = torch.randint(0, size - side + 1, (2,), generator=gen).tolist()
        images[i, 0, top : top + side, left : left + side] = 220
    return images.to(torch.uint8), labels


class PoolEncoder(nn.Module):
    """A fixed, position-independent encoder: per-image mean, std, max and bright-pixel fraction (+ a BN layer so
    that train/eval mode matters)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        flat = x.flatten(1)
        stats = torch.stack([flat.mean(1), flat.std(1), flat.amax(1), (flat > 0.5).float().mean(1)], dim=1)
        return self.bn(stats)


# ----------------------------------------------------------------------------------------------------- MLP probe
def test_mlp_probe_separable_clusters_are_perfect():
    x, y = clusters(600)
    result = mlp_probe(x[:400], y[:400], x[400:], y[400:], hidden=(64,), epochs=10, batch_size=64)
    assert result["top1"] == 100.0 and result["val_top1"] == 100.0
    assert result["stopped_early"] is (result["epochs_run"] < 10) and result["max_epochs"] == 10
    assert result["hidden"] == [64]
    assert [row["epoch"] for row in result["curve"]] == list(range(1, result["epochs_run"] + 1))
    assert result["protocol"]["n_fit"] + result["protocol"]["n_val"] == 400
    assert result["protocol"]["architecture"] == "16 -> Linear(64)-BN-ReLU -> Linear(4)"


def test_mlp_probe_on_shuffled_labels_is_at_chance():
    # Test labels are a random permutation of a balanced vector, independent of everything the probe saw, so the
    # number of hits is (close to) Binomial(2000, 1/4): mean 25 %, std 0.97 %; 5 % is more than 5 std.
    x, y = clusters(4000, spread=1.0)
    gen = torch.Generator().manual_seed(1)
    y = y[torch.randperm(len(y), generator=gen)]
    result = mlp_probe(x[:2000], y[:2000], x[2000:], y[2000:], hidden=(64,), epochs=5, batch_size=256)
    assert abs(result["top1"] - 25.0) < 5.0


def test_mlp_separates_xor_that_a_linear_probe_cannot():
    x, y = xor(1600, seed=0)
    lin = linear_probe(x[:800], y[:800], x[800:], y[800:], epochs=10, batch_size=64)
    mlp = mlp_probe(x[:800], y[:800], x[800:], y[800:], hidden=(64,), epochs=20, lr=3e-3, batch_size=64)
    assert lin["top1"] < 70.0
    assert mlp["top1"] > 97.0


def test_early_stopping_restores_the_best_val_weights():
    x, y_noisy, _ = noisy_overfit()
    fit, val = slice(0, 300), slice(300, 400)
    model, curve, best = fit_mlp(
        x[fit], y_noisy[fit], x[val], y_noisy[val], 2, hidden=(256,), epochs=30, patience=30, lr=3e-3,
        batch_size=64,
    )  # fmt: skip
    val_accs = [row["val_top1"] for row in curve]
    assert len(curve) == 30 and best == len(val_accs) - val_accs[::-1].index(max(val_accs))  # ties: the later
    assert val_accs[-1] < max(val_accs) - 5  # the last epoch overfits ...
    assert accuracy(model, x[val], y_noisy[val]) == max(val_accs)  # ... and its weights are not the ones returned
    assert curve[-1]["train_loss"] < curve[best - 1]["train_loss"]


def test_mlp_probe_stops_after_patience_and_reports_the_best_epoch():
    x, y_noisy, y_clean = noisy_overfit()
    result = mlp_probe(
        x[:400], y_noisy[:400], x[:50], y_clean[:50], hidden=(256,), epochs=30, patience=4, lr=1e-2,
        batch_size=64, val_fraction=0.25,
    )  # fmt: skip
    val_accs = [row["val_top1"] for row in result["curve"]]
    assert result["best_epoch"] < result["epochs_run"] == result["best_epoch"] + 4 < 30
    assert result["stopped_early"] is True and result["max_epochs"] == 30
    assert result["val_top1"] == max(val_accs) == val_accs[result["best_epoch"] - 1]
    assert max(val_accs[result["best_epoch"] :]) < result["val_top1"]  # nothing after it was as good


def test_mlp_probe_is_thread_count_invariant():
    """Bit-identity is the claim: same features, same seed -> the same training curve, chosen epoch, accuracy and
    predictions at 1 and 2 threads. (Without the fixed probe thread count the epoch-2 train loss of this very case
    differed in the 7th digit at 2 threads: BN and matmul reductions split by thread count.)"""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2700,), generator=gen)
    x = torch.randn(10, 128, generator=gen)[y] + 4 * torch.randn(2700, 128, generator=gen)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(mlp_probe(x[:2200], y[:2200], x[2200:], y[2200:], hidden=(256,), epochs=2,
                                  return_predictions=True))
    finally:
        torch.set_num_threads(before)
    one, two = runs
    assert torch.equal(one["predictions"], two["predictions"])
    assert one["curve"] == two["curve"] and one["top1"] == two["top1"] and one["best_epoch"] == two["best_epoch"]
    assert one["top1"] == 100.0 * (one["predictions"] == y[2200:]).sum().item() / 500


def test_mlp_probe_never_reads_test_labels_for_selection():
    x, y = clusters(500, spread=1.5)
    base = mlp_probe(x[:400], y[:400], x[400:], y[400:], hidden=(32,), epochs=6, batch_size=64)
    shuffled = mlp_probe(x[:400], y[:400], x[400:], y[400:].flip(0), hidden=(32,), epochs=6, batch_size=64)
    for key in ("val_top1", "best_epoch", "epochs_run", "curve"):
        assert base[key] == shuffled[key]
    assert base["top1"] != shuffled["top1"]


def test_mlp_probe_leaves_the_global_rng_alone_and_is_seeded():
    x, y = clusters(300, spread=1.5)
    state = torch.get_rng_state()
    a = mlp_probe(x[:200], y[:200], x[200:], y[200:], hidden=(16,), epochs=3, batch_size=64, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = mlp_probe(x[:200], y[:200], x[200:], y[200:], hidden=(16,), epochs=3, batch_size=64, seed=3)
    assert a == b


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.zeros(10, 4), torch.zeros(9, dtype=torch.long)), {}, "one label each"),
        ((torch.zeros(10, 4), torch.zeros(10)), {}, "integer class indices"),
        ((torch.zeros(10, 4), torch.full((10,), -1)), {}, ">= 0"),
        ((torch.zeros(10, 4), torch.arange(10) % 2, torch.zeros(5, 3)), {}, "different widths"),
        ((torch.zeros(10, 4), torch.arange(10) % 2), {"hidden": ()}, "positive widths"),
        ((torch.zeros(10, 4), torch.arange(10) % 2), {"val_fraction": 0.0}, "val_fraction"),
        ((torch.zeros(10, 4), torch.arange(10) % 2), {"num_classes": 1}, "num_classes"),
    ],
)
def test_mlp_probe_rejects_bad_input(args, kwargs, message):
    train_x, train_y = args[0], args[1]
    test_x = args[2] if len(args) > 2 else torch.zeros(5, train_x.shape[1])
    test_y = torch.zeros(test_x.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        mlp_probe(train_x, train_y, test_x, test_y, **kwargs)


# ------------------------------------------------------------------------------------------ augmented probe
def test_train_view_without_crop_is_the_image_or_its_mirror():
    images, _ = blob_images(32, seed=0)
    plain = (images.float() / 255 - 0.5) / 0.25
    gen = torch.Generator().manual_seed(0)
    views = train_view(images, (0.5,), (0.25,), crop_scale=None, flip=True, generator=gen)
    same = (views - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (views - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and 4 < int(mirrored.sum()) < 28  # Binomial(32, 1/2)
    unflipped = train_view(images, (0.5,), (0.25,), crop_scale=None, flip=False, generator=gen)
    assert torch.allclose(unflipped, plain, atol=1e-5)


def test_augmented_probe_without_augmentation_equals_the_offline_probe():
    images, labels = blob_images(300, seed=0)
    encoder = PoolEncoder()
    encoder(torch.randn(64, 1, 16, 16))  # non-trivial BN running statistics
    kw = {"lrs": (0.01, 0.1), "weight_decays": (0.0, 1e-3), "epochs": 3, "batch_size": 64}
    aug = augmented_linear_probe(
        encoder, images[:200], labels[:200], images[200:], labels[200:], (0.5,), (0.25,), crop_scale=None,
        flip=False, **kw,
    )  # fmt: skip
    feats = extract_features(encoder, images, (0.5,), (0.25,))
    plain = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], **kw)
    assert set(aug) == set(plain) - {"refit", "confusion", "per_class_top1"}  # the offline probe's report extras
    for key in ("top1", "val_top1", "lr", "weight_decay", "epochs", "lr_at_grid_edge"):
        assert aug[key] == pytest.approx(plain[key]), key
    assert [(g["lr"], g["weight_decay"]) for g in aug["grid"]] == [(g["lr"], g["weight_decay"]) for g in plain["grid"]]
    for a, p in zip(aug["grid"], plain["grid"], strict=True):
        assert a["val_top1"] == pytest.approx(p["val_top1"])


def test_augmented_probe_learns_position_independent_blobs():
    images, labels = blob_images(400, seed=1)
    encoder = PoolEncoder().train()
    encoder(torch.randn(64, 1, 16, 16))
    encoder.train()
    before = copy.deepcopy(encoder.state_dict())
    result = augmented_linear_probe(
        encoder, images[:300], labels[:300], images[300:], labels[300:], (0.5,), (0.25,), epochs=3, batch_size=64
    )
    # chance is 50 %; the encoder's max feature is constant on whole images but not on crops (regression test
    # for standardizing it by its zero std)
    assert result["top1"] > 95.0
    assert [(g["lr"], g["weight_decay"]) for g in result["grid"]] == [
        (g["lr"], g["weight_decay"]) for g in linear_probe(torch.randn(20, 3), torch.arange(20) % 2,
                                                           torch.randn(4, 3), torch.arange(4) % 2)["grid"]
    ]
    assert encoder.training  # the flag is restored, and eval mode kept the BN statistics as they were
    for key, value in before.items():
        assert torch.equal(encoder.state_dict()[key], value)


def test_augmented_probe_rejects_bad_images():
    images, labels = blob_images(40, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        augmented_linear_probe(PoolEncoder(), images.float(), labels, images, labels, (0.5,), (0.25,))
    with pytest.raises(ValueError, match="one label per image"):
        augmented_linear_probe(PoolEncoder(), images, labels[:-1], images, labels, (0.5,), (0.25,))
    with pytest.raises(ValueError, match="differ in shape"):
        augmented_linear_probe(PoolEncoder(), images, labels, images[..., :8], labels, (0.5,), (0.25,))


# ----------------------------------------------------------------------------------------------- fine-tuning
def tiny_vit(**kw):
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=2, num_heads=2, **kw)


class WithHead(nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.encoder, self.head = vit, nn.Linear(8, 3)


def test_layer_decay_groups_match_a_hand_computation():
    model = WithHead(tiny_vit())
    decay, base_lr, wd = 0.5, 1.0, 0.05
    # Hand-written (L = 2 blocks): layer id 0 patch_embed/cls/pos, 1 blocks.0, 2 blocks.1, 3 norm + head;
    # lr_scale = 0.5 ** (3 - id); no decay for biases, LayerNorm parameters, pos_embed and cls_token.
    expected = {
        "encoder.cls_token": (0.125, 0.0),
        "encoder.pos_embed": (0.125, 0.0),
        "encoder.patch_embed.weight": (0.125, wd),
        "encoder.patch_embed.bias": (0.125, 0.0),
        "encoder.norm.weight": (1.0, 0.0),
        "encoder.norm.bias": (1.0, 0.0),
        "head.weight": (1.0, wd),
        "head.bias": (1.0, 0.0),
    }
    for i, scale in ((0, 0.25), (1, 0.5)):
        for suffix in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.bias",
                       "attn.proj.bias", "mlp.0.bias", "mlp.2.bias"):  # fmt: skip
            expected[f"encoder.blocks.{i}.{suffix}"] = (scale, 0.0)
        for suffix in ("attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight"):
            expected[f"encoder.blocks.{i}.{suffix}"] = (scale, wd)
    groups = layer_decay_param_groups(model, base_lr, wd, decay)
    got = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert group["lr"] == pytest.approx(base_lr * group["lr_scale"])
        assert group["lr_scale"] == pytest.approx(decay ** (3 - group["layer_id"]))
        for p in group["params"]:
            assert names[id(p)] not in got, "a parameter is in two groups"
            got[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert got.keys() == expected.keys()
    for name, (scale, weight_decay) in expected.items():
        assert got[name] == (pytest.approx(scale), weight_decay), name


def test_layer_decay_groups_skip_frozen_parameters_and_need_a_vit():
    model = WithHead(tiny_vit(freeze_patch_embed=True))
    params = [p for g in layer_decay_param_groups(model, 1e-3, 0.05, 0.75) for p in g["params"]]
    assert not any(p is model.encoder.patch_embed.weight for p in params)
    assert len(params) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="VisionTransformer"):
        layer_decay_param_groups(resnet("resnet10", in_chans=1, width=4), 1e-3, 0.05, 0.75)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(model, 1e-3, 0.05, 1.5)


def bar_images(n, seed, size=16):
    """uint8 (n, 1, size, size): class = a bright bar's orientation (0 vertical, 1 horizontal), at any offset."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 50, (n, 1, size, size), generator=gen)
    for i, c in enumerate(labels.tolist()):
        at = int(torch.randint(2, size - 5, (1,), generator=gen))
        if c == 0:
            images[i, 0, :, at : at + 3] = 230
        else:
            images[i, 0, at : at + 3, :] = 230
    return images.to(torch.uint8), labels


def test_finetune_resnet_learns_fast_and_leaves_the_encoder_alone():
    images, labels = bar_images(360, seed=0)
    encoder = resnet("resnet10", in_chans=1, width=8, stem="small")
    encoder.train()
    before = copy.deepcopy(encoder.state_dict())
    result = finetune(
        encoder, images[:240], labels[:240], images[240:], labels[240:], (0.1,), (0.2,), epochs=3, lr=1e-2,
        batch_size=32, crop_scale=None, flip=False,
    )  # fmt: skip
    assert result["top1"] > 95.0  # chance 50 %, after 21 steps from a random init
    assert result["layer_decay"] is None and result["epochs"] == 3 and result["steps"] == 3 * math.ceil(216 / 32)
    assert result["val_top1"] == max(row["val_top1"] for row in result["curve"])
    assert result["val_top1"] == result["curve"][result["best_epoch"] - 1]["val_top1"]
    assert encoder.training and set(encoder.state_dict()) == set(before)
    for key, value in before.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    with pytest.raises(ValueError, match="layer_decay"):
        finetune(encoder, images[:40], labels[:40], images[:8], labels[:8], (0.1,), (0.2,), layer_decay=0.75)


def test_finetune_vit_steps_follow_the_layer_decay():
    # AdamW's first step moves every parameter entry by lr_group * g / (|g| + eps): at most the group's lr, and
    # almost exactly that where |g| >> eps (1e-8). With no warm-up and no weight decay, the largest change of a
    # parameter is therefore <= lr * decay ** (L + 1 - id); for the weight matrices and tokens, whose largest
    # gradient entry is far above eps, it is within 10 % of it (neighbouring layers differ by a factor 2).
    # 1-D parameters behind the near-zero head (std 2e-5) can have all |g| ~ eps, so they get the upper bound only.
    images, labels = bar_images(40, seed=1, size=8)
    encoder = tiny_vit()
    result = finetune(
        encoder, images, labels, images[:8], labels[:8], (0.1,), (0.2,), lr=1e-3, weight_decay=0.0,
        layer_decay=0.5, warmup_fraction=0.0, max_steps=1, batch_size=36, crop_scale=None, flip=False,
        label_smoothing=0.0, return_model=True,
    )  # fmt: skip
    assert result["steps"] == 1 and result["layer_decay"] == 0.5
    tuned = dict(result["model"].encoder.named_parameters())
    checked = 0
    for name, p in encoder.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        else:
            layer = int(name.split(".")[1]) + 1 if name.startswith("blocks") else 3
        group_lr = 1e-3 * 0.5 ** (3 - layer)
        step = (tuned[name].detach() - p.detach()).abs().max().item()
        assert step <= group_lr * (1 + 1e-4), name
        if p.ndim > 1:
            assert step > 0.9 * group_lr, name
            checked += 1
    assert checked == 2 + 1 + 2 * 4  # cls, pos, patch_embed.weight, 4 matrices per block
    head_step = (result["model"].head.weight.detach()).abs().max().item()  # init std 2e-5, so |w| after one step is ~lr
    assert abs(head_step - 1e-3) < 1e-4


def test_finetune_rejects_bad_input():
    images, labels = bar_images(40, seed=0)
    encoder = resnet("resnet10", in_chans=1, width=4, stem="small")
    with pytest.raises(ValueError, match="num_classes"):
        finetune(encoder, images, labels, images, labels + 1, (0.1,), (0.2,), max_steps=1)
    with pytest.raises(ValueError, match="uint8"):
        finetune(encoder, images.float(), labels, images, labels, (0.1,), (0.2,), max_steps=1)
    with pytest.raises(ValueError, match="val_fraction"):
        finetune(encoder, images, labels, images, labels, (0.1,), (0.2,), val_fraction=1.0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        finetune(encoder, images, labels, images, labels, (0.1,), (0.2,), warmup_fraction=1.0)


def test_finetune_train_size_is_a_stratified_seeded_subset():
    images, labels = bar_images(200, seed=2)
    encoder = resnet("resnet10", in_chans=1, width=4, stem="small")
    kw = dict(max_steps=1, batch_size=8, crop_scale=None, flip=False)
    small = finetune(encoder, images, labels, images[:8], labels[:8], (0.1,), (0.2,), train_size=60, **kw)
    assert small["protocol"]["n_fit"] + small["protocol"]["n_val"] == 60  # 2 classes of 100: 30 each
    assert small["protocol"]["n_val"] == 6 and small["protocol"]["train_size"].endswith(": 60")
    full = finetune(encoder, images, labels, images[:8], labels[:8], (0.1,), (0.2,), **kw)
    assert full["protocol"]["n_fit"] + full["protocol"]["n_val"] == 200
    again = finetune(encoder, images, labels, images[:8], labels[:8], (0.1,), (0.2,), train_size=60, **kw)
    assert again["curve"] == small["curve"]  # the subset and the run are seeded
    for bad in (0, 201):
        with pytest.raises(ValueError, match="train_size"):
            finetune(encoder, images, labels, images, labels, (0.1,), (0.2,), train_size=bad, **kw)


def test_finetune_auto_layer_decay_is_0_75_for_vits_only():
    images, labels = bar_images(40, seed=1, size=8)
    vit_run = finetune(tiny_vit(), images, labels, images[:8], labels[:8], (0.1,), (0.2,), max_steps=1)
    assert vit_run["layer_decay"] == 0.75
    resnet_run = finetune(
        resnet("resnet10", in_chans=1, width=4, stem="small"), images, labels, images[:8], labels[:8], (0.1,),
        (0.2,), max_steps=1,
    )  # fmt: skip
    assert resnet_run["layer_decay"] is None
