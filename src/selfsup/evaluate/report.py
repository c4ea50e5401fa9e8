"""The human report of `selfsup eval` and `selfsup compare`: one self-contained HTML file (cookbook §3.7).

``report.html`` holds every figure as a base64 PNG data URI, inline CSS and no script or external request, so it
opens anywhere (a laptop, a cluster's file browser, an e-mail attachment). Sections appear only when their data
exists, in reading order:

1. headline numbers (kNN, linear, MLP, online probe, RankMe, alpha-ReQ, LiDAR, rotation), each with its protocol
   so it can be compared with papers (cookbook §3.7.1, §3.7.2);
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

import base64
import html
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfsup.data.datasets import DATASET_INFO, canonical_name
from selfsup.evaluate.embedding_map import embed_2d, plot_embedding_map
from selfsup.evaluate.plots import plot_training
from selfsup.evaluate.retrieval import nearest_neighbors, retrieval_grid
from selfsup.runtime import atomic_write_bytes

CLASS_NAMES: dict[str, list[str]] = {
    name: list(info.classes) for name, info in DATASET_INFO.items() if info.classes is not None
}  # fashion_mnist, mnist, cifar10, stl10: the names in selfsup.data.datasets (official class orders)

RETRIEVAL_QUERIES, RETRIEVAL_K = 8, 8
MAP_POINTS = 2000
KNN_HEADLINE_K = 20  # fmnist-knn protocol (DESIGN.md §4), DINO's k
DASH = "&mdash;"

CSS = """
body{font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
  background:#fff;margin:0;padding:24px 32px 48px;max-width:1180px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;border-top:1px solid #d8dee4}
h3{font-size:16px;margin:20px 0 6px}
.meta{color:#57606a;font-size:13.5px;margin:2px 0}.muted{color:#6e7781;font-size:12.5px}
.note{color:#57606a;font-size:13.5px;max-width:900px}.warn{color:#9a3412;font-size:13.5px}
nav{font-size:13.5px;margin:12px 0 0;color:#57606a}nav a{color:#0969da;text-decoration:none;margin-right:14px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:14px}
th,td{padding:5px 12px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;border-bottom:2px solid #d0d7de}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfcfd}
td.best{background:#dafbe1 !important;font-weight:700}td.chosen{outline:2px solid #1a7f37;outline-offset:-2px}
.headline td.value{font-size:17px;font-weight:600;white-space:nowrap;text-align:right}
.headline td.protocol{color:#6e7781;font-size:12.5px;max-width:640px}
figure{margin:10px 0 18px}figcaption{color:#57606a;font-size:13px;max-width:900px;margin-top:4px}
img{max-width:100%;height:auto;border:1px solid #eaeef2}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:8px 20px}
.side{display:flex;flex-wrap:wrap;gap:12px 36px;align-items:flex-start}
details{margin-top:8px}summary{cursor:pointer;color:#0969da}
pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12px;max-height:600px;border-radius:6px}
footer{margin-top:40px;color:#8c959f;font-size:12px}
"""


# ----------------------------------------------------------------------------------------------- formatting


def _e(value) -> str:
    """HTML-escaped text of any value (every string from data goes through here)."""
    return html.escape(str(value), quote=True)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value) -> str:
    """Accuracy in percent with 2 decimals ("87.44%"), or a dash when absent."""
    return f"{value:.2f}%" if _is_number(value) else DASH


def _num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else DASH


def _short(value) -> str:
    """Compact text of a protocol value: 3 significant digits for floats, lists joined by commas."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ", ".join(_short(v) for v in value) if len(value) <= 8 else f"{len(value)} values"
    return str(value)


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
        out.append(f"{key}={_short(value)}")
    return out


def _join(parts: Sequence[str]) -> str:
    return _e("; ".join(p for p in parts if p))


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


def _png_bytes(path: Path) -> bytes:
    """The image at ``path`` as PNG bytes (other formats are re-encoded with Pillow)."""
    data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def _img(path: Path, alt: str, width: int | None = None) -> str:
    """An <img> whose src is a base64 PNG data URI (no file reference survives in the HTML)."""
    b64 = base64.b64encode(_png_bytes(Path(path))).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}"{style}>'


def _figure(path: Path, alt: str, caption: str = "", width: int | None = None) -> str:
    """A <figure>; ``caption`` is already-escaped HTML."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{_img(path, alt, width)}{cap}</figure>"


def _table(headers: Sequence[tuple[str, str]], rows: Sequence[Sequence[tuple[str, str]]], cls: str = "") -> str:
    """``headers``: (escaped text, css class); ``rows``: cells as (escaped HTML, css class)."""
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for v, c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _page(title: str, header: str, sections: list[tuple[str, str, str]], footer: str) -> str:
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    body = "".join(s for _, _, s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>{header}<nav>{nav}</nav></header>{body}"
        f"<footer>{footer}</footer></body></html>\n"
    )


def _write_html(path: Path, text: str) -> Path:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
    return path


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
        parts = [f"k={k}", f"T={_short(p['temperature'])}" if "temperature" in p else "",
                 f"{p['metric']} similarity" if "metric" in p else "",
                 f"{p['weighting']}-weighted votes" if "weighting" in p else "",
                 f"memory: {p['n_train']} train images" if "n_train" in p else ""]
        extras = _protocol_extras(p, ("k", "temperature", "metric", "weighting", "n_train", "num_classes"))
        rows.append((f"kNN top-1 (k={k})", _pct(top1[k]), _join(parts + extras)))
    for key, label in (("linear", "Linear probe top-1"), ("linear_aug", "Linear probe top-1 (augmented views)")):
        lin = result.get(key) or {}
        if _is_number(lin.get("top1")):
            parts = [f"lr={_short(lin['lr'])}" if "lr" in lin else "",
                     f"wd={_short(lin['weight_decay'])}" if "weight_decay" in lin else "",
                     f"chosen on held-out val ({lin['val_top1']:.2f}%)" if _is_number(lin.get("val_top1")) else "",
                     f"grid of {len(lin['grid'])}" if isinstance(lin.get("grid"), list) else "",
                     f"{lin['epochs']} epochs" if "epochs" in lin else ""]
            extras = _protocol_extras(lin.get("protocol"), ("lr", "weight_decay", "epochs"))
            rows.append((label, _pct(lin["top1"]), _join(parts + extras)))
    mlp = result.get("mlp") or {}
    if _is_number(mlp.get("top1")):
        parts = [f"hidden {mlp['hidden']}" if "hidden" in mlp else "",
                 f"best epoch {mlp['best_epoch']}" + (f" of {mlp['epochs_run']}" if "epochs_run" in mlp else "")
                 if "best_epoch" in mlp else "",
                 f"early-stopped on val ({mlp['val_top1']:.2f}%)" if _is_number(mlp.get("val_top1")) else ""]
        extras = _protocol_extras(mlp.get("protocol"), ("hidden", "best_epoch", "epochs_run"))
        rows.append(("MLP probe top-1", _pct(mlp["top1"]), _join(parts + extras)))
    fine = result.get("finetune") or {}
    if _is_number(fine.get("top1")):
        parts = [f"{fine['epochs']} epochs" if "epochs" in fine else ""]
        rows.append(("Fine-tune top-1", _pct(fine["top1"]),
                     _join(parts + _protocol_extras(fine.get("protocol"), ("epochs",)))))
    if _is_number(result.get("online_probe_top1")):
        rows.append(("Online probe top-1", _pct(result["online_probe_top1"]),
                     _e("linear head trained during pre-training on augmented views, gradient stopped; "
                        "evaluated on the test split (cookbook §3.7.1)")))
    if _is_number(result.get("knn_top1_init")):
        rows.append(("kNN top-1, untrained network", _pct(result["knn_top1_init"]),
                     _e("the same architecture at initialization, same kNN protocol: what pre-training added")))
    rows += _label_free_rows(result.get("label_free") or {})
    return rows


def _label_free_rows(lf: dict) -> list[tuple[str, str, str]]:
    rows = []
    rm = dict(lf.get("rankme") or {})
    rm.setdefault("value", rm.pop("rankme", None))  # selfsup.evaluate.spectrum.rankme names it "rankme"
    if _is_number(rm.get("value")):
        bound = min(rm["n_samples"], rm["dim"]) if _is_number(rm.get("n_samples")) and _is_number(rm.get("dim")) \
            else None
        value = _num(rm["value"], 1) + (f' <span class="muted">/ {bound}</span>' if bound else "")
        parts = [f"eps={_short(rm['eps'])}" if "eps" in rm else "",
                 f"N={rm['n_samples']}" + (f" {rm['split']}" if rm.get("split") else "") + " samples"
                 if "n_samples" in rm else "",
                 f"D={rm['dim']}" if "dim" in rm else "",
                 "singular values of the raw embeddings (Garrido et al. 2023, cookbook eq. 17)"]
        rows.append(("RankMe", value, _join(parts + _protocol_extras(rm, ("value", "eps", "n_samples", "dim",
                                                                             "split")))))
    ar = lf.get("alpha_req") or {}
    if _is_number(ar.get("alpha")):
        value = _num(ar["alpha"]) + (f' <span class="muted">R² {ar["r2"]:.3f}</span>' if _is_number(ar.get("r2"))
                                     else "")
        fr = ar.get("fit_range")
        parts = [f"fit on covariance eigenvalues i={fr[0]}..{fr[1]}" if isinstance(fr, list | tuple) and len(fr) == 2
                 else "", "OLS in log-log (Agrawal et al. 2022)"]
        rows.append(("α-ReQ", value, _join(parts + _protocol_extras(ar, ("alpha", "r2", "fit_range")))))
    li = dict(lf.get("lidar") or {})
    li.setdefault("value", li.pop("lidar", None))
    if _is_number(li.get("value")):
        parts = [f"{li['n_images']} images × {li['n_views']} views" if "n_images" in li and "n_views" in li else "",
                 "effective rank of the image-identity LDA matrix (Thilak et al. 2023)"]
        rows.append(("LiDAR", _num(li["value"], 1),
                     _join(parts + _protocol_extras(li, ("value", "n_images", "n_views")))))
    rot = lf.get("rotation") or {}
    if _is_number(rot.get("top1")):
        parts = [f"chance {rot['chance']:.0f}%" if _is_number(rot.get("chance")) else "",
                 "rotation prediction on frozen features, no class labels (Reed et al. 2021, cookbook §3.7.2)"]
        rows.append(("Rotation prediction top-1", _pct(rot["top1"]),
                     _join(parts + _protocol_extras(rot.get("protocol"), ()))))
    return rows


def _headline_section(result: dict):
    rows = _headline_rows(result)
    if not rows:
        return None
    table = _table([("Metric", ""), ("Value", "num"), ("Protocol", "")],
                   [[(_e(m), ""), (v, "value"), (p, "protocol")] for m, v, p in rows], cls="headline")
    note = ('<p class="note">Accuracies are top-1 on the test split. RankMe, α-ReQ and LiDAR need no labels: they '
            "help choose hyper-parameters within one method, not compare methods (cookbook §3.7.2).</p>")
    return _section("headline", "Headline numbers", table + note)


def _header(result: dict) -> str:
    enc, data, run = result.get("encoder") or {}, result.get("dataset") or {}, result.get("run") or {}
    lines = []
    if enc:
        enc_parts = [str(enc.get("name", "encoder")), f"{enc['num_features']}-d features" if "num_features" in enc
                     else "", f"from {enc.get('source', '')} {enc['path']}" if enc.get("path") else ""]
        lines.append("Encoder: " + _e(", ".join(p for p in enc_parts if p)))
    if data:
        sizes = [f"{data[k]} {k[2:]}" for k in ("n_train", "n_test") if k in data]
        lines.append("Dataset: " + _e(f"{data.get('name', '?')}" + (f" ({', '.join(sizes)})" if sizes else "")))
    if run:
        parts = [str(run.get("method", "")), f"{run['epochs']} epochs" if "epochs" in run else "",
                 f"trained in {run['train_seconds'] / 60:.1f} min" if _is_number(run.get("train_seconds")) else ""]
        lines.append("Run: " + _e(", ".join(p for p in parts if p)))
    seconds = result.get("seconds") or {}
    if _is_number(seconds.get("total")):
        parts = [f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total" and _is_number(v)]
        lines.append(_e(f"Evaluation time: {seconds['total']:.1f} s" + (f" ({', '.join(parts)})" if parts else "")))
    return "".join(f'<p class="meta">{line}</p>' for line in lines)


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
    figures = "".join(_figure(p, p.stem) for p in pngs)
    note = ('<p class="note">Online-probe accuracy is measured on the augmented training batch, so it is noisy and '
            "lower than the offline numbers above; kNN top-1 (when logged) is on the test split.</p>")
    return _section("training", "Training curves", f'<div class="grid2">{figures}</div>{note}')


# ----------------------------------------------------------------------------------------------- 3. guillotine


def _best_index(values: list) -> int | None:
    """Index of the largest number (the first on ties); None when fewer than two numbers compete."""
    numbers = [(v, -i) for i, v in enumerate(values) if _is_number(v)]
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
            (_e(r.get("layer", "?")), ""), (_e(r.get("dim", "")), "num"),
            (_pct(r.get("linear_top1")), "num best" if i == best_lin else "num"),
            (_pct(r.get("knn_top1")), "num best" if i == best_knn else "num"),
            (_num(r.get("rankme"), 1), "num"), (_num(r.get("alpha_req")), "num"),
        ])
    table = _table([("Representation", ""), ("dim", "num"), ("Linear top-1", "num"), ("kNN top-1", "num"),
                    ("RankMe", "num"), ("α-ReQ", "num")], body)
    note = ('<p class="note">Probes cut the network at the backbone and after each projector layer. With SSL '
            "positive pairs the backbone usually wins: the projector absorbs the pretext task's invariances "
            "(Guillotine Regularization, Bordes et al. 2022, cookbook §3.2 and Fig. 10). Best accuracy highlighted."
            "</p>")
    return _section("guillotine", "Guillotine: backbone vs projector layers", table + note)


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
    return _save(fig, path)


def _spectra_section(out: Path, result: dict):
    spectra = {str(k): v for k, v in (result.get("spectra") or {}).items() if isinstance(v, list | tuple) and v}
    if not spectra:
        return None
    rankme = {str(r.get("layer")): r["rankme"] for r in result.get("guillotine") or []
              if isinstance(r, dict) and _is_number(r.get("rankme"))}
    path = plot_spectra(spectra, out / "spectra.png", rankme)
    caption = ("Singular values of the centered test embeddings, each divided by its largest. A curve that plunges "
               "long before its last index is <b>dimensional collapse</b>: those directions carry almost no variance. "
               "Jing et al. (2022) observe it mainly after the projector (cookbook §2.6.2, Fig. 9).")
    return _section("spectra", "Singular-value spectra", _figure(path, "singular value spectra", caption))


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
    return _section("map", "Embedding map", _figure(path, "t-SNE embedding map", caption, width=760))


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
    return _section("retrieval", "Nearest-neighbour retrieval", _figure(path, "retrieval grid", caption))


# ----------------------------------------------------------------------------------------------- 7. protocol details


def _knn_table(knn: dict) -> str:
    top1, majority = _k_dict(knn.get("top1")), _k_dict(knn.get("majority_top1"))
    if not top1:
        return ""
    ks = sorted(set(top1) | set(majority))
    best = _best_index([top1.get(k) for k in ks])
    rows = [[(str(k), "num"), (_pct(top1.get(k)), "num best" if i == best else "num")]
            + ([(_pct(majority.get(k)), "num")] if majority else []) for i, k in enumerate(ks)]
    p = knn.get("protocol") or {}
    headers = [("k", "num"), (_e(f"weighted top-1 (T={_short(p.get('temperature', '?'))})"), "num")]
    headers += [("majority-vote top-1", "num")] if majority else []
    return "<div><h3>kNN over k</h3>" + _table(headers, rows) + "</div>"


def _linear_grid_table(lin: dict) -> str:
    grid = [g for g in lin.get("grid") or [] if isinstance(g, dict) and _is_number(g.get("val_top1"))]
    if not grid:
        return ""
    lrs = sorted({g["lr"] for g in grid if "lr" in g})
    wds = sorted({g.get("weight_decay", 0.0) for g in grid})
    cell = {(g.get("lr"), g.get("weight_decay", 0.0)): g["val_top1"] for g in grid}
    best = max(cell.values())
    rows = []
    for lr in lrs:
        row = [(_e(_short(lr)), "num")]
        for wd in wds:
            v = cell.get((lr, wd))
            chosen = lr == lin.get("lr") and wd == lin.get("weight_decay")
            cls = "num" + (" best" if v == best else "") + (" chosen" if chosen else "")
            row.append((_pct(v), cls))
        rows.append(row)
    headers = [("lr \\ weight decay", "num")] + [(_e(_short(wd)), "num") for wd in wds]
    note = ('<p class="muted" style="max-width:420px">Validation top-1 on a held-out part of the train split (never the test split); '
            "the highest is highlighted and the chosen setting framed.</p>")
    return "<div><h3>Linear probe: learning-rate × weight-decay grid</h3>" + _table(headers, rows) + note + "</div>"


def plot_mlp_curve(curve: list[dict], path: Path, best_epoch=None) -> Path | None:
    """Validation top-1 and training loss of the MLP probe per epoch, with the early-stopping epoch marked."""
    points = [c for c in curve if isinstance(c, dict) and _is_number(c.get("epoch"))]
    if not points:
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    epochs = [c["epoch"] for c in points]
    acc = [(c["epoch"], c["val_top1"]) for c in points if _is_number(c.get("val_top1"))]
    if acc:
        ax.plot(*zip(*acc), color="tab:green", marker="o", markersize=3, label="val top-1 (%)")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="MLP probe")
    loss = [(c["epoch"], c["train_loss"]) for c in points if _is_number(c.get("train_loss"))]
    handles, labels = ax.get_legend_handles_labels()
    if loss:
        ax2 = ax.twinx()
        ax2.plot(*zip(*loss), color="tab:blue", alpha=0.7, label="train loss")
        ax2.set_ylabel("train loss")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if _is_number(best_epoch):
        handles.append(ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label="best epoch"))
        labels.append(f"best epoch ({best_epoch})")
    ax.grid(alpha=0.3)
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _details_section(out: Path, result: dict):
    parts = [_knn_table(result.get("knn") or {}), _linear_grid_table(result.get("linear") or {})]
    mlp = result.get("mlp") or {}
    if isinstance(mlp.get("curve"), list):
        path = plot_mlp_curve(mlp["curve"], out / "mlp_curve.png", mlp.get("best_epoch"))
        if path is not None:
            parts.append("<div><h3>MLP probe training</h3>" + _figure(
                path, "MLP probe curve", "MLP probes can overfit within a few epochs (cookbook §3.7.1, Fig. 13): "
                "the weights of the best validation epoch are kept and tested.", width=620) + "</div>")
    body = "".join(p for p in parts if p)
    return _section("details", "Protocol details", f'<div class="side">{body}</div>') if body else None


# ----------------------------------------------------------------------------------------------- 8-9. images, JSON


def _images_section(out: Path, result: dict, extra_images: dict | None):
    dec = result.get("decoder") or {}
    grids = dec.get("grids") or {}
    items = [(f"Conditioned on {name}" + (f": sample diversity {dec['diversity'][name]:.3f}"
                                          if _is_number((dec.get("diversity") or {}).get(name)) else ""),
              out / file) for name, file in grids.items()]
    items += [(str(caption), Path(p)) for caption, p in (extra_images or {}).items()]
    if not items:
        return None
    body = []
    for caption, path in items:
        if path.is_file():
            body.append(_figure(path, path.name, _e(caption), width=430 if grids else None))
        else:
            body.append(f'<p class="warn">Image not found: {_e(path)} ({_e(caption)})</p>')
    text = ""
    if grids:
        text = ('<p class="note">One small diffusion decoder per representation, trained on the frozen features of '
                "the train split; each row is a test image (red frame) and samples generated from its features. "
                "What stays constant across a row is encoded in the representation, what varies is not (RCDM, "
                "Bordes et al. 2022, cookbook §3.7.4). Sample diversity: mean per-pixel standard deviation across "
                "the samples of one image (0-1 units); higher means the representation pins down less of the "
                "image.</p>")
    return _section("images", "Decoder samples and other images", f'<div class="side">{"".join(body)}</div>{text}')


def _json_section(result: dict, name: str = "eval.json"):
    text = json.dumps(result, indent=2, default=str)
    return _section("raw", "Raw results", f"<details><summary>{_e(name)} ({len(text) // 1024 + 1} KiB)</summary>"
                                          f"<pre>{_e(text)}</pre></details>")


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
        _training_section(out, result, metrics_path),
        _guillotine_section(result),
        _spectra_section(out, result),
        _map_section(out, test_features, test_labels, names, timings, map_points),
        _retrieval_section(out, test_images, test_features, test_labels, train_images, train_features,
                           train_labels, names),
        _details_section(out, result),
        _images_section(out, result, extra_images),
        _json_section(result),
    ]
    enc, data = result.get("encoder") or {}, result.get("dataset") or {}
    title = title or f"selfsup eval: {enc.get('name', 'encoder')} on {data.get('name', 'data')}"
    elapsed = time.perf_counter() - start
    detail = "".join(f", {k} {v:.1f} s" for k, v in timings.items())
    footer = _e(f"Written by selfsup.evaluate.report in {elapsed:.1f} s{detail}. Self-contained: images are "
                "embedded, no network access or JavaScript needed.")
    page = _page(title, _header(result), [s for s in sections if s is not None], footer)
    return _write_html(out / "report.html", page)


# ----------------------------------------------------------------------------------------------- compare
