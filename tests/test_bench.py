"""`selfsup bench`: the step, fwd+bwd and view timings, the ratios derived from them, and the FLOP count."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from selfsup.bench import describe, measure, model_flops, peak_tflops
from selfsup.cli import main

TINY = ["model.backbone=resnet10", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
        "views.size=16", "batch_size=32", "optim.name=adamw"]


def test_model_flops_of_a_linear_layer_forward_and_backward():
    """y = x W^T: forward 2*B*I*O; backward 2*B*I*O for dL/dx and 2*B*I*O for dL/dW (the bias adds none)."""
    b, i, o = 8, 5, 3
    layer, x = nn.Linear(i, o), torch.randn(b, i, requires_grad=True)
    assert model_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o


def test_peak_table_names_the_gpu_and_the_precision():
    assert peak_tflops("NVIDIA H200", low_precision=True) == 989.0
    assert peak_tflops("NVIDIA H200", low_precision=False) == 494.5
    assert peak_tflops("Some Future GPU", low_precision=True) is None


def test_measure_reports_consistent_timings_and_ratios(tiny_fmnist):
    r = measure("simclr", [*TINY, f"data.root={tiny_fmnist}", "data.download=false"], steps=2, warmup=0)
    assert r["batch"] == 32 and r["n_views"] == 2 and r["device"] == "cpu" and r["cpu"]
    assert r["samples_per_s"] == pytest.approx(32 / (r["step_ms"] / 1e3), rel=1e-9)
    assert r["overhead_ratio"] == pytest.approx(r["step_ms"] / r["fwd_bwd_ms"], rel=1e-9)
    assert r["views_per_s"] == pytest.approx(2 * 32 / (r["views_ms"] / 1e3), rel=1e-9)
    # the step contains a fwd+bwd and the views: it cannot be much faster than either (timing noise aside)
    assert r["step_ms"] > 0.5 * r["fwd_bwd_ms"] and r["step_ms"] > r["views_ms"] * 0.5
    assert r["model_tflops_per_step"] > 0 and "mfu" not in r  # MFU only on a GPU of the peak table
    assert r["loader_images_per_s"] == pytest.approx(32 / (r["loader_ms"] / 1e3), rel=1e-9)
    assert r["loader_vs_step"] == pytest.approx(r["step_ms"] / r["loader_ms"], rel=1e-9)
    assert r["loader_ms"] < r["step_ms"]  # gathering 32 tiny uint8 images is far cheaper than training on them
    text = describe(r)
    assert "overhead ratio" in text and r["cpu"] in text and "batch loading" in text


def test_cli_writes_json_and_refuses_unknown_methods(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "simclr", *TINY, f"data.root={tiny_fmnist}", "data.download=false", "--steps", "1",
               "--warmup", "0", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["method"] == "simclr"
    assert "samples/s" in capsys.readouterr().out
    assert main(["bench", "simcl"]) == 2
    assert "did you mean 'simclr'" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("method", ["supcon", "npid"])
def test_measure_gives_the_views_labels_and_rows_as_the_trainer_does(tiny_fmnist, method):
    """SupCon reads the batch's labels and NPID its rows in the training set (Views.labels / .index): the bench's
    step and fwd+bwd must carry them, or these methods refuse to run under `selfsup bench`."""
    r = measure(method, [*TINY, f"data.root={tiny_fmnist}", "data.download=false"], steps=1, warmup=0)
    assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0

