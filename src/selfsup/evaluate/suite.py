"""Every evaluation of cookbook §3.7 (+ §3.2 guillotine, §2.6.2 collapse) on one encoder, features computed once.

:func:`evaluate_model` takes any encoder (our backbone, a user's ``nn.Module`` or callable, a timm model) and the
train/test images, runs the protocols that apply (label-free ones always, label-based ones when both splits have
labels) and returns one dict in the ``eval.json`` layout (``docs``: README "Evaluation"). Expensive protocols
(augmented linear probe, fine-tuning, the diffusion decoder) are opt-in through :class:`selfsup.config.EvalConfig`.

Order of work: features of the un-augmented train and test images (once) -> projector cuts on those features ->
kNN (every k, exp and majority votes) -> linear probe -> MLP probe -> guillotine rows -> RankMe / alpha-ReQ /
spectra -> LiDAR (augmented views of a test subset) -> rotation probe -> opt-in protocols. Each step is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from selfsup.config import EvalConfig
from selfsup.data.datasets import ImageDataset
from selfsup.evaluate.features import extract_features, extract_view_features
from selfsup.evaluate.guillotine import projector_features
from selfsup.evaluate.knn import knn_classify
from selfsup.evaluate.probe import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe
from selfsup.evaluate.spectrum import alpha_req, covariance_eigenvalues, lidar, rankme

RANKME_SAMPLES = 10_000  # RankMe depends on N (it is capped by min(N, D)): a fixed N keeps runs comparable

# How to read each label-free number: one sentence each, written into eval.json next to the value and shown in the
# report. Sources: cookbook §3.7.2 (RankMe eq. 17, Table 3; alpha-ReQ), §2.6.2 (dimensional collapse), the papers.
HOW_TO_READ = {
    "rankme": "Effective rank of the embeddings (cookbook eq. 17), out of min(N, D): higher usually means less "
              "dimensional collapse (cookbook §2.6.2). It is a necessary condition for good performance, not a "
              "sufficient one (a random Gaussian matrix is full rank), and works for choosing hyper-parameters "
              "within one method, not for comparing methods (cookbook §3.7.2, Table 3; Garrido et al. 2023); compare "
              "only runs of one embedding size D and sample count N.",
    "alpha_req": "Decay exponent of the covariance eigenspectrum of the features before the projector (Agrawal et "
                 "al. 2022, cookbook §3.7.2): a small alpha is a flat, noise-like spectrum, a large one variance "
                 "packed into few directions (towards collapse); Agrawal et al. find the best-generalizing "
                 "representations in an intermediate range of alpha, not at either end. Like RankMe it selects "
                 "hyper-parameters within one method, and in the cookbook's Table 3 it recovers less of the "
                 "supervised choice's accuracy than RankMe.",
    "lidar": "Effective rank of the linear-discriminant matrix that separates images by their augmented views "
             "(Thilak et al. 2023; not in the cookbook): higher means more directions tell images apart beyond "
             "augmentation noise. It depends on the view distribution, so compare only runs evaluated with the same "
             "views and embedding size.",
}


class _Clock:
    def __init__(self, verbose: bool):
        self.seconds: dict[str, float] = {}
        self.verbose = verbose
        self._t0 = time.perf_counter()

    def lap(self, name: str, what: str = "") -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t0, 2)
        if self.verbose:
            print(f"  eval {name}: {self.seconds[name]:.1f} s{'  ' + what if what else ''}", flush=True)
        self._t0 = now


def _r(x: float, nd: int = 2) -> float:
    return round(float(x), nd)


def _label_free(z: Tensor) -> dict:
    """RankMe, alpha-ReQ (an error note when D is too small for its fit range) and the spectrum of one
    representation: the std along each principal axis (square roots of the centered covariance eigenvalues,
    computed once and shared with alpha-ReQ)."""
    eig = covariance_eigenvalues(z)
    out = {"rankme": rankme(z), "spectrum": [float(f"{v:.6g}") for v in eig.clamp_min(0).sqrt().tolist()]}
    try:
        out["alpha_req"] = alpha_req(z, eigenvalues=eig)
    except ValueError as e:
        out["alpha_req"] = {"error": str(e)}
    return out


def _subset(n: int, size: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def evaluate_model(
    encoder: nn.Module | Callable[[Tensor], Tensor],
    train_data: ImageDataset,
    test_data: ImageDataset | None,
    mean,
    std,
    opts: EvalConfig | None = None,
    *,
    projector: nn.Module | None = None,
    view_maker: Callable | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    extra: dict | None = None,
    online_probe: nn.Module | None = None,
    verbose: bool = True,
) -> dict:
    """Run the protocols ``opts`` asks for on ``encoder``; returns (and with ``out_dir`` writes) ``eval.json``.

    - ``encoder``: maps normalized float images ``(B, C, H, W)`` to features ``(B, D)``.
    - ``projector``: the SSL head as an ``nn.Sequential``; enables guillotine probing and the spectrum after the
      projector. ``view_maker``: a :class:`selfsup.data.views.MultiView` of the training augmentation, for LiDAR
      (default: SimCLR's views for the image size).
    - ``out_dir``: writes ``eval.json`` and, when ``opts.report``, ``report.html`` (+ figures) there.
    - ``extra``: merged into the result (e.g. ``{"encoder": {...}, "run": {...}}``).
    - ``online_probe``: the linear classifier trained online during pre-training (detached features of augmented
      views, cookbook Fig. 13); its test top-1 is reported next to the offline probes.
    """
    opts = opts or EvalConfig()
    device = torch.device(device)
    clock = _Clock(verbose)
    t_start = time.perf_counter()
    labelled = (test_data is not None and train_data.labels is not None and test_data.labels is not None)
    result: dict = {
        "dataset": {
            "name": train_data.name,
            "n_train": len(train_data),
            "n_test": len(test_data) if test_data is not None else 0,
            "labels": labelled,
            "num_classes": train_data.num_classes if labelled else None,
            "class_names": train_data.classes,
            "train_split": train_data.name,
            "test_split": test_data.name if test_data is not None else None,
        },
    }
    result.update(extra or {})
    lrs = tuple(getattr(opts, "linear_lrs", None) or DEFAULT_LRS)  # eval.linear_lrs when the config has it
    wds = tuple(getattr(opts, "linear_weight_decays", None) or DEFAULT_WEIGHT_DECAYS)

    train_f = extract_features(encoder, train_data.images, mean, std, device=device, dtype=dtype)
    test_f = (extract_features(encoder, test_data.images, mean, std, device=device, dtype=dtype)
              if test_data is not None else None)
    clock.lap("features", f"{len(train_data)} + {len(test_data) if test_data is not None else 0} images, "
                          f"{train_f.shape[1]}-d")
    result.setdefault("encoder", {})["num_features"] = int(train_f.shape[1])

    reps_train = {"backbone": train_f}
    reps_test = {"backbone": test_f} if test_f is not None else {}
    if projector is not None and (opts.guillotine or opts.label_free):
        projector = projector.to(device)
        reps_train = projector_features(train_f, projector, device=device)
        if test_f is not None:
            reps_test = projector_features(test_f, projector, device=device)
        clock.lap("projector", f"cuts: {', '.join(list(reps_train)[1:])}")

    if labelled:
        y_tr, y_te = train_data.labels, test_data.labels
        ks = sorted({k for k in [*opts.knn_ks, opts.knn_k] if k <= len(train_data)})
        knn = knn_classify(train_f, y_tr, test_f, y_te, k=ks, temperature=opts.knn_temperature,
                           weighting=("exp", "majority"), device=device)  # one retrieval for both votes
        result["knn"] = {
            "top1": {str(k): _r(v) for k, v in knn["by_weighting"]["exp"].items()},
            "majority_top1": {str(k): _r(v) for k, v in knn["by_weighting"]["majority"].items()},
            "headline_k": opts.knn_k,
            "protocol": {**knn["protocol"], "weighting": "exp",
                         "majority_top1": "one vote per neighbour"},
        }
        result["knn_top1"] = result["knn"]["top1"].get(str(opts.knn_k))
        clock.lap("knn", f"top-1 (k={opts.knn_k}) {result['knn_top1']}%")
        if online_probe is not None:
            online_probe.eval()
            with torch.no_grad():
                pred = online_probe(test_f.to(next(online_probe.parameters()).device)).argmax(1).cpu()
            result["online_probe_top1"] = _r(100 * (pred == y_te).double().mean())
        if opts.linear:
            lin = linear_probe(train_f, y_tr, test_f, y_te, lrs=lrs, weight_decays=wds, epochs=opts.linear_epochs,
                               seed=seed, device="cpu", num_classes=train_data.num_classes)
            result["linear"] = {**lin, "top1": _r(lin["top1"]), "val_top1": _r(lin["val_top1"]),
                                "per_class_top1": [None if v is None else _r(v) for v in lin["per_class_top1"]]}
            result["linear_top1"] = result["linear"]["top1"]
            clock.lap("linear", f"top-1 {result['linear_top1']}% (lr {lin['lr']:g}, wd {lin['weight_decay']:g})")
        if opts.mlp:
            from selfsup.evaluate.mlp_probe import mlp_probe

            mlp = mlp_probe(train_f, y_tr, test_f, y_te, seed=seed)
            result["mlp"] = {**mlp, "top1": _r(mlp["top1"]), "val_top1": _r(mlp["val_top1"])}
            result["mlp_top1"] = result["mlp"]["top1"]
            clock.lap("mlp", f"top-1 {result['mlp_top1']}% (best epoch {mlp['best_epoch']})")
        if getattr(opts, "baselines", True):  # eval.baselines (default true) when the config has it
            from selfsup.evaluate.baselines import cached_pixel_baselines

            result["baselines"] = cached_pixel_baselines(
                train_data.images, y_tr, test_data.images, y_te, knn_k=opts.knn_k,
                knn_temperature=opts.knn_temperature, linear_epochs=opts.linear_epochs, lrs=lrs, weight_decays=wds,
                seed=seed)
            b = result["baselines"]
            clock.lap("baselines", f"pixels: kNN {b['knn_top1']}%, linear {b['linear_top1']}% ({b['cache']})")
        from selfsup.evaluate.baselines import below_baseline

        result["below_baseline"] = below_baseline(result)

    if opts.label_free or (opts.guillotine and projector is not None):
        lf_split = reps_test if reps_test else reps_train
        idx = _subset(next(iter(lf_split.values())).shape[0], RANKME_SAMPLES, seed)
        rows, spectra = [], {}
        for name, z in lf_split.items():
            z = z[idx]
            lf = _label_free(z)
            row = {"layer": name, "dim": int(z.shape[1]), "rankme": _r(lf["rankme"]["rankme"]),
                   "alpha_req": _r(lf["alpha_req"]["alpha"], 3) if "alpha" in lf["alpha_req"] else None}
            spectra[name.split(" ")[0]] = lf["spectrum"]
            if name == "backbone":
                result["label_free"] = {
                    "rankme": {**lf["rankme"], "value": _r(lf["rankme"]["rankme"]),
                               "split": "test" if reps_test else "train", "how_to_read": HOW_TO_READ["rankme"]},
                    "alpha_req": {**lf["alpha_req"], "how_to_read": HOW_TO_READ["alpha_req"]},
                }
            rows.append(row)
        if projector is not None and opts.guillotine:
            if labelled:
                for row in rows:
                    name = row["layer"]
                    if name != "backbone":
                        lin = linear_probe(reps_train[name], y_tr, reps_test[name], y_te, lrs=lrs,
                                           weight_decays=wds, epochs=opts.linear_epochs, seed=seed)
                        row["linear_top1"] = _r(lin["top1"])
                        kn = knn_classify(reps_train[name], y_tr, reps_test[name], y_te, k=opts.knn_k,
                                          temperature=opts.knn_temperature, device=device)
                        row["knn_top1"] = _r(kn["top1"][opts.knn_k])
                    else:
                        row["linear_top1"] = result.get("linear_top1")
                        row["knn_top1"] = result.get("knn_top1")
            result["guillotine"] = rows
        if opts.label_free:
            result["spectra"] = spectra
        clock.lap("label_free", ", ".join(f"{r['layer'].split(' ')[0]} RankMe {r['rankme']}" for r in rows))

    if opts.label_free and opts.lidar_images > 0:
        src = test_data if test_data is not None else train_data
        n = min(opts.lidar_images, len(src))
        if n >= 2:
            vm = view_maker or _default_views(src.image_shape, mean, std)
            idx = _subset(len(src), n, seed + 1)
            views = extract_view_features(encoder, src.images[idx], vm, n_views=opts.lidar_views, seed=seed,
                                          device=device, dtype=dtype)
            li = lidar(views)
            # LiDAR depends on the view distribution: say which one, so numbers are compared like for like
            seen = ("the run's training views (global crops)" if view_maker is not None
                    else f"selfsup's SimCLR views at {src.image_shape[1]} px (no training recipe given)")
            result.setdefault("label_free", {})["lidar"] = {**li, "value": _r(li["lidar"]), "views": seen,
                                                            "how_to_read": HOW_TO_READ["lidar"]}
            clock.lap("lidar", f"LiDAR {result['label_free']['lidar']['value']} ({n} images x "
                               f"{opts.lidar_views} views)")

    if opts.rotation and test_data is not None and train_data.image_shape[1] == train_data.image_shape[2]:
        from selfsup.evaluate.rotation import rotation_probe

        rot = rotation_probe(encoder, train_data.images, test_data.images, mean, std,
                             n_train=min(5000, len(train_data)), n_test=min(2500, len(test_data)),
                             epochs=opts.linear_epochs, seed=seed, device=device, dtype=dtype)
        result.setdefault("label_free", {})["rotation"] = {**rot, "top1": _r(rot["top1"]),
                                                           "val_top1": _r(rot["val_top1"])}
        clock.lap("rotation", f"rotation-prediction top-1 {result['label_free']['rotation']['top1']}% (chance 25)")

    if labelled and opts.linear_aug:
        from selfsup.evaluate.aug_probe import augmented_linear_probe

        la = augmented_linear_probe(encoder, train_data.images, y_tr, test_data.images, y_te, mean, std,
                                    seed=seed, device=device)
        result["linear_aug"] = {**la, "top1": _r(la["top1"])}
        clock.lap("linear_aug", f"top-1 {result['linear_aug']['top1']}%")
    if labelled and opts.finetune:
        from selfsup.evaluate.finetune import finetune

        if not isinstance(encoder, nn.Module):
            raise ValueError("eval.finetune=true needs the encoder as an nn.Module (its weights are trained).")
        ft = finetune(encoder, train_data.images, y_tr, test_data.images, y_te, mean, std,
                      epochs=opts.finetune_epochs, train_size=opts.finetune_train_size or None, seed=seed,
                      batch_size=opts.finetune_batch_size, device=device)
        result["finetune"] = {**ft, "top1": _r(ft["top1"])}
        clock.lap("finetune", f"top-1 {result['finetune']['top1']}%")

    if opts.decoder and out_dir is not None:
        from selfsup.evaluate.decoder import visualize_representations

        names = ["backbone"] + [n for n in reps_train if n.startswith("projector.out")]
        query = test_data if test_data is not None else train_data
        query_reps = reps_test if test_data is not None else reps_train
        result["decoder"] = visualize_representations(
            {n: reps_train[n] for n in names}, {n: query_reps[n] for n in names}, train_data.images,
            query.images, out_dir, query_labels=query.labels, steps=opts.decoder_steps, seed=seed, device=device,
            verbose=verbose)
        clock.lap("decoder", f"grids for {', '.join(result['decoder']['grids'])}")

    result["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - t_start, 1)}
    if out_dir is not None:
        from selfsup.runtime import save_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if opts.report:
            from selfsup.report.report import write_report

            t0 = time.perf_counter()
            write_report(out_dir, result, test_images=test_data.images if test_data is not None else None,
                         test_labels=test_data.labels if test_data is not None else None, test_features=test_f,
                         train_images=train_data.images, train_features=train_f, train_labels=train_data.labels,
                         metrics_path=metrics_path, map_points=opts.tsne_points)
            result["seconds"]["report"] = round(time.perf_counter() - t0, 1)
            result["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
            if verbose:
                print(f"  eval report: {result['seconds']['report']:.1f} s -> {out_dir / 'report.html'}", flush=True)
        save_json(out_dir / "eval.json", result)
    return result


def _default_views(image_shape, mean, std):
    """SimCLR's augmentation at the data's size: the default view distribution for LiDAR on foreign encoders."""
    from selfsup.data.views import build_view_maker

    return build_view_maker("simclr", image_shape[1], mean, std, image_shape[0])
