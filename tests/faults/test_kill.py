"""kill -9 during training, then resume=auto: the CI-sized subset of ``benchmarks/faults.py`` (same machinery).

Four methods whose state goes beyond weights and optimizer: BYOL's EMA teacher, MoCo v2's queue and momentum
encoder, SwAV's prototypes and queue, DINO's center. Each run is killed a random fraction of a step after a random
step, resumed, and its resume killed during a checkpoint write (one chain of two kills: the cost of one trial less
than two separate ones); each checkpoint left on disk must load, and the run resumed to its end must hold the
uninterrupted run's method, optimizer and probe states, bit for bit. Plus: every registered method has a tiny
recipe, so the full benchmark covers it.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
from tiny_methods import BASE, DATA, TINY, write_tiny_data

from selfsup.methods import REGISTRY

_spec = importlib.util.spec_from_file_location("faults", Path(__file__).parents[2] / "benchmarks" / "faults.py")
faults = sys.modules["faults"] = importlib.util.module_from_spec(_spec)  # registered first: it defines dataclasses
_spec.loader.exec_module(faults)

# an EMA teacher (byol) and prototypes + a queue (swav) in CI; every method in `python benchmarks/faults.py`
# (docs/results/faults_kill.md), where moco_v2 and dino, in this list before, survive too
STATEFUL = ["byol", "swav"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method", STATEFUL)
def test_a_killed_run_resumes_to_the_uninterrupted_state(method, tiny_data, tmp_path):
    res = faults.run_method(method, tiny_data, tmp_path, kills=1, rng=random.Random(f"0:{method}"), log=print,
                            chain=2)
    assert not res.error, res.error
    (t,) = res.trials
    assert [k.mode for k in t.kills] == ["step", "write"]
    for k in t.kills:
        assert k.outcome != "missed", f"{method}: the run ended before the kill: {k.describe()}"
        assert k.loads is not False, f"{method}: checkpoints/last.pt left by the kill does not load: {k.load_error}"
    assert t.difference is None, f"{method}: the resumed state differs from the straight run's at {t.difference}"
    assert not t.stale, f"{method}: temporary checkpoint files left after the resume: {t.stale}"


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_registered_method_has_a_tiny_recipe(method):
    assert method in TINY, f"{method} has no tiny recipe in tests/faults/tiny_methods.py: add one to TINY"
    assert DATA.get(method, "fmnist") in ("fmnist", "rgb")


def test_tiny_recipes_name_only_registered_methods_and_valid_keys():
    from selfsup.config import build_config

    assert set(TINY) <= set(REGISTRY), set(TINY) - set(REGISTRY)
    for method, overrides in TINY.items():  # every key exists and every value parses (no unknown-key typos)
        build_config(method, [*BASE, *overrides], params_cls=REGISTRY[method].params_cls)


def test_first_difference_names_the_key():
    import torch

    a = {"method": {"w": torch.zeros(2), "q": [torch.ones(1), 3]}, "optimizer": {"state": {}}, "probe": None}
    assert faults.compare(a, {**a}) is None
    b = {**a, "method": {"w": torch.zeros(2), "q": [torch.ones(1), 4]}}
    assert faults.compare(a, b) == "method.q.1 (3 vs 4)"
    c = {**a, "optimizer": {"state": {0: {"exp_avg": torch.zeros(1)}}}}
    assert faults.compare(a, c) == "optimizer.state (keys differ: [0])"
    d = {**a, "method": {"w": torch.zeros(2, dtype=torch.float64), "q": [torch.ones(1), 3]}}
    assert faults.compare(a, d).startswith("method.w (torch.float32")


def test_a_lost_state_is_reported_and_fails_the_benchmark():
    kill = faults.Kill("write", 3, outcome="during a write", loads=True, resumed_from=2)
    ok = faults.MethodResult("byol", [faults.Trial([kill])])
    lost = faults.MethodResult("swav", [faults.Trial([kill], difference="method.queue")])
    assert not ok.failed and lost.failed
    assert lost.row()[1:7] == ["1", "0", "1", "0", "0", "1"]
    table = faults.markdown([ok, lost], "python benchmarks/faults.py")
    assert "| **all** | 2 | 0 | 2 | 0 | 1 | 1 | 2/2 |" in table and "`method.queue`" in table
