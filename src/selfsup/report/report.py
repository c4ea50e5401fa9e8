"""The human report of `selfsup eval` and `selfsup compare`: one self-contained HTML file (cookbook §3.7).

``report.html`` holds every figure as a base64 PNG data URI, inline h.CSS and no script or external request, so it
opens anywhere (a laptop, a cluster's file browser, an e-mail attachment). Sections appear only when their data
exists, in reading order:

0. at the top, a warning when kNN or linear top-1 is below the pixel baseline; the title names the split the
   accuracies come from;
1. headline numbers (kNN, linear, MLP, online probe, RankMe, alpha-ReQ, LiDAR, rotation), each with its protocol
   so it can be compared with papers (cookbook §3.7.1, §3.7.2), and how to read the label-free ones;
   what good looks like: the run against the pixel baselines and the recipe's reference run;
   the run's settings; per-class accuracy and the confusion matrix of the linear probe;
2. training curves from the run's metrics.jsonl;
3. the guillotine table: probes at the backbone and at each projector layer (cookbook §3.2, Fig. 10);
4. singular-value spectra before/after the projector (dimensional collapse, cookbook §2.6.2, Fig. 9);
5. a t-SNE map of the test embeddings; 6. nearest-neighbour retrieval (cookbook §3.7.4, visual evaluation);
7. protocol details (kNN over k, linear-probe grid, MLP curve); 8. decoder grids and extra images;
9. the raw eval.json.

``compare.html`` (``write_compare_report``) ranks several runs by RankMe and by linear accuracy and measures what
picking hyper-parameters without labels costs (cookbook Table 3, Garrido et al. 2023).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from selfsup.data.datasets import DATASET_INFO, canonical_name
from selfsup.evaluate.retrieval import nearest_neighbors, retrieval_grid
from selfsup.report import html as h
from selfsup.report.embedding_map import embed_2d, plot_embedding_map
from selfsup.report.plots import plot_confusion, plot_training

CLASS_NAMES: dict[str, list[str]] = {
    name: list(info.classes) for name, info in DATASET_INFO.items() if info.classes is not None
}  # fashion_mnist, mnist, cifar10, stl10: the names in selfsup.data.datasets (official class orders)

RETRIEVAL_QUERIES, RETRIEVAL_K = 8, 8
MAP_POINTS = 2000
KNN_HEADLINE_K = 20  # fmnist-knn protocol (DESIGN.md §4), DINO's k



# ----------------------------------------------------------------------------------------------- formatting


def _protocol_extras(protocol: dict | None, used: Sequence[str]) -> list[str]:
    """``key=value`` for the scalar entries of a protocol dict not already described (long texts skipped)."""
    if not isinstance(protocol, dict):
        return []
    skip = set(used) | {"definition"}
    out = []
    for key, value in protocol.items():
        if key in skip or isinstance(value, dict) or (isinstance(value, str) and len(value) > 60):
            continue
        if isinstance(value, list | tuple) and any(isinstance(v, dict | list) for v in value):
            continue
        out.append(f"{key}={h.short(value)}")
    return out


def _join(parts: Sequence[str]) -> str:
    return h.esc("; ".join(p for p in parts if p))


def _k_dict(d) -> dict[int, float]:
    """``{k: value}`` with integer k from a JSON dict (keys "20") or a Python one (keys 20)."""
    if not isinstance(d, dict):
        return {}
    out = {}
    for key, value in d.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- HTML pieces


# ----------------------------------------------------------------------------------------------- inputs


def class_names_for(result: dict, num_classes: int | None = None) -> list[str] | None:
    """Class names from ``result["dataset"]["class_names"]``, else the package's names for that dataset."""
    dataset = result.get("dataset") or {}
    names = dataset.get("class_names")
    if names:
        return [str(n) for n in names]
    try:
        names = CLASS_NAMES.get(canonical_name(str(dataset.get("name", ""))))
    except ValueError:
        names = None
    if names is not None and num_classes is not None and len(names) < num_classes:
        return None
    return names


def _as_tensor(x, dtype) -> torch.Tensor | None:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype)


def _take(images, index) -> np.ndarray:
    """Rows ``index`` of uint8 images held as a tensor or a NumPy array (a memmap reads only those rows)."""
    index = np.asarray(index, dtype=np.int64)
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(index)].cpu().numpy()
    return np.asarray(images[index])


def _check_rows(name: str, x, n: int | None, what: str) -> None:
    if x is not None and n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but {what} has {n}; pass arrays of the same split, in order.")


# ----------------------------------------------------------------------------------------------- 1. headline


