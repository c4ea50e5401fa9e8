"""`selfsup compare RUN_DIR...`: rank runs by RankMe and by probe accuracy side by side (cookbook §3.7.2, Table 3).

Garrido et al. (2023) pick hyper-parameters by the highest RankMe of the backbone embeddings and lose little accuracy
against picking them with labels; this page makes that claim checkable on one's own sweep: Spearman rank
correlation, the run each criterion picks, and the accuracy lost against the labeled choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from selfsup.report import html as h


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ascending, ties sharing the mean of their positions (as scipy.stats.rankdata)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties handled as scipy does).

    None when it is undefined: fewer than 2 pairs, or one side constant.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of the same length, got {len(x)} and {len(y)}.")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None


def _hparams_text(hparams) -> str:
    if isinstance(hparams, dict):
        return ", ".join(f"{k}={h.short(v)}" for k, v in hparams.items())
    return "" if hparams is None else str(hparams)


def _pick(rows: list[dict], key: str, score) -> dict | None:
    """The row with the highest ``score(row[key])`` among rows holding a number under ``key`` (first on ties)."""
    candidates = [r for r in rows if h.is_number(r.get(key))]
    return max(candidates, key=lambda r: score(r[key])) if candidates else None


def compare_summary(rows: list[dict]) -> dict:
    """Spearman correlations and the run each criterion picks, with the accuracy lost against the labeled oracle.

    The accuracy is linear top-1 when any run has it, else kNN top-1. Criteria: the accuracy itself (the oracle,
    which needs labels), RankMe (highest; Garrido et al. 2023) and alpha-ReQ (closest to 1: Agrawal et al. 2022
    find good generalization in a band of alpha around 1; this rule is this module's reading of their paper).
    Cookbook Table 3 reports the same comparison on ImageNet. Ties go to the first row.
    """
    acc_key = "linear_top1" if any(h.is_number(r.get("linear_top1")) for r in rows) else "knn_top1"
    both = [r for r in rows if h.is_number(r.get("rankme")) and h.is_number(r.get(acc_key))]
    with_alpha = [r for r in rows if h.is_number(r.get("alpha_req")) and h.is_number(r.get(acc_key))]
    oracle = _pick(rows, acc_key, lambda v: v)
    picks = {"oracle": oracle, "rankme": _pick(rows, "rankme", lambda v: v),
             "alpha_req": _pick(rows, "alpha_req", lambda v: -abs(v - 1.0))}
    lost = {}
    for name, row in picks.items():
        if row is not None and oracle is not None and h.is_number(row.get(acc_key)):
            lost[name] = oracle[acc_key] - row[acc_key]
    return {
        "accuracy_key": acc_key,
        "spearman_rankme": spearman([r["rankme"] for r in both], [r[acc_key] for r in both]),
        "n_rankme": len(both),
        "spearman_alpha_req": spearman([r["alpha_req"] for r in with_alpha], [r[acc_key] for r in with_alpha]),
        "n_alpha_req": len(with_alpha),
        "picks": {k: (None if v is None else v.get("name")) for k, v in picks.items()},
        "accuracy_lost": lost,
    }


MIN_RUNS_FOR_CORRELATION = 4  # with 3 runs a rank correlation takes one of 4 values (+-1, +-0.5): noise, not a trend


def correlation_text(value: float | None, n: int) -> str:
    """A Spearman correlation with its run count, and a caveat under :data:`MIN_RUNS_FOR_CORRELATION` runs."""
    if value is None:
        return f"undefined ({n} runs with both numbers; needs 2 or more with different values)"
    caveat = (f" (only {n} runs: a rank correlation over fewer than {MIN_RUNS_FOR_CORRELATION} runs is not evidence "
              "of a trend)" if n < MIN_RUNS_FOR_CORRELATION else "")
    return f"{value:.2f} over {n} runs{caveat}"


def compare_text(rows: list[dict], summary: dict | None = None) -> str:
    """The comparison as plain text for the terminal: one line per run (best accuracy first), the correlations and
    the run each criterion picks."""
    summary = summary or compare_summary(rows)
    acc_key = summary["accuracy_key"]

    def cell(v, digits=2):
        return f"{v:.{digits}f}" if h.is_number(v) else "-"

    width = max([len(str(r.get("name", ""))) for r in rows] + [3])
    lines = [f"{'run':<{width}}  {'kNN':>6}  {'linear':>6}  {'RankMe':>7}  {'a-ReQ':>5}  hyper-parameters"]
    order = sorted(rows, key=lambda r: -r[acc_key] if h.is_number(r.get(acc_key)) else float("inf"))
    for r in order:
        lines.append(f"{str(r.get('name', '')):<{width}}  {cell(r.get('knn_top1')):>6}  {cell(r.get('linear_top1')):>6}"
                     f"  {cell(r.get('rankme'), 1):>7}  {cell(r.get('alpha_req')):>5}  {_hparams_text(r.get('hparams'))}")
    label = "linear top-1" if acc_key == "linear_top1" else "kNN top-1"
    lines.append(f"Spearman with {label}: RankMe {correlation_text(summary['spearman_rankme'], summary['n_rankme'])}; "
                 f"a-ReQ {correlation_text(summary['spearman_alpha_req'], summary['n_alpha_req'])}")
    picks = summary["picks"]
    lost = summary["accuracy_lost"]
    lines.append("picks: " + "; ".join(
        f"{what} -> {picks[key]}" + (f" ({lost[key]:.2f} pts below the best)" if h.is_number(lost.get(key)) and
                                     key != "oracle" else "")
        for key, what in (("oracle", f"best {label}"), ("rankme", "highest RankMe"), ("alpha_req", "a-ReQ nearest 1"))
        if picks.get(key) is not None))
    return "\n".join(lines)


def plot_rankme_vs_accuracy(rows: list[dict], acc_key: str, path: Path) -> Path | None:
    """Scatter of RankMe against accuracy, one labeled point per run."""
    points = [r for r in rows if h.is_number(r.get("rankme")) and h.is_number(r.get(acc_key))]
    if not points:
        return None
    fig = Figure(figsize=(7.0, 4.6), dpi=100)
    ax = fig.add_subplot()
    xs, ys = [r["rankme"] for r in points], [r[acc_key] for r in points]
    ax.scatter(xs, ys, s=36, color="tab:blue", zorder=3)
    for i, r in enumerate(points):
        ax.annotate(str(r.get("name", i)), (r["rankme"], r[acc_key]), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -12), fontsize=8.5)
    ax.set(xlabel="RankMe (no labels)", ylabel=f"{acc_key.replace('_top1', '')} top-1 (%)",
           title="RankMe vs accuracy across runs")
    ax.margins(x=0.2, y=0.12)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return h.save_png(fig, path)


def _ranked_table(rows: list[dict], key: str, acc_key: str, title: str) -> str:
    ranked = sorted([r for r in rows if h.is_number(r.get(key))], key=lambda r: -r[key])
    other = "rankme" if key != "rankme" else acc_key
    cells = []
    for i, r in enumerate(ranked, 1):
        fmt_key = h.num(r[key], 1) if key == "rankme" else h.pct(r[key])
        fmt_other = h.num(r.get(other), 1) if other == "rankme" else h.pct(r.get(other))
        cells.append([(str(i), "num"), (h.esc(r.get("name", "?")), ""), (fmt_key, "num"), (fmt_other, "num")])
    label = {"rankme": "RankMe", "linear_top1": "Linear top-1", "knn_top1": "kNN top-1"}
    headers = [("#", "num"), ("run", ""), (h.esc(label[key]), "num"), (h.esc(label[other]), "num")]
    return f"<div><h3>{h.esc(title)}</h3>{h.table(headers, cells)}</div>"


def write_compare_report(out_dir: str | Path, rows: list[dict]) -> Path:
    """Write ``out_dir/compare.html`` for ``selfsup compare RUN_DIR...`` and return its path.

    Each row: ``name``, ``hparams`` (dict or text), and the numbers ``rankme``, ``alpha_req``, ``knn_top1``,
    ``linear_top1`` (any may be missing). The page shows every run, the runs ranked by RankMe and by accuracy side
    by side, the Spearman rank correlation, the run each criterion picks with the accuracy lost against the
    labeled choice (cookbook Table 3), and a RankMe-vs-accuracy scatter plot.
    """
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("write_compare_report needs at least one run row; pass the eval results of the runs.")
    for i, r in enumerate(rows):
        r.setdefault("name", f"run {i + 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = compare_summary(rows)
    acc_key = summary["accuracy_key"]
    acc_label = "linear top-1" if acc_key == "linear_top1" else "kNN top-1"

    runs = h.table([("run", ""), ("hyper-parameters", ""), ("RankMe", "num"), ("α-ReQ", "num"),
                   ("kNN top-1", "num"), ("Linear top-1", "num")],
                  [[(h.esc(r["name"]), ""), (f'<span class="muted">{h.esc(_hparams_text(r.get("hparams")))}</span>', ""),
                    (h.num(r.get("rankme"), 1), "num"), (h.num(r.get("alpha_req")), "num"),
                    (h.pct(r.get("knn_top1")), "num"), (h.pct(r.get("linear_top1")), "num")] for r in rows])
    side = ('<div class="side">' + _ranked_table(rows, "rankme", acc_key, "Ranked by RankMe (no labels)")
            + _ranked_table(rows, acc_key, acc_key, f"Ranked by {acc_label} (labels)") + "</div>")

    def rho(value, n) -> str:
        return h.esc(correlation_text(value, n))

    corr = (f"<p>Spearman rank correlation with {h.esc(acc_label)}: RankMe {rho(summary['spearman_rankme'], summary['n_rankme'])}"
            f"; α-ReQ {rho(summary['spearman_alpha_req'], summary['n_alpha_req'])}.</p>")
    by_name = {r["name"]: r for r in rows}
    criteria = (("oracle", f"highest {acc_label} (needs labels)"), ("rankme", "highest RankMe"),
                ("alpha_req", "α-ReQ closest to 1"))
    pick_rows = []
    for key, text in criteria:
        name = summary["picks"][key]
        lost = summary["accuracy_lost"].get(key)
        pick_rows.append([(h.esc(text), ""), (h.esc(name) if name is not None else h.DASH, ""),
                          (h.pct(by_name[name].get(acc_key)) if name is not None else h.DASH, "num"),
                          (f"{lost:.2f} pts" if h.is_number(lost) else h.DASH, "num")])
    picks = "<h3>Which run each criterion picks</h3>" + h.table(
        [("criterion", ""), ("picks", ""), (h.esc(acc_label), "num"), ("accuracy lost vs labels", "num")], pick_rows)
    note = ('<p class="note">RankMe needs no labels and no training; Garrido et al. (2023) show that picking '
            "hyper-parameters by highest RankMe recovers most of the accuracy of picking them on a labeled "
            "validation set (cookbook §3.7.2, Table 3). It compares runs of one method, not different methods.</p>")
    sections = [h.section("runs", "Runs", runs), h.section("ranking", "Rankings", side + corr + picks + note)]
    scatter = plot_rankme_vs_accuracy(rows, acc_key, out / "compare_scatter.png")
    if scatter is not None:
        sections.append(h.section("scatter", "RankMe vs accuracy", h.figure(scatter, "RankMe vs accuracy", width=700)))
    sections.append(h.json_section({"runs": rows, "summary": summary}, "compare data"))
    footer = h.esc("Written by selfsup.report.report. Self-contained: images are embedded, no network access needed.")
    return h.write_html(out / "compare.html", h.page(f"selfsup compare: {len(rows)} runs", "", sections, footer))
