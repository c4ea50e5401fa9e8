"""Evaluation protocols (cookbook §3.7.1; DESIGN.md §4 fmnist-knn / fmnist-linear) against references."""

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.evaluate import probe as probe_module
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_classify, knn_top1
from selfsup.evaluate.probe import (
    OnlineLinearProbe,
    confusion_matrix,
    cosine_factor,
    fixed_num_threads,
    linear_probe,
    per_class_top1,
    select_head,
    stratified_split,
    train_linear_heads,
)
from selfsup.report.plots import plot_training, read_metrics, smooth


def clusters(n, num_classes=4, dim=16, spread=0.05, seed=0):
    """Well-separated Gaussian clusters around random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    centers = nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1) * 3
    labels = torch.arange(n) % num_classes
    return centers[labels] + spread * torch.randn(n, dim, generator=gen), labels


# ----------------------------------------------------------------------------------------------------- kNN
def naive_knn(train, train_labels, test, k, temperature, num_classes, weighting="exp"):
    """Per-query reference: full argsort of cosine similarities (float64), then exp(s/T) or +1 votes."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    preds = []
    for q in test.double():
        sims = train @ (q / q.norm())
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for j in torch.argsort(sims, descending=True)[:k]:
            votes[train_labels[j]] += math.exp(sims[j] / temperature) if weighting == "exp" else 1.0
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


def test_knn_separable_clusters_are_perfect():
    x, y = clusters(400)
    result = knn_classify(x[:300], y[:300], x[300:], y[300:], k=[1, 5, 20])
    assert result["top1"] == {1: 100.0, 5: 100.0, 20: 100.0}
    assert result["protocol"] == {
        "k": [1, 5, 20],
        "temperature": 0.07,
        "weighting": "exp",
        "metric": "cosine",
        "num_classes": 4,
        "n_train": 300,
    }
    assert knn_top1(x[:300], y[:300], x[300:], y[300:]) == 100.0


def test_knn_shuffled_labels_is_chance():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, 8, generator=gen), torch.randint(0, 5, (3000,), generator=gen)
    top1 = knn_top1(x[:2000], y[:2000], x[2000:], y[2000:])
    assert abs(top1 - 20.0) < 5.0


@pytest.mark.parametrize("weighting", ["exp", "majority"])
def test_knn_matches_naive_reference_for_several_k_in_one_pass(weighting):
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(200, 6, generator=gen), torch.randn(40, 6, generator=gen)
    train_labels = torch.randint(0, 5, (200,), generator=gen)
    ks = [1, 3, 10, 20]
    result = knn_classify(
        train, train_labels, test, k=ks, temperature=0.1, num_classes=5, weighting=weighting
    )
    for k in ks:
        expected = naive_knn(train, train_labels, test, k, 0.1, 5, weighting)
        assert torch.equal(result["predictions"][k], expected), k


def test_knn_majority_and_weighted_votes_differ_on_crafted_example():
    # One neighbour of class 0 at cosine 1, two of class 1 at cosine 0.5: majority says 1, exp(s/0.07) says 0
    # (exp(1/0.07) = 1.6e6 > 2 exp(0.5/0.07) = 2.5e3).
    angle = math.acos(0.5)
    train = torch.tensor(
        [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)], [-1.0, 0.0]]
    )
    train_labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    weighted = knn_classify(train, train_labels, query, k=3, weighting="exp")
    majority = knn_classify(train, train_labels, query, k=3, weighting="majority")
    assert weighted["predictions"][3].tolist() == [0]
    assert majority["predictions"][3].tolist() == [1]


def test_knn_chunking_does_not_change_predictions():
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 4, (300,), generator=gen)
    whole = knn_classify(train, labels, test, k=[5, 20], chunk_size=10_000)["predictions"]
    chunked = knn_classify(train, labels, test, k=[5, 20], chunk_size=7)["predictions"]
    assert all(torch.equal(whole[k], chunked[k]) for k in (5, 20))


def test_knn_small_temperature_does_not_overflow():
    x, y = clusters(200)
    assert knn_top1(x[:150], y[:150], x[150:], y[150:], temperature=1e-4) == 100.0