def _headline_rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, value HTML, protocol HTML) for every headline number present in ``result``."""
    rows = []
    knn = result.get("knn") or {}
    top1 = _k_dict(knn.get("top1"))
    if top1:
        want = knn.get("headline_k", KNN_HEADLINE_K)
        k = want if want in top1 else min(top1, key=lambda kk: abs(kk - want))
        p = knn.get("protocol") or {}
        parts = [f"k={k}", f"T={h.short(p['temperature'])}" if "temperature" in p else "",
                 f"{p['metric']} similarity" if "metric" in p else "",
                 f"{p['weighting']}-weighted votes" if "weighting" in p else "",
                 f"memory: {p['n_train']} train images" if "n_train" in p else ""]
        extras = _protocol_extras(p, ("k", "temperature", "metric", "weighting", "n_train", "num_classes"))
        rows.append((f"kNN top-1 (k={k})", h.pct(top1[k]), _join(parts + extras)))
    for key, label in (("linear", "Linear probe top-1"), ("linear_aug", "Linear probe top-1 (augmented views)")):
        lin = result.get(key) or {}
        if h.is_number(lin.get("top1")):
            parts = [f"lr={h.short(lin['lr'])}" if "lr" in lin else "",
                     f"wd={h.short(lin['weight_decay'])}" if "weight_decay" in lin else "",
                     f"chosen on held-out val ({lin['val_top1']:.2f}%)" if h.is_number(lin.get("val_top1")) else "",
                     f"grid of {len(lin['grid'])}" if isinstance(lin.get("grid"), list) else "",
                     f"{lin['epochs']} epochs" if "epochs" in lin else ""]
            extras = _protocol_extras(lin.get("protocol"), ("lr", "weight_decay", "epochs"))
            rows.append((label, h.pct(lin["top1"]), _join(parts + extras) + _edge_html(lin)))
    mlp = result.get("mlp") or {}
    if h.is_number(mlp.get("top1")):
        parts = [f"hidden {mlp['hidden']}" if "hidden" in mlp else "", mlp_stopping(mlp),
                 f"best-val weights kept (val {mlp['val_top1']:.2f}%)" if h.is_number(mlp.get("val_top1")) else ""]
        extras = _protocol_extras(mlp.get("protocol"), ("hidden", "best_epoch", "epochs_run", "max_epochs"))
        rows.append(("MLP probe top-1", h.pct(mlp["top1"]), _join(parts + extras)))
    fine = result.get("finetune") or {}
    if h.is_number(fine.get("top1")):
        parts = [f"{fine['epochs']} epochs" if "epochs" in fine else ""]
        rows.append(("Fine-tune top-1", h.pct(fine["top1"]),
                     _join(parts + _protocol_extras(fine.get("protocol"), ("epochs",)))))
    if h.is_number(result.get("online_probe_top1")):
        rows.append(("Online probe top-1", h.pct(result["online_probe_top1"]),
                     h.esc("linear head trained during pre-training on augmented views, gradient stopped; "
                        "evaluated on the test split (cookbook §3.7.1)")))
    if h.is_number(result.get("knn_top1_init")):
        rows.append(("kNN top-1, untrained network", h.pct(result["knn_top1_init"]),
                     h.esc("the same architecture at initialization, same kNN protocol: what pre-training added")))
    rows += _label_free_rows(result.get("label_free") or {})
    return rows


def _edge_html(lin: dict) -> str:
    """The linear probe's grid-edge sentences (probe.edge_notes), as a warning under its protocol."""
    notes = [n for n in lin.get("edge_notes") or [] if isinstance(n, str)]
    return "".join(f'<br><span class="warn">{h.esc(n[0].upper() + n[1:])}.</span>' for n in notes)


def _reading(entry: dict) -> str:
    """The one-sentence guide to a label-free number (suite.HOW_TO_READ, stored in eval.json with the value)."""
    text = entry.get("how_to_read")
    return f'<br><span class="reading">How to read: {h.esc(text)}</span>' if isinstance(text, str) else ""


def mlp_stopping(mlp: dict) -> str:
    """"stopped early at epoch 9 of 20 (best epoch 4)" or "ran all 20 epochs (best epoch 18)"; "" without data."""
    best, run, most = mlp.get("best_epoch"), mlp.get("epochs_run"), mlp.get("max_epochs")
    if not h.is_number(best):
        return ""
    if h.is_number(run) and h.is_number(most):
        if mlp.get("stopped_early", run < most):
            return f"stopped early at epoch {run} of {most} (best epoch {best})"
        return f"ran all {most} epochs (best epoch {best})" + ("; the best was the last: more epochs may help"
                                                              if best == most else "")
    return f"best epoch {best}" + (f" of {run}" if h.is_number(run) else "")


