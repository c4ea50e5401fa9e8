"""Bad configs are refused before any work: exit code 2, a message naming the key and the fix, nothing written.

Each case runs the real command line in this process (``selfsup.cli.main``) from an empty working directory, with
``data.download=false`` and a data root that holds nothing: a check that came after the data was read would fail
with a data error (exit 1) instead, and one that came after the run directory was written would leave files.
"""

from __future__ import annotations

import dataclasses

import pytest

from selfsup.checks import check_method_params
from selfsup.cli import main
from selfsup.config import ConfigError, build_config, recipe_names
from selfsup.methods import REGISTRY, get_method

# (override, a phrase the message must hold)
BAD = [
    ("simclr.temperature=-0.1", "simclr.temperature"),  # trains an inverted objective if accepted
    ("simclr.temperature=0", "simclr.temperature"),
    ("model.projector_out=0", "model.projector_out"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("train.max_steps=-1", "0 means all epochs"),
    ("train.num_threads=-2", "train.num_threads"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("data.image_size=0", "data.image_size"),
    ("method=byol", "drop method="),
    ("train.log_every=0", "train.log_every"),
    ("model.patch_size=0", "model.patch_size"),
    ("train.device=tpu", "not a device"),
    ("train.device=cuda:7", "train.device=cuda:7"),
    ("eval.knn_k=0", "eval.knn_k"),
    ("train.knn_monitor_size=0", "train.knn_monitor_size"),
    ("optim.base_lr=.nan", "not a finite number"),
    ("optim.base_lr=.inf", "not a finite number"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("epochs=0", "epochs"),
    ("batch_size=-8", "batch_size"),
    ("views.scale=[0.9,0.2]", "views.scale"),
    ("views.hflip_p=1.5", "views.hflip_p"),
    ("views.n_local=2 views.local_size=96", "views.local_size"),
    ("batch_size=100 train.accumulate=3", "train.accumulate"),
    ("eval.knn_temperature=0", "eval.knn_temperature"),
    ("train.probe_lr=-1", "train.probe_lr"),
    ("resume=missing.pt", "no such checkpoint"),
    ("epochs=two", "expects an integer"),
    ("optim.lr=0.1", "unknown config key 'optim.lr'"),
]


def _run(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "no-data"))
    code = main(["train", "simclr", *args, "data.download=false"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override,phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_before_any_work(override, phrase, tmp_path, monkeypatch, capsys):
    code, err = _run([*override.split(), "out=run"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert "config error" in err and phrase in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused config wrote files"


def test_out_pointing_at_a_file_names_the_problem(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = _run(["out=notes.txt"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "is a file, not a folder" in err and "File exists" not in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    code, err = _run(["out=notes.txt/run"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "notes.txt is a file" in err


def test_over_long_out_is_refused(tmp_path, monkeypatch, capsys):
    code, err = _run(["out=" + "r" * 300], tmp_path, monkeypatch, capsys)
    assert code == 2 and "255" in err and "Traceback" not in err


def test_new_run_into_a_directory_holding_a_run_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "config.yaml").write_text("method: byol\n")
    code, err = _run(["out=old"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "already holds a run" in err and "resume=auto" in err
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["checkpoints", "config.yaml"]


def test_resume_into_another_methods_run_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "old").mkdir()
    cfg = build_config("byol", params_cls=get_method("byol").params_cls)
    import yaml

    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    code, err = _run(["resume=auto", "out=old"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "'byol' run, not 'simclr'" in err


def test_batch_not_divisible_over_processes_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = _run(["batch_size=256", "out=run"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "3 process(es)" in err and "batch_size=255" in err
    assert not (tmp_path / "run").exists()


def test_every_shipped_recipe_passes_the_checks():
    """The rules must not refuse what we ship (every recipe of every method builds)."""
    for name, entry in sorted(REGISTRY.items()):
        for recipe in recipe_names(name):
            build_config(name, [f"recipe={recipe}"], params_cls=entry.params_cls)


def _out_of_range(name: str, value):
    """A value the name rules of selfsup.checks must refuse, or None when the parameter has no rule."""
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return None
    if isinstance(value, int):
        return -1
    if isinstance(value, float):
        return -0.5 if name != "crop_scale_min" else 0.0
    if isinstance(value, list):
        return [0]
    return None


def test_every_method_parameter_with_a_rule_refuses_a_bad_value():
    """Every method's parameters, one at a time: ints (counts, sizes, epochs) refuse -1; temperatures, momenta,
    ratios, weights refuse -0.5. Floats with no rule in selfsup.checks are listed, so a new one is a decision."""
    unruled = set()
    for name, entry in sorted(REGISTRY.items()):
        if entry.params_cls is None:
            continue
        for f in dataclasses.fields(entry.params_cls):
            default = getattr(entry.params_cls(), f.name)
            bad = _out_of_range(f.name, default)
            if bad is None:
                continue
            params = dataclasses.replace(entry.params_cls(), **{f.name: bad})
            try:
                check_method_params(name, params)
            except ConfigError as e:
                assert f"{name}.{f.name}=" in str(e)
            else:
                unruled.add(f"{name}.{f.name}")
    # finite numbers with no sign rule: a tuple range is checked separately; a seed may be any value >= 0
    assert unruled == set(), f"parameters with no range rule: {sorted(unruled)}"


def test_range_parameters_are_checked():
    """I-JEPA's block scales are fractions of the image and its aspect ratios positive ranges (lo <= hi)."""
    p = get_method("ijepa").params_cls
    for bad in ({"target_scale": (0.3, 0.2)}, {"context_scale": (0.5, 1.5)}, {"target_aspect": (0.0, 1.5)}):
        with pytest.raises(ConfigError, match=f"ijepa.{next(iter(bad))}="):
            check_method_params("ijepa", dataclasses.replace(p(), **bad))
