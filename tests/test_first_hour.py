"""What a user meets in the first hour on the command line: --version, the sections in --help, eval=false, a log
line every train.log_every steps and one per checkpoint when there is no terminal, a warning for a warm-up that
covers the whole run (issue "A user's first hour")."""

from __future__ import annotations

import json

import pytest

from selfsup import __version__
from selfsup.cli import main

FAST = ["epochs=2", "batch_size=64", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
        "views.size=16", "optim.warmup_epochs=1", "train.knn_every=0", "train.log_every=2", "train.num_threads=1"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"selfsup {__version__}"


def test_train_help_lists_the_config_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for section in ("data.*", "model.*", "views.*", "optim.*", "train.*", "eval.*", "METHOD.*", "eval=false"):
        assert section in out, section


def test_eval_false_skips_the_evaluation_and_logs_without_a_terminal(tiny_fmnist, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["train", "simclr", f"data.root={tiny_fmnist}", f"out={out}", *FAST, "eval=false"]) == 0
    printed = capsys.readouterr().out
    assert not (out / "eval.json").exists() and "knn_top1" not in json.loads((out / "summary.json").read_text())
    assert f"selfsup eval {out}" in printed
    # pytest's stdout is no terminal: a line per metrics record (steps 2 and 6; 4 and 8 end epochs) and checkpoint
    assert "step 2/8 epoch 0.50 loss" in printed and "step 6/8 epoch 1.50 loss" in printed
    assert "epoch 1/2 step 4/8" in printed
    assert f"checkpoint: step 4 -> {out / 'checkpoints/last.pt'}" in printed
    assert f"checkpoint: step 8 -> {out / 'checkpoints/last.pt'}" in printed
    # the evaluation runs later, on the run directory
    assert main(["eval", str(out), "eval.mlp=false", "eval.rotation=false", "eval.lidar_images=0",
                 "eval.report=false", "eval.guillotine=false", "eval.linear_epochs=2"]) == 0
    assert (out / "eval.json").exists()


def test_a_warm_up_covering_the_whole_run_is_warned_about(tiny_fmnist, tmp_path, capsys, one_thread):
    args = ["train", "simclr", f"data.root={tiny_fmnist}", f"out={tmp_path / 'run'}", *FAST, "eval=false",
            "optim.warmup_epochs=2"]
    assert main(args) == 0
    assert "optim.warmup_epochs=2 covers the whole run (2 epochs)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# selfsup compare


def _fake_run(folder, data_name, temperature, knn, linear, rankme):
    """A run directory as `selfsup compare` reads it: config.yaml and an eval.json with RankMe (not re-evaluated)."""
    import yaml

    from selfsup.config import build_config
    from selfsup.methods import get_method

    cfg = build_config("simclr", [f"data.name={data_name}", f"simclr.temperature={temperature}"],
                       params_cls=get_method("simclr").params_cls)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (folder / "eval.json").write_text(json.dumps({"knn_top1": knn, "linear_top1": linear,
                                                  "label_free": {"rankme": {"value": rankme},
                                                                 "alpha_req": {"alpha": 1.0}}}))
    return folder


def test_compare_prints_its_table_and_a_caveat_under_four_runs(tmp_path, capsys):
    runs = [_fake_run(tmp_path / f"t{t}", "fashion_mnist", t, k, lin, r)
            for t, k, lin, r in [(0.1, 84.0, 87.0, 80.0), (0.2, 85.0, 88.5, 90.0), (0.5, 83.0, 86.0, 60.0)]]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("run "):].splitlines()
    assert [ln.split()[0] for ln in table[1:4]] == ["t0.2", "t0.1", "t0.5"]  # best linear first
    assert "88.50" in table[1] and "simclr.temperature=0.2" in table[1]
    assert "Spearman with linear top-1: RankMe 1.00 over 3 runs (only 3 runs" in out
    assert "highest RankMe -> t0.2" in out
    html = (tmp_path / "cmp/compare.html").read_text()
    assert "fewer than 4 runs is not evidence" in html
    four = [*runs, _fake_run(tmp_path / "t1.0", "fashion_mnist", 1.0, 80.0, 84.0, 40.0)]
    assert main(["compare", *map(str, four), "--out", str(tmp_path / "cmp4")]) == 0
    assert "RankMe 1.00 over 4 runs;" in capsys.readouterr().out


def test_compare_refuses_runs_on_different_datasets(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "fashion_mnist", 0.1, 84.0, 87.0, 80.0)
    b = _fake_run(tmp_path / "b", "cifar10", 0.1, 70.0, 75.0, 90.0)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "different data (a: fashion_mnist, b: cifar10)" in err and not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --show-config: anywhere on the line, each key with its comment, still YAML


@pytest.mark.parametrize("argv", [["train", "simclr", "--show-config", "epochs=3"],
                                  ["train", "--show-config", "simclr", "epochs=3"],
                                  ["train", "simclr", "epochs=3", "--show-config"]])
def test_show_config_anywhere_prints_commented_yaml_that_loads_back(argv, capsys):
    import yaml

    from selfsup.config import build_config
    from selfsup.methods import get_method

    assert main(argv) == 0
    text = capsys.readouterr().out
    cfg = build_config("simclr", ["epochs=3"], params_cls=get_method("simclr").params_cls)
    assert yaml.safe_load(text) == cfg.to_dict()
    lines = text.splitlines()
    out_line = next(ln for ln in lines if ln.startswith("out:"))
    assert out_line.split("#", 1)[1].strip() == "run directory (default runs/<method>-<time>)"
    temperature = next(ln for ln in lines if ln.strip().startswith("temperature:"))
    assert "# SimCLR Table 5" in temperature  # the method's own params dataclass
    # a comment continued on the next line is joined; a key without a comment has none
    verify = next(ln for ln in lines if ln.strip().startswith("verify:"))
    assert verify.endswith("false for your own files in an official format")
    assert next(ln for ln in lines if ln.strip().startswith("train_split:")).strip() == "train_split: train"
    # comments line up
    assert len({ln.index("  # ") for ln in lines if "  # " in ln and len(ln.split("  # ")[0].rstrip()) < 40}) == 1


def test_field_comments_read_the_source():
    from selfsup.config_doc import field_comments

    assert field_comments(_Commented) == {"a": "first", "b": "second, continued here", "d": "# not a comment end"}


from dataclasses import dataclass  # noqa: E402  (the class below is read back from this file's source)


@dataclass
class _Commented:
    a: int = 1        # first
    b: str = "x # y"  # second,
                      # continued here
    # a comment of its own line, at the field's indentation: nobody's
    c: float = 0.5
    d: list = None    # # not a comment end