def _label_free_rows(lf: dict) -> list[tuple[str, str, str]]:
    rows = []
    rm = dict(lf.get("rankme") or {})
    rm.setdefault("value", rm.pop("rankme", None))  # selfsup.evaluate.spectrum.rankme names it "rankme"
    if h.is_number(rm.get("value")):
        bound = min(rm["n_samples"], rm["dim"]) if h.is_number(rm.get("n_samples")) and h.is_number(rm.get("dim")) \
            else None
        value = h.num(rm["value"], 1) + (f' <span class="muted">/ {bound}</span>' if bound else "")
        parts = [f"eps={h.short(rm['eps'])}" if "eps" in rm else "",
                 f"N={rm['n_samples']}" + (f" {rm['split']}" if rm.get("split") else "") + " samples"
                 if "n_samples" in rm else "",
                 f"D={rm['dim']}" if "dim" in rm else "",
                 "singular values of the raw embeddings (Garrido et al. 2023, cookbook eq. 17)"]
        rows.append(("RankMe", value, _join(parts + _protocol_extras(rm, ("value", "eps", "n_samples", "dim",
                                                                             "split"))) + _reading(rm)))
    ar = lf.get("alpha_req") or {}
    if h.is_number(ar.get("alpha")):
        value = h.num(ar["alpha"]) + (f' <span class="muted">R² {ar["r2"]:.3f}</span>' if h.is_number(ar.get("r2"))
                                     else "")
        fr = ar.get("fit_range")
        parts = [f"fit on covariance eigenvalues i={fr[0]}..{fr[1]}" if isinstance(fr, list | tuple) and len(fr) == 2
                 else "", "OLS in log-log (Agrawal et al. 2022)"]
        rows.append(("α-ReQ", value, _join(parts + _protocol_extras(ar, ("alpha", "r2", "fit_range"))) + _reading(ar)))
    li = dict(lf.get("lidar") or {})
    li.setdefault("value", li.pop("lidar", None))
    if h.is_number(li.get("value")):
        parts = [f"{li['n_images']} images × {li['n_views']} views" if "n_images" in li and "n_views" in li else "",
                 "effective rank of the image-identity LDA matrix (Thilak et al. 2023)"]
        rows.append(("LiDAR", h.num(li["value"], 1),
                     _join(parts + _protocol_extras(li, ("value", "n_images", "n_views"))) + _reading(li)))
    rot = lf.get("rotation") or {}
    if h.is_number(rot.get("top1")):
        parts = [f"chance {rot['chance']:.0f}%" if h.is_number(rot.get("chance")) else "",
                 "rotation prediction on frozen features, no class labels (Reed et al. 2021, cookbook §3.7.2)"]
        rows.append(("Rotation prediction top-1", h.pct(rot["top1"]),
                     _join(parts + _protocol_extras(rot.get("protocol"), ()))))
    return rows


def _headline_section(result: dict):
    rows = _headline_rows(result)
    if not rows:
        return None
    table = h.table([("Metric", ""), ("Value", "num"), ("Protocol", "")],
                   [[(h.esc(m), ""), (v, "value"), (p, "protocol")] for m, v, p in rows], cls="headline")
    note = ('<p class="note">Accuracies are top-1 on the test split. RankMe, α-ReQ and LiDAR need no labels: they '
            "help choose hyper-parameters within one method, not compare methods (cookbook §3.7.2).</p>")
    return h.section("headline", "Headline numbers", table + note)


def split_title(data: dict) -> str:
    """Where the accuracies come from: "fashion_mnist test split (10,000 images)", "folder/photos: held-out 10% of
    train (1,234 images)", or the train split for label-free metrics only."""
    n = data.get("n_test")
    count = f" ({n:,} images)" if h.is_number(n) and n else ""
    test = str(data.get("test_split") or "")
    if not data.get("labels", True) or (not test and not count):
        return f"{data.get('name', 'data')} (no labelled test split: label-free metrics on the train split)"
    held = re.fullmatch(r"(.*) \(held-out ([^)]*)\)", test)
    if held:
        return f"{held[1]}: held-out {held[2]} of train{count}"
    base, _, split = (test or str(data.get("name", "data")).split("/")[0] + "/test").partition("/")
    return f"{base} {split or 'test'} split{count}"


def _warnings(result: dict) -> str:
    """Below-pixel-baseline sentences (evaluate/baselines.below_baseline), first thing under the title."""
    notes = [n for n in result.get("below_baseline") or [] if isinstance(n, str)]
    return "".join(f'<p class="alert"><strong>Below the pixel baseline.</strong> {h.esc(n)}</p>' for n in notes)


