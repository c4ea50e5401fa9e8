"""Where a run's metrics go: ``RUN/metrics.jsonl`` always (rank 0; the report and ``selfsup compare`` read it),
TensorBoard when it is installed, Weights & Biases when ``train.wandb=true``.

W&B is an optional extra (``pip install 'selfsup[wandb]'``). Its run gets the resolved config (``wandb.config``)
and every numeric scalar of a record at the record's step. Its id is kept in ``RUN/wandb/run_id``, so a resumed
run continues the same W&B run (``resume="allow"``). ``train.wandb_mode=offline`` needs no account: the run is
written under ``RUN/wandb/offline-run-*`` and uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from selfsup.config import Config
from selfsup.runtime import atomic_write_bytes, write_error

WANDB_ID_FILE = "wandb/run_id"


class Logger:
    """metrics.jsonl always (rank 0), TensorBoard when installed, W&B when ``cfg.train.wandb``; nothing elsewhere.

    ``start_step``: a resumed run's step; the records of later steps (they will be redone) are dropped from
    metrics.jsonl. ``cfg``: the run's config (None: no W&B, no hint line; for callers that only need the files).
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, cfg: Config | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():
            _drop_records_after(self.path, start_step)
        self.tb = _tensorboard(run_dir)
        if cfg is not None and cfg.train.wandb:
            self.wandb = _wandb_run(run_dir, cfg)
        if cfg is not None:
            print(logs_hint(run_dir, self.tb is not None, self.wandb), flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file and the fix (the checkpoints hold the run)
            raise write_error(self.path, e, note="the records written before are intact") from e
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None and record["step"] >= self.wandb.step:  # W&B refuses steps it has passed
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _drop_records_after(path: Path, start_step: int) -> None:
    """A resumed run: drop the records of steps that will be redone (and a line cut short by a kill or a full disk),
    atomically: a kill now loses nothing."""
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= start_step:
                keep.append(ln)
        except (ValueError, AttributeError):
            continue
    atomic_write_bytes(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # tensorboard is an optional extra
        return None


def import_wandb():
    """The ``wandb`` module, or an ImportError that names the install command."""
    try:
        import wandb
    except ImportError:
        raise ImportError("train.wandb=true needs the wandb package, which is not installed: pip install "
                          "'selfsup[wandb]' (or pip install wandb), or drop train.wandb") from None
    return wandb


def _wandb_run(run_dir: Path, cfg: Config):
    """Start (or, with the id a previous session saved, continue) the run's W&B run."""
    wandb = import_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), id=run_id, resume="allow",
                          name=run_dir.name, config=cfg.to_dict(), mode=cfg.train.wandb_mode,
                          settings=wandb.Settings(silent=True, console="off", disable_git=True))
    except Exception as e:  # noqa: BLE001 - wandb raises its own errors (no API key, no network, ...)
        fix = ("log in with `wandb login` (or set WANDB_API_KEY), or log offline with train.wandb_mode=offline and "
               "upload later with `wandb sync`" if cfg.train.wandb_mode == "online" else "check RUN/wandb/debug.log")
        raise RuntimeError(f"Weights & Biases could not start the run ({type(e).__name__}: {e}); {fix}, or drop "
                           "train.wandb") from e


def logs_hint(run_dir: Path, tensorboard: bool, wandb_run) -> str:
    """One line: where this run's logs go and how to look at them."""
    parts = [f"selfsup: logs: {run_dir / 'metrics.jsonl'}"]
    parts.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}" if tensorboard else
                 "TensorBoard: pip install 'selfsup[tensorboard]'")
    if wandb_run is not None:
        if wandb_run.offline:
            parts.append(f"W&B: offline in {run_dir / 'wandb'} (upload: wandb sync {run_dir / 'wandb'}/offline-run-*)")
        else:
            parts.append(f"W&B: {wandb_run.url}")
    return ", ".join(parts)
