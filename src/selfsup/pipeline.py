"""`selfsup train` as a function: data -> method -> train -> evaluate.

Each step lives in its own module and none imports the next: :mod:`selfsup.runs` loads the data and builds the
method by name, :mod:`selfsup.train` trains whatever method it is given, :mod:`selfsup.evaluate.run` evaluates the
run directory. This module chains them, for the CLI and for Python::

    from selfsup.config import build_config
    from selfsup.pipeline import pretrain
    summary = pretrain(build_config("simclr", ["epochs=2", "out=runs/try"]))
"""

from __future__ import annotations

import time
from pathlib import Path

from selfsup.checks import check_before_training
from selfsup.config import Config
from selfsup.data.datasets import ImageDataset, describe_data
from selfsup.evaluate.run import evaluate_run
from selfsup.runs import build_method, load_data, resume_state, settle_sizes
from selfsup.runtime import save_json
from selfsup.train import train


def pretrain(cfg: Config, train_data: ImageDataset | None = None, test_data: ImageDataset | None = None, *,
             state: dict | None = None) -> dict:
    """Train ``cfg.method`` and evaluate it; returns the summary written to ``RUN_DIR/summary.json``.

    ``train_data``/``test_data`` let Python users pass in-memory datasets (:func:`selfsup.data.from_arrays`) instead
    of ``cfg.data``. ``state``: the checkpoint a resume continues from, when the caller has read it already
    (:func:`selfsup.runs.open_resume`); otherwise ``cfg.resume`` is honoured here. Every process of a distributed
    run calls this; only rank 0 evaluates and returns the summary (the others return ``{}``).
    """
    t0 = time.time()
    check_before_training(cfg, resuming=state is not None or cfg.resume is not None)  # before any data or file
    if train_data is None:
        train_data, test_data = load_data(cfg)
    settle_sizes(cfg, train_data)  # views.size follows the images unless chosen; before the method and config.yaml
    info = describe_data(train_data, cfg.data.name)
    if state is None and cfg.resume is not None:
        state = resume_state(cfg)
    method = build_method(cfg, info)
    trained = train(cfg, method, train_data, test_data, data=info, state=state)
    if not trained.summary:
        return {}
    if not cfg.eval.enabled:
        print(f"selfsup: eval=false: no evaluation; run it later with `selfsup eval {cfg.out}`", flush=True)
        return trained.summary
    summary = evaluate_run(Path(cfg.out), cfg, train_data, test_data, method=trained.method, device=trained.device,
                           probe=trained.probe)
    summary["total_seconds"] = round(time.time() - t0, 1)
    save_json(Path(cfg.out) / "summary.json", summary)
    return summary
