"""Training curves from a run's ``metrics.jsonl``: loss, learning rate, and kNN / online-probe accuracy.

Uses matplotlib's object API (``Figure`` + Agg canvas), so it never touches pyplot's global backend and works on
headless machines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfsup.report.html import is_number


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file, one JSON object per line; blank, truncated or non-object lines are skipped
    (a run killed mid-write leaves a partial last line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; a training run writes <run_dir>/metrics.jsonl.")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _series(records: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    """``(x, y)`` of the records holding a finite ``key``; x is ``x_key`` or the record's position if absent."""
    xs, ys = [], []
    for i, record in enumerate(records):
        if is_number(record.get(key)):
            x = record.get(x_key)
            xs.append(x if is_number(x) else i)
            ys.append(record[key])
    return xs, ys


def _x_key(records: list[dict], keys: tuple[str, ...]) -> str:
    """ "step" when every record carrying one of ``keys`` has a step, else "epoch" when they all have one."""
    relevant = [r for r in records if any(is_number(r.get(k)) for k in keys)]
    for candidate in ("step", "epoch"):
        if relevant and all(is_number(r.get(candidate)) for r in relevant):
            return candidate
    return "step"


def smooth(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing) with ``alpha = 2 / (span + 1)``."""
    alpha, avg, out = 2.0 / (span + 1), 0.0, []
    for i, v in enumerate(values, start=1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _new_axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_loss(records: list[dict], out: Path) -> Path | None:
    x_key = _x_key(records, ("loss",))
    xs, ys = _series(records, "loss", x_key)
    if not xs:
        return None
    fig, ax = _new_axes("Training loss", x_key, "loss")
    ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(xs, smooth(ys, span=max(1, len(ys) // 50)), color="tab:blue", linewidth=1.8, label="smoothed")
    ax.legend()
    return _save(fig, out / "loss.png")


def _plot_lr(records: list[dict], out: Path) -> Path | None:
    x_key = _x_key(records, ("lr",))
    xs, ys = _series(records, "lr", x_key)
    if not xs:
        return None
    fig, ax = _new_axes("Learning rate", x_key, "learning rate")
    ax.plot(xs, ys, color="tab:orange")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _save(fig, out / "lr.png")


def _plot_accuracy(records: list[dict], out: Path) -> Path | None:
    """knn.png with kNN top-1 (and online probe accuracy when logged); online_probe.png if only the probe exists."""
    keys = (("knn_top1", "kNN top-1", "tab:green"), ("online_probe_acc", "online linear probe", "tab:purple"))
    x_key = _x_key(records, tuple(k for k, _, _ in keys))
    series = [(label, color, *_series(records, key, x_key)) for key, label, color in keys]
    series = [s for s in series if s[2]]
    if not series:
        return None
    name = "knn.png" if series[0][0] == "kNN top-1" else "online_probe.png"
    fig, ax = _new_axes("Accuracy during training", x_key, "top-1 accuracy (%)")
    for label, color, xs, ys in series:
        ax.plot(xs, ys, color=color, marker="o" if len(xs) <= 50 else None, markersize=3, label=label)
    ax.legend()
    return _save(fig, out / name)


def plot_training(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png and knn.png (each only when its records exist) into ``out_dir``; return their paths.

    Accuracies (``knn_top1``, ``online_probe_acc``) are expected in percent. The x axis is the step when every
    plotted record has one, otherwise the epoch.
    """
    records = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot(records, out) for plot in (_plot_loss, _plot_lr, _plot_accuracy)]
    return [p for p in written if p is not None]


def plot_confusion(confusion, labels: list[str], path: str | Path, annotate_max: int = 20) -> Path:
    """Heat map of a ``(C, C)`` confusion matrix (row = true class, column = predicted), each row divided by its
    total so that classes of different sizes read alike; counts are written in the cells when ``C <= annotate_max``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or len(labels) != cm.shape[0]:
        raise ValueError(f"confusion must be square with one label per row; got shape {cm.shape} and "
                         f"{len(labels)} labels")
    c = cm.shape[0]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(11.0, 2.5 + 0.45 * c)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(c) if c <= 40 else np.arange(0, c, max(1, c // 20))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title="Linear probe: confusion matrix (test split)")
    if c <= annotate_max:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "#1f2328")
    return _save(fig, Path(path))