def test_knn_rejects_bad_arguments():
    x, y = clusters(20)
    with pytest.raises(ValueError, match="larger than the 10 training"):
        knn_classify(x[:10], y[:10], x[10:], k=11)
    with pytest.raises(ValueError, match="weighting"):
        knn_classify(x[:10], y[:10], x[10:], weighting="linear")
    with pytest.raises(ValueError, match="integer class"):
        knn_classify(x[:10], y[:10].float(), x[10:], k=3)


# -------------------------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_clusters_is_perfect_and_reports_the_choice():
    x, y = clusters(1000, num_classes=5, dim=12, spread=0.3)
    result = linear_probe(
        x[:800],
        y[:800],
        x[800:],
        y[800:],
        lrs=(0.01, 0.1),
        weight_decays=(0.0, 1e-3),
        epochs=5,
        batch_size=64,
    )
    assert result["top1"] == 100.0 and result["val_top1"] == 100.0
    assert [(g["lr"], g["weight_decay"]) for g in result["grid"]] == [
        (0.01, 0.0),
        (0.01, 1e-3),
        (0.1, 0.0),
        (0.1, 1e-3),
    ]
    best = max(result["grid"], key=lambda g: g["val_top1"])
    assert result["val_top1"] == best["val_top1"]
    assert result["protocol"]["n_val"] == 80 and result["protocol"]["n_fit"] == 720
    assert result["epochs"] == 5 and result["refit"] is False


def test_linear_probe_shuffled_labels_is_chance():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(3000, 16, generator=gen), torch.randint(0, 4, (3000,), generator=gen)
    result = linear_probe(
        x[:2000],
        y[:2000],
        x[2000:],
        y[2000:],
        lrs=(0.01, 0.1),
        weight_decays=(0.0,),
        epochs=3,
        batch_size=256,
    )
    assert abs(result["top1"] - 25.0) < 5.0


def test_linear_probe_never_selects_on_test():
    x, y = clusters(900, num_classes=3, dim=8, spread=0.8, seed=5)
    kwargs = dict(lrs=(0.001, 0.03, 1.0), weight_decays=(0.0, 1e-2), epochs=3, batch_size=32)
    honest = linear_probe(x[:600], y[:600], x[600:], y[600:], **kwargs)
    wrong = linear_probe(x[:600], y[:600], x[600:], (y[600:] + 1) % 3, **kwargs)
    assert wrong["val_top1"] > 80.0 and wrong["top1"] < 20.0
    for key in ("lr", "weight_decay", "val_top1", "grid"):
        assert wrong[key] == honest[key], key
    refit = linear_probe(x[:600], y[:600], x[600:], y[600:], refit=True, **kwargs)
    assert refit["refit"] is True and refit["lr"] == honest["lr"] and refit["top1"] > 80.0


def test_stratified_split_keeps_class_proportions():
    labels = torch.cat([torch.zeros(100), torch.ones(50), torch.full((30,), 2)]).long()
    fit, val = stratified_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[val]).tolist() == [10, 5, 3]
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(180))


def test_one_pass_grid_equals_each_head_trained_alone_with_torch_sgd():
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(100, 7, generator=gen), torch.randint(0, 3, (100,), generator=gen)
    lrs, wds, epochs, batch, momentum = [0.05, 0.5, 0.2], [0.0, 0.0, 0.1], 3, 32, 0.9
    weight, bias = train_linear_heads(x, y, 3, lrs, wds, epochs=epochs, batch_size=batch, momentum=momentum)
    for g, (lr, wd) in enumerate(zip(lrs, wds)):
        head = nn.Linear(7, 3)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(
            [{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0.0}],
            lr=lr,
            momentum=momentum,
        )
        order_gen, step, total = torch.Generator().manual_seed(0), 0, epochs * math.ceil(100 / batch)
        for _ in range(epochs):
            order = torch.randperm(100, generator=order_gen)
            for start in range(0, 100, batch):
                idx = order[start : start + batch]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad()
                nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
        torch.testing.assert_close(weight[:, g].T, head.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bias[g], head.bias.detach(), atol=1e-5, rtol=1e-4)