def _header(result: dict) -> str:
    enc, data, run = result.get("encoder") or {}, result.get("dataset") or {}, result.get("run") or {}
    lines = []
    if enc:
        enc_parts = [str(enc.get("name", "encoder")), f"{enc['num_features']}-d features" if "num_features" in enc
                     else "", f"from {enc.get('source', '')} {enc['path']}" if enc.get("path") else ""]
        lines.append("Encoder: " + h.esc(", ".join(p for p in enc_parts if p)))
    if data:
        sizes = [f"{data[k]} {k[2:]}" for k in ("n_train", "n_test") if k in data]
        lines.append("Dataset: " + h.esc(f"{data.get('name', '?')}" + (f" ({', '.join(sizes)})" if sizes else "")))
    if run:
        parts = [str(run.get("method", "")), f"{run['epochs']} epochs" if "epochs" in run else "",
                 f"trained in {run['train_seconds'] / 60:.1f} min" if h.is_number(run.get("train_seconds")) else ""]
        lines.append("Run: " + h.esc(", ".join(p for p in parts if p)))
        lines += _health_lines(run)
    seconds = result.get("seconds") or {}
    if h.is_number(seconds.get("total")):
        parts = [f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total" and h.is_number(v)]
        lines.append(h.esc(f"Evaluation time: {seconds['total']:.1f} s" + (f" ({', '.join(parts)})" if parts else "")))
    return _warnings(result) + "".join(f'<p class="meta">{line}</p>' for line in lines)


def _health_lines(run: dict) -> list[str]:
    """What went wrong during training and was handled: skipped files and steps, collapse warnings (with evidence)."""
    lines = []
    if run.get("skipped_files"):
        lines.append(h.esc(f"Data: {run['skipped_files']} unreadable file(s) skipped (listed with their reasons in "
                           "skipped_files.tsv)"))
    if run.get("nonfinite_steps"):
        lines.append(h.esc(f"Training: {run['nonfinite_steps']} step(s) with a NaN/Inf loss or gradient skipped"))
    warnings = run.get("collapse_warnings") or []
    if warnings:
        first = warnings[0]
        lines.append("<strong>Collapse</strong>: " + h.esc(f"{len(warnings)} warning(s), the first at step "
                                                           f"{first['step']}: {first['evidence']}"))
    return lines


# ----------------------------------------------------------------------------------------------- what good looks like


def _compare_row(name: str, entry: dict, keys=("knn_top1", "linear_top1", "mlp_top1"), note: str = ""):
    return [(h.esc(name), "")] + [(h.pct(entry.get(k)), "num") for k in keys] + [(note, "protocol")]


def _baselines_section(result: dict):
    """The run against its pixel baselines (same protocols) and the recipe's reference run."""
    base, ref = result.get("baselines") or {}, result.get("reference") or {}
    if not base and not ref:
        return None
    rows = [_compare_row("This run", result, note=h.esc(", ".join(
        f"{v:g} epochs" if k == "epochs" else f"batch {v}" for k, v in (result.get("run") or {}).items()
        if k in ("epochs", "batch_size") and h.is_number(v))))]
    text = []
    if base:
        rows.append(_compare_row("Pixel baseline", base, note=h.esc(
            f"{base.get('pixels', 'raw pixels')}, {base.get('preprocessing', '')}; same kNN and linear protocols "
            "as this run")))
        for note in base.get("notes") or []:
            text.append(f'<p class="note">Pixel baseline: {h.esc(note)}.</p>')
    if h.is_number(result.get("knn_top1_init")):
        rows.append(_compare_row("Untrained network", {"knn_top1": result["knn_top1_init"]},
                                 note=h.esc("same architecture at initialization, kNN only")))
    if ref:
        detail = [f"{ref['epochs']:g} epochs" if h.is_number(ref.get("epochs")) else "",
                  f"batch {ref['batch_size']}" if h.is_number(ref.get("batch_size")) else "",
                  f"{ref['minutes']:g} min" if h.is_number(ref.get("minutes")) else "",
                  str(ref.get("machine") or ""), f"commit {ref['commit']}" if ref.get("commit") else "",
                  str(ref.get("date") or "")]
        rows.append(_compare_row(f"Recipe reference ({ref.get('recipe', '?')})", ref,
                                 note=h.esc(", ".join(d for d in detail if d))))
        differs = [d for d in ref.get("differs") or [] if isinstance(d, str)]
        if differs:
            text.append('<p class="warn">This run differs from the reference run in: ' + h.esc("; ".join(differs))
                        + ". Expect different numbers.</p>")
    table = h.table([("", ""), ("kNN top-1", "num"), ("Linear top-1", "num"), ("MLP top-1", "num"), ("", "")],
                    rows, cls="headline")
    recipe = (result.get("run") or {}).get("recipe")
    if ref:
        where = "The recipe reference is what the shipped recipe measured with <code>benchmarks/catalog.py</code>."
    elif recipe:
        where = h.esc(f"The recipe {(result.get('run') or {}).get('method')}:{recipe} has no measured reference on "
                      "this dataset yet (benchmarks/catalog.py measures them).")
    else:
        where = ""
    intro = ('<p class="note">An encoder has learned something once it beats the pixels it reads under the same '
             "protocols. The pixel baseline flattens the images and standardizes each pixel with the train split's "
             "statistics, the preprocessing that serves pixels best (on Fashion-MNIST kNN gives 86.2% on "
             f"standardized, 84.6% on raw [0, 1] pixels). {where}</p>")
    return h.section("baselines", "What good looks like", table + intro + "".join(text))


def _settings_section(result: dict):
    hp = result.get("hyperparameters") or {}
    if not hp:
        return None
    rows = [[(h.esc(k), ""), (h.esc(h.short(v)), "")] for k, v in hp.items()]
    return h.section("settings", "Run settings", h.table([("Setting", ""), ("Value", "")], rows))


def _classes_section(out: Path, result: dict, names: list[str] | None):
    """Per-class accuracy and confusion matrix of the linear probe's tested head."""
    lin = result.get("linear") or {}
    confusion = lin.get("confusion")
    if not isinstance(confusion, list) or not confusion:
        return None
    cm = np.asarray(confusion, dtype=np.int64)
    c = cm.shape[0]
    labels = names if names is not None and len(names) == c else [str(i) for i in range(c)]
    per_class = lin.get("per_class_top1") or [None] * c
    totals = cm.sum(axis=1)
    worst = _best_index([-v if h.is_number(v) else None for v in per_class])
    rows = []
    for i in range(c):
        off = cm[i].copy()
        off[i] = -1
        confused = f"{labels[int(off.argmax())]} ({int(off.max())})" if c > 1 and off.max() > 0 else DASH_TEXT
        rows.append([(h.esc(labels[i]), ""), (str(int(totals[i])), "num"),
                     (h.pct(per_class[i]), "num worst" if i == worst else "num"), (h.esc(confused), "")])
    table = h.table([("Class", ""), ("Test images", "num"), ("Linear top-1", "num"), ("Most often predicted as", "")],
                    rows)
    path = plot_confusion(cm, labels, out / "confusion.png")
    caption = ("Confusion matrix of the linear probe on the test split: row = true class, column = predicted class, "
               "each cell the share of the row (the count written inside when the matrix is small). The class "
               "with the lowest accuracy is marked in red in the table.")
    body = f'<div class="side"><div>{table}</div>{h.figure(path, "confusion matrix", caption, width=560)}</div>'
    return h.section("classes", "Linear probe per class", body)


DASH_TEXT = "—"


# ----------------------------------------------------------------------------------------------- 2. training curves


def _metrics_path(result: dict, metrics_path) -> Path | None:
    """The given metrics.jsonl, else the run's own when the encoder came from a run directory that has one."""
    if metrics_path is not None:
        return Path(metrics_path)
    enc = result.get("encoder") or {}
    if enc.get("source") == "run" and enc.get("path"):
        candidate = Path(enc["path"]) / "metrics.jsonl"
        return candidate if candidate.is_file() else None
    return None


def _training_section(out: Path, result: dict, metrics_path):
    path = _metrics_path(result, metrics_path)
    if path is None:
        return None
    pngs = plot_training(path, out)
    if not pngs:
        return None
    figures = "".join(h.figure(p, p.stem) for p in pngs)
    note = ('<p class="note">Online-probe accuracy is measured on the augmented training batch, so it is noisy and '
            "lower than the offline numbers above; kNN top-1 (when logged) is on the test split.</p>")
    return h.section("training", "Training curves", f'<div class="grid2">{figures}</div>{note}')


# ----------------------------------------------------------------------------------------------- 3. guillotine


def _best_index(values: list) -> int | None:
    """Index of the largest number (the first on ties); None when fewer than two numbers compete."""
    numbers = [(v, -i) for i, v in enumerate(values) if h.is_number(v)]
    return -max(numbers)[1] if len(numbers) > 1 else None


def _guillotine_section(result: dict):
    rows = [r for r in result.get("guillotine") or [] if isinstance(r, dict)]
    if not rows:
        return None
    best_lin = _best_index([r.get("linear_top1") for r in rows])
    best_knn = _best_index([r.get("knn_top1") for r in rows])
    body = []
    for i, r in enumerate(rows):
        body.append([
            (h.esc(r.get("layer", "?")), ""), (h.esc(r.get("dim", "")), "num"),
            (h.pct(r.get("linear_top1")), "num best" if i == best_lin else "num"),
            (h.pct(r.get("knn_top1")), "num best" if i == best_knn else "num"),
            (h.num(r.get("rankme"), 1), "num"), (h.num(r.get("alpha_req")), "num"),
        ])
    table = h.table([("Representation", ""), ("dim", "num"), ("Linear top-1", "num"), ("kNN top-1", "num"),
                    ("RankMe", "num"), ("α-ReQ", "num")], body)
    note = ('<p class="note">Probes cut the network at the backbone and after each projector layer. With SSL '
            "positive pairs the backbone usually wins: the projector absorbs the pretext task's invariances "
            "(Guillotine Regularization, Bordes et al. 2022, cookbook §3.2 and Fig. 10). Best accuracy highlighted."
            "</p>")
    return h.section("guillotine", "Guillotine: backbone vs projector layers", table + note)


# ----------------------------------------------------------------------------------------------- 4. spectra

SPECTRUM_FLOOR = 1e-7  # relative singular values below this are drawn at the floor (a log axis cannot show 0)


def plot_spectra(spectra: dict[str, Sequence[float]], path: Path, rankme: dict[str, float] | None = None) -> Path:
    """Normalized singular values (log scale) and cumulative explained variance of each representation."""
    fig = Figure(figsize=(11.0, 4.2), dpi=100)
    ax_sv, ax_cum = fig.subplots(1, 2)
    floored = 0
    for name, values in spectra.items():
        s = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
        if s.size == 0 or s[0] <= 0:
            continue
        rel = s / s[0]
        floored += int((rel < SPECTRUM_FLOOR).sum())
        x = np.arange(1, s.size + 1)
        label = f"{name} (D={s.size}" + (f", RankMe {rankme[name]:.0f})" if rankme and name in rankme else ")")
        line, = ax_sv.plot(x, np.maximum(rel, SPECTRUM_FLOOR), linewidth=1.8, label=label)
        var = np.cumsum(s**2) / np.sum(s**2)
        ax_cum.plot(x, 100 * var, linewidth=1.8, color=line.get_color(), label=label)
    ax_sv.set_yscale("log")
    ax_sv.set(title="Singular values / largest", xlabel="index (descending)", ylabel="σᵢ / σ₁ (log scale)")
    ax_cum.set(title="Cumulative explained variance", xlabel="number of directions", ylabel="% of variance")
    ax_cum.set_ylim(0, 101)
    if floored:
        ax_sv.text(0.98, 0.03, f"{floored} values < {SPECTRUM_FLOOR:g} drawn at {SPECTRUM_FLOOR:g}",
                   transform=ax_sv.transAxes, ha="right", fontsize=8, color="#9a3412")
    for ax in (ax_sv, ax_cum):
        ax.grid(alpha=0.3, which="both" if ax is ax_sv else "major")
        ax.legend(fontsize=9)
    fig.tight_layout()
    return h.save_png(fig, path)


def _spectra_section(out: Path, result: dict):
    spectra = {str(k): v for k, v in (result.get("spectra") or {}).items() if isinstance(v, list | tuple) and v}
    if not spectra:
        return None
    rankme = {str(r.get("layer")): r["rankme"] for r in result.get("guillotine") or []
              if isinstance(r, dict) and h.is_number(r.get("rankme"))}
    path = plot_spectra(spectra, out / "spectra.png", rankme)
    caption = ("Singular values of the centered test embeddings, each divided by its largest. A curve that plunges "
               "long before its last index is <b>dimensional collapse</b>: those directions carry almost no variance. "
               "Jing et al. (2022) observe it mainly after the projector (cookbook §2.6.2, Fig. 9).")
    return h.section("spectra", "Singular-value spectra", h.figure(path, "singular value spectra", caption))


# ----------------------------------------------------------------------------------------------- 5-6. map, retrieval


def _map_section(out: Path, feats, labels, names, timings: dict, points: int = MAP_POINTS):
    if feats is None or points <= 0 or len(feats) < 8:
        return None
    start = time.perf_counter()
    n = min(points, len(feats))
    perplexity = min(30.0, (n - 1) / 3)  # t-SNE needs perplexity < n; 3 x perplexity neighbours per point
    coords, index = embed_2d(feats, n=n, seed=0, labels=labels, perplexity=perplexity)
    timings["t-SNE"] = time.perf_counter() - start
    sub_labels = None if labels is None else labels[torch.as_tensor(index)]
    title = f"t-SNE of {len(index)} test embeddings"
    path = plot_embedding_map(coords, sub_labels, names, out / "embedding_map.png", title)
    pca = ", PCA to 50 dims" if feats.shape[1] > 50 else ""
    caption = (f"{len(index)} test images{' (stratified by class)' if labels is not None else ''}, L2-normalized "
               f"features{pca}, t-SNE with perplexity {perplexity:g} (scikit-learn). Distances between clusters and "
               "cluster sizes carry little meaning in t-SNE; look at which classes mix.")
    return h.section("map", "Embedding map", h.figure(path, "t-SNE embedding map", caption, width=760))


def pick_queries(n: int, labels: torch.Tensor | None, count: int = RETRIEVAL_QUERIES, seed: int = 0) -> np.ndarray:
    """``count`` distinct query indices: one per class in a seeded class order when labels exist, else random."""
    rng = np.random.default_rng(seed)
    count = min(count, n)
    if labels is None:
        return np.sort(rng.choice(n, size=count, replace=False))
    y = labels.cpu().numpy()
    classes = rng.permutation(np.unique(y))
    chosen: list[int] = []
    while len(chosen) < count:
        for c in classes:
            pool = np.setdiff1d(np.flatnonzero(y == c), chosen)
            if pool.size and len(chosen) < count:
                chosen.append(int(rng.choice(pool)))
    return np.asarray(chosen)


def _retrieval_section(out: Path, test_images, test_feats, test_labels, train_images, train_feats, train_labels,
                       names):
    if test_images is None or test_feats is None:
        return None
    against_train = train_images is not None and train_feats is not None
    memory_images = train_images if against_train else test_images
    memory_feats = train_feats if against_train else test_feats
    memory_labels = train_labels if against_train else test_labels
    queries = pick_queries(test_feats.shape[0], test_labels)
    if against_train:
        sims, idx = nearest_neighbors(test_feats[queries], memory_feats, RETRIEVAL_K)
    else:  # each query is in the memory: drop it from its own neighbour list
        all_sims, all_idx = nearest_neighbors(test_feats[queries], memory_feats, RETRIEVAL_K + 1)
        keep = all_idx != torch.as_tensor(queries)[:, None]
        sims = torch.stack([s[m][:RETRIEVAL_K] for s, m in zip(all_sims, keep)])
        idx = torch.stack([i[m][:RETRIEVAL_K] for i, m in zip(all_idx, keep)])
    q_images = _take(test_images, queries)
    n_images = _take(memory_images, idx.reshape(-1).numpy()).reshape(len(queries), RETRIEVAL_K,
                                                                    *q_images.shape[1:])
    has_labels = test_labels is not None and memory_labels is not None
    q_labels = test_labels[torch.as_tensor(queries)] if has_labels else None
    n_labels = memory_labels[idx] if has_labels else None
    path = retrieval_grid(q_images, n_images, out / "retrieval.png", q_labels, n_labels, names, sims)
    memory = "the train set" if against_train else "the rest of the test set"
    caption = (f"Test queries (left, blue frame) and their {RETRIEVAL_K} cosine-nearest neighbours in {memory} "
               "(feature similarity under each image).")
    if has_labels:
        same = int((n_labels == q_labels[:, None]).sum())
        caption += (f" Green frame: same class as the query; red frame and ✗: a different class. "
                    f"{same} of {n_labels.numel()} neighbours shown share the query's class.")
    return h.section("retrieval", "Nearest-neighbour retrieval", h.figure(path, "retrieval grid", caption))


# ----------------------------------------------------------------------------------------------- 7. protocol details


def _knn_table(knn: dict) -> str:
    top1, majority = _k_dict(knn.get("top1")), _k_dict(knn.get("majority_top1"))
    if not top1:
        return ""
    ks = sorted(set(top1) | set(majority))
    best = _best_index([top1.get(k) for k in ks])
    rows = [[(str(k), "num"), (h.pct(top1.get(k)), "num best" if i == best else "num")]
            + ([(h.pct(majority.get(k)), "num")] if majority else []) for i, k in enumerate(ks)]
    p = knn.get("protocol") or {}
    headers = [("k", "num"), (h.esc(f"weighted top-1 (T={h.short(p.get('temperature', '?'))})"), "num")]
    headers += [("majority-vote top-1", "num")] if majority else []
    return "<div><h3>kNN over k</h3>" + h.table(headers, rows) + "</div>"


def _linear_grid_table(lin: dict) -> str:
    grid = [g for g in lin.get("grid") or [] if isinstance(g, dict) and h.is_number(g.get("val_top1"))]
    if not grid:
        return ""
    lrs = sorted({g["lr"] for g in grid if "lr" in g})
    wds = sorted({g.get("weight_decay", 0.0) for g in grid})
    cell = {(g.get("lr"), g.get("weight_decay", 0.0)): g["val_top1"] for g in grid}
    best = max(cell.values())
    rows = []
    for lr in lrs:
        row = [(h.esc(h.short(lr)), "num")]
        for wd in wds:
            v = cell.get((lr, wd))
            chosen = lr == lin.get("lr") and wd == lin.get("weight_decay")
            cls = "num" + (" best" if v == best else "") + (" chosen" if chosen else "")
            row.append((h.pct(v), cls))
        rows.append(row)
    headers = [("lr \\ weight decay", "num")] + [(h.esc(h.short(wd)), "num") for wd in wds]
    note = ('<p class="muted" style="max-width:420px">Validation top-1 on a held-out part of the train split (never the test split); '
            "the highest is highlighted and the chosen setting framed.</p>")
    edges = "".join(f'<p class="warn" style="max-width:420px">{h.esc(n[0].upper() + n[1:])}.</p>'
                    for n in lin.get("edge_notes") or [] if isinstance(n, str))
    return ("<div><h3>Linear probe: learning-rate × weight-decay grid</h3>" + h.table(headers, rows) + note + edges
            + "</div>")


def plot_mlp_curve(curve: list[dict], path: Path, best_epoch=None) -> Path | None:
    """Validation top-1 and training loss of the MLP probe per epoch, with the early-stopping epoch marked."""
    points = [c for c in curve if isinstance(c, dict) and h.is_number(c.get("epoch"))]
    if not points:
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    epochs = [c["epoch"] for c in points]
    acc = [(c["epoch"], c["val_top1"]) for c in points if h.is_number(c.get("val_top1"))]
    if acc:
        ax.plot(*zip(*acc), color="tab:green", marker="o", markersize=3, label="val top-1 (%)")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="MLP probe")
    loss = [(c["epoch"], c["train_loss"]) for c in points if h.is_number(c.get("train_loss"))]
    handles, labels = ax.get_legend_handles_labels()
    if loss:
        ax2 = ax.twinx()
        ax2.plot(*zip(*loss), color="tab:blue", alpha=0.7, label="train loss")
        ax2.set_ylabel("train loss")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if h.is_number(best_epoch):
        handles.append(ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label="best epoch"))
        labels.append(f"best epoch ({best_epoch})")
    ax.grid(alpha=0.3)
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return h.save_png(fig, path)


