import pytest

from selfsup.cli import main
from selfsup.config import ConfigError, build_config
from selfsup.methods import get_method


def _cfg(method, *overrides):
    return build_config(method, list(overrides), params_cls=get_method(method).params_cls)


def test_defaults_recipe_and_overrides_resolve():
    cfg = _cfg("simclr", "epochs=3", "optim.base_lr=5e-1", "simclr.temperature=0.5", "views.scale=[0.3, 1.0]",
               "data=cifar10")
    assert cfg.epochs == 3 and cfg.optim.base_lr == 0.5 and cfg.params.temperature == 0.5
    assert cfg.views.scale == (0.3, 1.0) and cfg.data.name == "cifar10"
    d = cfg.to_dict()
    assert d["simclr"]["temperature"] == 0.5 and d["views"]["scale"] == [0.3, 1.0]
    assert _cfg("simclr", "recipe=fmnist-long").epochs > _cfg("simclr").epochs


@pytest.mark.parametrize("override, expected", [
    ("epoch=3", "'epochs'"),
    ("optim.base_lrr=0.1", "'optim.base_lr'"),
    ("simclr.temprature=0.3", "'simclr.temperature'"),
    ("modle.width=8", "'model.width'"),
])
def test_unknown_key_names_closest(override, expected):
    with pytest.raises(ConfigError, match=expected):
        _cfg("simclr", override)


@pytest.mark.parametrize("override, msg", [
    ("epochs=abc", "integer"),
    ("epochs=2.5", "integer"),
    ("optim.base_lr=fast", "number"),
    ("train.online_probe=maybe", "true or false"),
    ("views.scale=0.5", "list of 2"),
    ("optim.name=adam", "sgd, adamw, lars"),
    ("batch_size=0", ">= 1"),
    ("recipe=fmnist-lng", "fmnist-long"),
    ("epochs", "key=value"),
    ("model.backbone=resnet81", "resnet18"),
    ("data=fmnst", "fashion"),
])
def test_bad_values_rejected(override, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg("simclr", override)


def test_cli_exit_code_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "simclr", "optim.base_lrr=0.1", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "optim.base_lr" in err
    assert main(["train", "simclr", "epochs=x", f"out={out}"]) == 2
    assert main(["train", "simclrr"]) == 2
    assert "simclr" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_recipes_lists_methods_with_cookbook_sections(capsys):
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert "simclr" in text and "byol" in text and "fmnist-long" in text and "§2.2" in text


def test_one_did_you_mean_for_every_unknown_name():
    from selfsup.data.datasets import canonical_name
    from selfsup.names import did_you_mean

    assert did_you_mean("resnt18", ["resnet18", "vit_tiny"]) == " Did you mean 'resnet18'?"
    assert did_you_mean("zzzz", ["resnet18"]) == ""
    for call, expected in ((lambda: get_method("simclrr"), "Did you mean 'simclr'?"),
                           (lambda: canonical_name("cifar1O"), "Did you mean 'cifar10'?"),
                           (lambda: build_config("simclr", ["optim.base_lrr=1"], params_cls=get_method("simclr").params_cls),
                            "Did you mean 'optim.base_lr'?")):
        with pytest.raises((KeyError, ValueError)) as e:
            call()
        assert expected in str(e.value)