GRID = [(lr, wd) for lr in (0.01, 0.1, 1.0) for wd in (0.0, 1e-4)]


@pytest.mark.parametrize("best, lr_edge, wd_edge, notes", [
    ((1.0, 1e-4), "largest", "largest",
     ["the chosen lr 1 is the largest in the grid: a larger one may do better; set eval.linear_lrs=[0.1,1,3,10]",
      "the chosen weight decay 0.0001 is the largest in the grid: a larger one may do better; set "
      "eval.linear_weight_decays=[0,0.0001,0.0003,0.001]"]),
    ((0.01, 0.0), "smallest", None,  # a weight decay of 0 cannot go lower: no edge
     ["the chosen lr 0.01 is the smallest in the grid: a smaller one may do better; set "
      "eval.linear_lrs=[0.001,0.00333333,0.01,0.1]"]),
    ((0.1, 0.0), None, None, []),
])
def test_select_head_flags_a_choice_at_the_edge_of_its_grid(best, lr_edge, wd_edge, notes):
    val = torch.tensor([90.0 if point == best else 50.0 for point in GRID])
    index, choice = select_head(GRID, val)
    assert GRID[index] == best
    assert (choice["lr_edge"], choice["weight_decay_edge"], choice["edge_notes"]) == (lr_edge, wd_edge, notes)
    assert choice["lr_at_grid_edge"] is (lr_edge is not None)


def test_confusion_matrix_and_per_class_accuracy_count_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 0])
    cm = confusion_matrix(y, pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert per_class_top1(cm) == [pytest.approx(200 / 3), 100.0, 0.0, None]  # class 3 absent: None


def test_linear_probe_returns_the_tested_heads_predictions_and_confusion():
    x, y = clusters(600, num_classes=3, dim=8, spread=1.5, seed=2)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], lrs=(0.1,), weight_decays=(0.0,), epochs=3,
                       return_predictions=True)
    pred = res["predictions"]
    assert res["top1"] == pytest.approx(100 * (pred == y[400:]).double().mean().item())
    assert res["confusion"] == confusion_matrix(y[400:], pred, 3).tolist()
    assert "predictions" not in linear_probe(x[:400], y[:400], x[400:], y[400:], lrs=(0.1,), epochs=1)


