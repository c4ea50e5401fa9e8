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


# ------------------------------------------------------------------------------------------- recipe inheritance


def test_a_recipe_states_only_what_differs_from_the_recipe_it_extends():
    from selfsup.config import load_recipe

    default, long = _cfg("simclr").to_dict(), _cfg("simclr", "recipe=fmnist-long").to_dict()
    changed = {k for k in long if long[k] != default[k]}
    assert changed == {"recipe", "description", "epochs", "optim", "train"}
    assert (long["epochs"], long["optim"]["warmup_epochs"], long["train"]["knn_every"]) == (64, 2, 8)
    assert long["train"]["budget"] == "50m" and default["train"]["budget"] is None
    assert {k: v for k, v in long["train"].items() if k not in ("budget", "knn_every")} == \
        {k: v for k, v in default["train"].items() if k not in ("budget", "knn_every")}
    assert {k: v for k, v in long["optim"].items() if k != "warmup_epochs"} == \
        {k: v for k, v in default["optim"].items() if k != "warmup_epochs"}
    # the dataset preset under every Fashion-MNIST recipe, its own keys on top
    preset = load_recipe("simclr", "datasets/fashion_mnist")
    for method in ("simclr", "byol", "dino"):
        cfg = _cfg(method)
        assert cfg.data.name == "fashion_mnist" and cfg.views.size == 28 and cfg.views.saturation == 0.0
        assert cfg.model.backbone == preset["model"]["backbone"] and cfg.description != preset["description"]


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_extends_merges_section_by_section_in_order(tmp_path):
    from selfsup.config import load_recipe

    _write(tmp_path, "datasets/tiny.yaml", "description: preset\ndata: {name: mnist}\nviews: {size: 16, hue: 0.0}\n")
    _write(tmp_path, "m/base.yaml", "description: base\nepochs: 5\nviews: {size: 20, contrast: 0.1}\n")
    _write(tmp_path, "m/child.yaml", "extends: [datasets/tiny, base]\nviews: {contrast: 0.3}\noptim: {base_lr: 1}\n")
    tree = load_recipe("m", "child", root=tmp_path)
    # later bases win over earlier ones, the file over its bases; sections merge key by key
    assert tree == {"data": {"name": "mnist"}, "epochs": 5, "views": {"size": 20, "hue": 0.0, "contrast": 0.3},
                    "optim": {"base_lr": 1}}  # descriptions are never inherited


def test_extends_reports_a_missing_base_and_a_circle(tmp_path):
    from selfsup.config import load_recipe

    _write(tmp_path, "m/a.yaml", "extends: b\n")
    _write(tmp_path, "m/b.yaml", "extends: a\n")
    _write(tmp_path, "m/c.yaml", "extends: datasets/nope\n")
    with pytest.raises(ConfigError, match="circle: a -> b -> a"):
        load_recipe("m", "a", root=tmp_path)
    with pytest.raises(ConfigError, match="'c' extends 'datasets/nope', which does not exist"):
        load_recipe("m", "c", root=tmp_path)


def test_yaml_boolean_words_reach_word_settings():
    """YAML 1.1 reads off/on/yes/no and true/false as booleans; the settings that take words get their word."""
    cfg = _cfg("simclr", "train.collapse=off", "train.channels_last=true", "eval.linear=no", "eval=off")
    assert (cfg.train.collapse, cfg.train.channels_last) == ("off", "true")
    assert cfg.eval.linear is False and cfg.eval.enabled is False


def test_logger_and_data_keys_and_what_follows_the_images():
    cfg = _cfg("simclr", "train.wandb=true", "train.wandb_mode=offline", "data=hf", "data.image_column=img")
    assert cfg.train.wandb and cfg.data.name == "hf" and cfg.data.image_column == "img"
    assert cfg.follow_images == {"views.size", "views.local_size"}  # another dataset than the recipe's
    assert "follow_images" not in cfg.to_dict()  # bookkeeping, not a setting: never saved ...
    with pytest.raises(ConfigError, match="unknown config key 'follow_images'"):  # ... nor set
        _cfg("simclr", "follow_images=[]")
    with pytest.raises(ConfigError, match="train.wandb_mode='sometimes' is not one of online, offline"):
        _cfg("simclr", "train.wandb_mode=sometimes")
    assert _cfg("simclr", "data=hf", "views.local_size=8").follow_images == {"views.size"}
    assert not _cfg("simclr", "data=hf", "views.size=24").follow_images
