"""Where a run's metrics go (selfsup.loggers): metrics.jsonl, TensorBoard when installed, Weights & Biases when
train.wandb=true, here in offline mode (no network): the history is read back from the offline run's .wandb file,
and a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from selfsup.checks import check_extras
from selfsup.cli import main
from selfsup.config import ConfigError, build_config
from selfsup.loggers import WANDB_ID_FILE, Logger
from selfsup.methods import get_method

FAST = ["epochs=1", "batch_size=64", "model.width=4", "model.projector_hidden=32", "model.projector_out=16",
        "views.size=16", "optim.warmup_epochs=0", "train.knn_every=0", "train.log_every=1", "train.num_threads=1",
        "train.collapse=off", "eval=false"]


def wandb_records(path) -> list:
    """The protobuf records of a ``run-ID.wandb`` file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(path) -> dict[int, dict]:
    """``{step: {key: value}}`` of the scalars logged to an offline run (W&B's own ``_*`` keys left out)."""
    out = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B without network or home-directory files."""
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_gets_the_history_and_a_resume_continues_the_run(tiny_fmnist, tmp_path, offline, capsys,
                                                                        one_thread):
    out = tmp_path / "run"
    args = ["train", "simclr", f"data.root={tiny_fmnist}", f"out={out}", *FAST, "train.wandb=true",
            "train.wandb_mode=offline", "train.wandb_project=first-hour"]
    assert main([*args, "train.max_steps=2"]) == 0  # 2 of the epoch's 4 steps
    printed = capsys.readouterr().out
    assert (f"logs: {out / 'metrics.jsonl'}" in printed
            and f"W&B: offline in {out / 'wandb'} (upload: wandb sync {out / 'wandb'}/offline-run-*)" in printed)
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    (first,) = sorted(out.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    jsonl = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    logged = history(first)
    assert sorted(logged) == [1, 2]
    for step in (1, 2):  # the same scalars as metrics.jsonl, at the same steps
        assert logged[step]["loss"] == pytest.approx(jsonl[step]["loss"], rel=1e-6)
        assert logged[step]["lr"] == pytest.approx(jsonl[step]["lr"], rel=1e-6)
    (run_record,) = [r.run for r in wandb_records(first) if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_id and run_record.project == "first-hour"
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["method"] == "simclr" and config["views"]["size"] == 16

    assert main(["train", "simclr", "resume=auto", f"out={out}", "train.max_steps=0"]) == 0  # steps 3 and 4
    assert (out / WANDB_ID_FILE).read_text().strip() == run_id
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in runs)  # the same W&B run, continued
    assert sorted(history(runs[1])) == [3, 4]


def test_without_wandb_installed_the_error_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    cfg = build_config("simclr", ["train.wandb=true"], params_cls=get_method("simclr").params_cls)
    with pytest.raises(ConfigError, match=r"train.wandb=true needs the wandb package.*pip install 'selfsup\[wandb\]'"):
        check_extras(cfg)
    with pytest.raises(ImportError, match=r"pip install 'selfsup\[wandb\]'"):
        Logger(tmp_path, True, 0, cfg)


def test_jsonl_only_without_wandb_and_a_resume_drops_redone_steps(tmp_path, capsys):
    cfg = build_config("simclr", [], params_cls=get_method("simclr").params_cls)
    logger = Logger(tmp_path, True, 0, cfg)
    assert logger.wandb is None and f"logs: {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().out
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    Logger(tmp_path, True, 2, cfg).close()  # resumed at step 2: step 3 will be redone
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