def _details_section(out: Path, result: dict):
    parts = [_knn_table(result.get("knn") or {}), _linear_grid_table(result.get("linear") or {})]
    mlp = result.get("mlp") or {}
    if isinstance(mlp.get("curve"), list):
        path = plot_mlp_curve(mlp["curve"], out / "mlp_curve.png", mlp.get("best_epoch"))
        if path is not None:
            stopping = mlp_stopping(mlp)
            parts.append("<div><h3>MLP probe training</h3>" + h.figure(
                path, "MLP probe curve", (h.esc(stopping[0].upper() + stopping[1:]) + ". " if stopping else "")
                + "MLP probes can overfit within a few epochs (cookbook §3.7.1, Fig. 13): the weights of the best "
                "validation epoch are kept and tested.", width=620) + "</div>")
    body = "".join(p for p in parts if p)
    return h.section("details", "Protocol details", f'<div class="side">{body}</div>') if body else None


# ----------------------------------------------------------------------------------------------- 8-9. images, JSON


def _images_section(out: Path, result: dict, extra_images: dict | None):
    dec = result.get("decoder") or {}
    grids = dec.get("grids") or {}
    items = [(f"Conditioned on {name}" + (f": sample diversity {dec['diversity'][name]:.3f}"
                                          if h.is_number((dec.get("diversity") or {}).get(name)) else ""),
              out / file) for name, file in grids.items()]
    items += [(str(caption), Path(p)) for caption, p in (extra_images or {}).items()]
    if not items:
        return None
    body = []
    for caption, path in items:
        if path.is_file():
            body.append(h.figure(path, path.name, h.esc(caption), width=430 if grids else None))
        else:
            body.append(f'<p class="warn">Image not found: {h.esc(path)} ({h.esc(caption)})</p>')
    text = ""
    if grids:
        text = ('<p class="note">One small diffusion decoder per representation, trained on the frozen features of '
                "the train split; each row is a test image (red frame) and samples generated from its features. "
                "What stays constant across a row is encoded in the representation, what varies is not (RCDM, "
                "Bordes et al. 2022, cookbook §3.7.4). Sample diversity: mean per-pixel standard deviation across "
                "the samples of one image (0-1 units); higher means the representation pins down less of the "
                "image.</p>")
    return h.section("images", "Decoder samples and other images", f'<div class="side">{"".join(body)}</div>{text}')