def test_linear_probe_is_thread_count_invariant():
    """Bit-identity is the claim: the same features give the same choice, accuracy and predictions at 1 and 2
    threads (the probe runs on probe.PROBE_THREADS whatever the caller set)."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 10, (2600,), generator=gen)
    x = torch.randn(10, 128, generator=gen)[y] + 4 * torch.randn(2600, 128, generator=gen)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(linear_probe(x[:2200], y[:2200], x[2200:], y[2200:], epochs=2, return_predictions=True))
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(before)
    one, two = runs
    assert torch.equal(one["predictions"], two["predictions"])
    assert (one["top1"], one["lr"], one["weight_decay"], one["grid"]) == (two["top1"], two["lr"],
                                                                          two["weight_decay"], two["grid"])


def test_the_linear_heads_train_on_the_probe_thread_count(monkeypatch):
    seen = []
    real = probe_module.train_linear_heads

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "train_linear_heads", spy)
    x, y = clusters(200, num_classes=2, dim=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        linear_probe(x[:150], y[:150], x[150:], y[150:], lrs=(0.1,), weight_decays=(0.0,), epochs=1)
        assert seen == [probe_module.PROBE_THREADS] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), fixed_num_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(before)


def test_cosine_factor_endpoints():
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(5, 10) == pytest.approx(0.5)


def test_linear_probe_rejects_no_validation():
    x, y = clusters(40)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x[:30], y[:30], x[30:], y[30:], val_fraction=0.0)


# ------------------------------------------------------------------------------------------------ features
class RecordingFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x.flatten(1)


@pytest.mark.parametrize("was_training", [True, False])
def test_extract_features_uses_eval_mode_and_restores_it(was_training):
    encoder = RecordingFlatten().train(was_training)
    extract_features(encoder, torch.zeros(5, 1, 2, 2, dtype=torch.uint8), [0.5], [0.5], batch_size=2)
    assert encoder.modes == [False, False, False]
    assert encoder.training is was_training


@pytest.mark.parametrize(
    ("mean", "std"), [([0.2860], [0.3530]), ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261])]
)
def test_extract_features_normalizes_exactly_per_channel(mean, std):
    channels = len(mean)
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (10, channels, 3, 3), generator=gen, dtype=torch.uint8)
    feats = extract_features(nn.Flatten(), images, mean, std, batch_size=3)
    by_hand = torch.empty(10, channels, 3, 3)
    for n in range(10):
        for c in range(channels):
            by_hand[n, c] = (images[n, c].float() / 255.0 - torch.tensor(mean[c])) / torch.tensor(std[c])
    assert feats.dtype == torch.float32
    # vectorized vs per-element arithmetic: float32 rounding may differ between CPU kernels, so 1e-6 absolute
    torch.testing.assert_close(feats, by_hand.flatten(1), rtol=0, atol=1e-6)
    from_numpy = extract_features(nn.Flatten(), images.numpy(), mean, std, batch_size=4)
    torch.testing.assert_close(from_numpy, feats, rtol=0, atol=1e-6)


def test_extract_features_memmap_autocast_and_autograd_use(tmp_path):
    images = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(6, 1, 4, 4))
    images[:] = np.arange(96, dtype=np.uint8).reshape(6, 1, 4, 4)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    feats = extract_features(linear, images, [0.5], [0.25], batch_size=4, dtype=torch.bfloat16)
    assert feats.dtype == torch.float32 and feats.shape == (6, 3)
    exact = extract_features(linear, images, [0.5], [0.25])
    torch.testing.assert_close(feats, exact, atol=0.1, rtol=0.05)
    head = nn.Linear(3, 2)
    head(exact).sum().backward()  # features are normal tensors, not inference tensors
    assert head.weight.grad is not None


def test_extract_features_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        extract_features(nn.Flatten(), torch.zeros(2, 1, 2, 2), [0.5], [0.5])
    with pytest.raises(ValueError, match="3 channels"):
        extract_features(nn.Flatten(), torch.zeros(2, 3, 2, 2, dtype=torch.uint8), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        extract_features(nn.Flatten(), torch.zeros(2, 2, 2, dtype=torch.uint8), [0.5], [0.5])
    with pytest.raises(ValueError, match="pool or flatten"):
        extract_features(nn.Identity(), torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0.5], [0.5])


# ----------------------------------------------------------------------------------------------- online probe
def cluster_batches(steps, batch=64, seed=8):
    x, y = clusters(steps * batch, num_classes=4, dim=10, spread=0.5, seed=seed)
    return list(zip(x.split(batch), y.split(batch), strict=True))


def test_online_probe_learns_separable_clusters_from_detached_features():
    upstream = nn.Linear(10, 10)  # an "encoder" whose output carries an autograd graph
    with torch.no_grad():
        upstream.weight.copy_(torch.eye(10))
        upstream.bias.zero_()
    probe = OnlineLinearProbe(10, 4, lr=0.1)
    batches = cluster_batches(60)
    with torch.no_grad():  # must still train when the caller is in a no-grad context
        for x, y in batches[:5]:
            probe.step(x, y)
    for x, y in batches[5:]:
        logs = probe.step(upstream(x), y)
    assert upstream.weight.grad is None  # the gradient never reaches the encoder
    assert logs["acc"].item() > 95.0 and logs["loss"].item() < 0.2
    assert not logs["loss"].requires_grad


def test_online_probe_state_round_trip_resumes_exactly():
    batches = cluster_batches(10)
    uninterrupted = nn.ModuleDict({"probe": OnlineLinearProbe(10, 4)})
    for x, y in batches:
        uninterrupted["probe"].step(x, y)

    first_half = nn.ModuleDict({"probe": OnlineLinearProbe(10, 4)})
    for x, y in batches[:5]:
        first_half["probe"].step(x, y)
    buffer = io.BytesIO()
    torch.save(first_half.state_dict(), buffer)
    buffer.seek(0)
    resumed = nn.ModuleDict(
        {"probe": OnlineLinearProbe(10, 4, lr=123.0)}
    )  # lr comes back from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, y in batches[5:]:
        resumed["probe"].step(x, y)

    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    for key in (
        "probe.linear.weight",
        "probe.linear.bias",
        "probe.norm.running_mean",
        "probe.norm.running_var",
    ):
        assert torch.equal(expected[key], got[key]), key
    exp_opt, got_opt = expected["probe._extra_state"]["optimizer"], got["probe._extra_state"]["optimizer"]
    assert got_opt["param_groups"][0]["lr"] == 0.1
    for index in exp_opt["state"]:
        assert torch.equal(
            exp_opt["state"][index]["momentum_buffer"], got_opt["state"][index]["momentum_buffer"]
        )
    assert copy.deepcopy(resumed) is not None


# ------------------------------------------------------------------------------------------------------ plots
def write_metrics(path, with_knn):
    lines = []
    for step in range(1, 101):
        lines.append(
            {
                "step": step,
                "epoch": step // 20,
                "loss": 5.0 / step,
                "lr": 0.1 * step / 100,
                "samples_per_s": 100.0,
            }
        )
        if with_knn and step % 20 == 0:
            lines.append(
                {"step": step, "epoch": step // 20, "knn_top1": 50.0 + step / 4, "online_probe_acc": 40.0}
            )
    text = "\n".join(json.dumps(r) for r in lines)
    path.write_text(text + '\nnot json\n[1, 2]\n\n{"step": 101, "lo')  # bad lines and a truncated tail


def test_read_metrics_skips_bad_lines(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", with_knn=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 105 and records[0]["loss"] == 5.0


def test_plot_training_writes_non_empty_pngs(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", with_knn=True)
    paths = plot_training(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "lr.png", "knn.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_training_without_knn_records_skips_knn_png(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", with_knn=False)
    paths = plot_training(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    assert not (tmp_path / "plots" / "knn.png").exists()


def test_plot_training_online_probe_only_goes_to_its_own_file(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"step": 1, "online_probe_acc": 30.0}\n{"step": 2, "online_probe_acc": 40}\n'
    )
    paths = plot_training(tmp_path / "m.jsonl", tmp_path)
    assert [p.name for p in paths] == ["online_probe.png"]


def test_smooth_is_bias_corrected_ema():
    assert smooth([3.0, 3.0, 3.0], span=9) == pytest.approx([3.0, 3.0, 3.0])
    alpha = 0.2
    expected_second = ((1 - alpha) * alpha * 1.0 + alpha * 2.0) / (1 - (1 - alpha) ** 2)
    assert smooth([1.0, 2.0], span=9) == pytest.approx([1.0, expected_second])


def test_knn_several_weightings_share_one_retrieval_and_equal_separate_calls():
    x, y = clusters(120, spread=0.8, seed=3)
    q, yq = clusters(50, spread=0.8, seed=4)
    both = knn_classify(x, y, q, yq, k=[1, 5, 20], weighting=("exp", "majority"))
    for w in ("exp", "majority"):
        alone = knn_classify(x, y, q, yq, k=[1, 5, 20], weighting=w)
        assert both["by_weighting"][w] == alone["top1"]
    assert both["top1"] == both["by_weighting"]["exp"] and both["protocol"]["weighting"] == ["exp", "majority"]
    assert both["by_weighting"]["exp"] != both["by_weighting"]["majority"]  # the noisy clusters tell them apart
    preds = knn_classify(x, y, q, k=5, weighting=("majority", "exp"))
    assert torch.equal(preds["predictions"][5], preds["by_weighting"]["majority"][5])
    with pytest.raises(ValueError, match="weighting"):
        knn_classify(x, y, q, yq, weighting=("exp", "cosine"))
