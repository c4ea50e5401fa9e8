"""The self-distillation recipes: each loads, states its source, and the budgeted ones differ from the default only
in what their header says (batch 64 and a training budget)."""
import pytest

import selfsup.methods  # noqa: F401  (registers every method)
from selfsup.config import build_config, load_recipe, recipe_names
from selfsup.methods import get_method

METHODS = ["byol", "simsiam", "directpred", "meanshift", "dino", "deepcluster_v2", "msn", "ibot"]
BUDGETS = {"10min": "7.5m", "30min": "27.5m", "60min": "57.5m"}
# the budgeted recipes that also change a method parameter, as their header says (directpred/60min.yaml: BYOL's
# short-run teacher, measured 2026-12-08)
METHOD_CHANGES = {("directpred", "60min"): {"directpred": {"ema_base": 0.95, "ema_final": 0.99}}}  # training time; + evaluation and start-up = the name on 2 cores


def _cfg(method, *overrides):
    return build_config(method, list(overrides), params_cls=get_method(method).params_cls)


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_loads_and_states_its_source(method):
    names = recipe_names(method)
    assert "default" in names
    for name in names:
        tree = load_recipe(method, name)
        assert tree.get("description") and tree.get("cookbook"), name
        cfg = _cfg(method, f"recipe={name}")
        assert cfg.recipe == name and cfg.params is not None
        assert cfg.train.budget == BUDGETS.get(name), name
        if name in ("default", *BUDGETS) or name.startswith(("fmnist", "vit")):
            assert cfg.data.name == "fashion_mnist", name
        else:
            assert cfg.data.name == "folder" and cfg.views.size == 224, name


@pytest.mark.parametrize("method", [m for m in METHODS if "10min" in recipe_names(m)])
def test_the_budgeted_recipes_are_the_default_at_batch_64(method):
    default = _cfg(method).to_dict()
    for name in [n for n in BUDGETS if n in recipe_names(method)]:
        budgeted = _cfg(method, f"recipe={name}").to_dict()
        changed = {k for k in budgeted if budgeted[k] != default[k]}
        expected = {"recipe", "description", "batch_size", "train"} | set(METHOD_CHANGES.get((method, name), {}))
        assert changed == expected, (name, changed)
        for section, values in METHOD_CHANGES.get((method, name), {}).items():  # only the keys its header states
            assert {k for k in budgeted[section] if budgeted[section][k] != default[section][k]} == set(values)
            assert {k: budgeted[section][k] for k in values} == values
        assert budgeted["batch_size"] == 64
        assert {k: v for k, v in budgeted["train"].items() if k != "budget"} == \
            {k: v for k, v in default["train"].items() if k != "budget"}