# ----------------------------------------------------------------------------------------------- write_report


def write_report(
    out_dir: str | Path,
    result: dict,
    *,
    test_images=None,
    test_labels=None,
    test_features=None,
    train_images=None,
    train_features=None,
    train_labels=None,
    metrics_path: str | Path | None = None,
    extra_images: dict[str, Path] | None = None,
    title: str | None = None,
    map_points: int = MAP_POINTS,
) -> Path:
    """Write ``out_dir/report.html`` (and the PNGs it embeds, next to it) for one ``selfsup eval`` result.

    ``result`` follows the eval.json schema; every section is skipped when its data is absent. Arrays are optional:
    ``test_features`` (N, D) gives the t-SNE map (colored by ``test_labels``); with ``test_images`` uint8
    (N, C, H, W) also the retrieval grid, against ``train_images``/``train_features`` (M, ...) when given, else
    against the rest of the test set. ``metrics_path`` defaults to the run's metrics.jsonl when
    ``result["encoder"]`` names a run directory. ``extra_images`` maps captions to image files. Returns the
    path of report.html.
    """
    if not isinstance(result, dict):
        raise ValueError(f"result must be the eval.json dict, got {type(result).__name__}.")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_features = _as_tensor(test_features, torch.float32)
    train_features = _as_tensor(train_features, torch.float32)
    test_labels = _as_tensor(test_labels, torch.long)
    train_labels = _as_tensor(train_labels, torch.long)
    n_test = None if test_features is None else test_features.shape[0]
    n_train = None if train_features is None else train_features.shape[0]
    _check_rows("test_labels", test_labels, n_test, "test_features")
    _check_rows("test_images", test_images, n_test, "test_features")
    _check_rows("train_labels", train_labels, n_train, "train_features")
    _check_rows("train_images", train_images, n_train, "train_features")
    num_classes = None if test_labels is None else int(test_labels.max()) + 1
    names = class_names_for(result, num_classes)

    timings: dict[str, float] = {}
    sections = [
        _headline_section(result),
        _baselines_section(result),
        _classes_section(out, result, class_names_for(result, len(result.get("linear", {}).get("confusion") or [])
                                                      or num_classes)),
        _settings_section(result),
        _training_section(out, result, metrics_path),
        _guillotine_section(result),
        _spectra_section(out, result),
        _map_section(out, test_features, test_labels, names, timings, map_points),
        _retrieval_section(out, test_images, test_features, test_labels, train_images, train_features,
                           train_labels, names),
        _details_section(out, result),
        _images_section(out, result, extra_images),
        h.json_section(result),
    ]
    enc, data = result.get("encoder") or {}, result.get("dataset") or {}
    title = title or f"selfsup eval: {enc.get('name', 'encoder')} on {split_title(data)}"
    elapsed = time.perf_counter() - start
    detail = "".join(f", {k} {v:.1f} s" for k, v in timings.items())
    footer = h.esc(f"Written by selfsup.report.report in {elapsed:.1f} s{detail}. Self-contained: images are "
                "embedded, no network access or JavaScript needed.")
    page = h.page(title, _header(result), [s for s in sections if s is not None], footer)
    return h.write_html(out / "report.html", page)


# ----------------------------------------------------------------------------------------------- compare
