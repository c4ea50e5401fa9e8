"""`selfsup embed`: embeddings of a dataset or an image folder, and nearest-neighbour queries against them.

    selfsup embed runs/simclr-.../ fashion_mnist --split test --out fmnist-test.npz
    selfsup embed runs/simclr-.../backbone.safetensors ~/photos --out photos.parquet
    selfsup embed --query ~/photos/cat.jpg --index photos.parquet -k 5

The model is a run directory (its exported backbone, or the encoder of its last checkpoint for an interrupted run)
or an exported backbone (a folder, or its ``.safetensors`` / ``.json`` file). Images are prepared exactly as the
evaluation prepares them (cookbook §3.7.1: un-augmented, ``(x / 255 - mean) / std`` with the run's statistics, the
encoder in eval mode): named datasets at their own size, image folders read by :mod:`selfsup.data.folder`'s decoder
(EXIF orientation, 16-bit and alpha handling, short side resized to the image size, then center-cropped).

The file (chosen by the suffix of ``--out``) holds one row per image:

- ``.npz``: ``embeddings`` float32 (N, D), ``names`` (N,) str, ``labels`` int64 (N,) when known, ``meta`` a JSON
  string. Read it with ``np.load(path)`` (no pickle needed).
- ``.parquet`` (needs pyarrow): columns ``name``, ``label`` (when known), ``embedding`` (a fixed-size list of D
  float32); the same JSON in the schema metadata under ``selfsup``.

``names`` are paths relative to the folder (``cat/001.jpg``) or ``split/index`` for named datasets (``train/000123``).
``meta`` records the model's path and the preprocessing (image size, channels, mean, std), so a query image is
embedded by the same model, prepared the same way, without repeating any option.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.config import ConfigError

FORMAT = "selfsup-embeddings"
FORMAT_VERSION = 1
SUFFIXES = (".npz", ".parquet")
PROGRESS_MIN_IMAGES = 2000  # smaller sets finish before a progress bar would say anything useful


class EmbedError(ConfigError):
    """A usage mistake (unknown data, wrong suffix, an index that is not one): exit code 2 before any work."""


@dataclass
class Encoder:
    """A network that maps normalized float images ``(B, C, H, W)`` to ``(B, D)``, with the preprocessing it needs."""

    network: nn.Module
    mean: list[float]
    std: list[float]
    image_size: int | None  # folder and query images are resized to this; None: named datasets keep their own
    source: str  # absolute path of the run directory or export it was loaded from
    backbone: str | None = None
    export_id: str | None = None

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def embed(self, images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``(N, D)`` float32 features of uint8 images, as the evaluation computes them."""
        from selfsup.evaluate.features import extract_features

        return extract_features(self.network, images_uint8, self.mean, self.std, batch_size=len(images_uint8),
                                device=device)


# ----------------------------------------------------------------------------------------------- loading the model


def load_encoder(source: str | os.PathLike, *, data_name: str | None = None, image_size: int | None = None,
                 device: str | torch.device = "cpu") -> Encoder:
    """The encoder of a run directory (has ``config.yaml``) or of an exported backbone, with its preprocessing.

    ``data_name`` (a dataset name or "folder") supplies the normalization of an export that records none, as
    ``selfsup eval BACKBONE data=NAME`` does. ``image_size`` overrides the size folder and query images get.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise EmbedError(f"{path} does not exist: pass a run directory (with config.yaml) or an exported backbone "
                         "(a folder with backbone.safetensors + backbone.json, or the .safetensors file)")
    if (path / "config.yaml").is_file():
        encoder = _run_encoder(path, device)
    else:
        encoder = _backbone_encoder(path, data_name, device)
    if image_size is not None:
        encoder.image_size = _checked_size(image_size)
    return encoder


def _checked_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise EmbedError(f"the image size must be a positive integer, got {size!r}")
    return size


def _run_encoder(run_dir: Path, device) -> Encoder:
    """A run's exported backbone with the statistics it recorded, else the encoder of its last checkpoint."""
    from selfsup.nn.backbones import WEIGHTS_FILE, export_info, load_backbone
    from selfsup.runs import load_run_config

    cfg = load_run_config(run_dir)
    size = _run_image_size(cfg)
    if (run_dir / WEIGHTS_FILE).is_file():
        info = export_info(run_dir)
        if info["mean"] is not None:
            network = load_backbone(run_dir, raw=True).to(device)
            return Encoder(network, info["mean"], info["std"], size, str(run_dir.resolve()), info["name"],
                           info["export_id"])
    from selfsup.data.datasets import describe_data
    from selfsup.runs import load_data, load_run_encoder

    data = describe_data(load_data(cfg)[0], cfg.data.name)  # the method is built from the data's description
    network = load_run_encoder(run_dir, cfg, data, device)
    return Encoder(network.eval(), list(data.mean), list(data.std), size, str(run_dir.resolve()),
                   cfg.model.backbone)


def _run_image_size(cfg) -> int:
    """The size the run's evaluation sees: a named dataset's own size, else the folder size it was trained on."""
    from selfsup.data.datasets import DATASET_INFO, canonical_name

    size = DATASET_INFO[canonical_name(cfg.data.name)].size
    return size or cfg.data.image_size or cfg.views.size


def _backbone_encoder(path: Path, data_name: str | None, device) -> Encoder:
    """An exported backbone; normalization from its backbone.json, else the statistics of ``data_name``."""
    from selfsup.data.datasets import dataset_stats
    from selfsup.data.folder import DEFAULT_IMAGE_SIZE
    from selfsup.nn.backbones import export_info, load_backbone

    try:
        info = export_info(path)
    except (FileNotFoundError, ValueError) as e:
        raise EmbedError(str(e)) from None
    mean, std = info["mean"], info["std"]
    if mean is None:
        stats_name = data_name or "folder"
        mean, std = (list(v) for v in dataset_stats(stats_name, channels=info["in_chans"]))
        print(f"selfsup embed: {info['config_path']} records no normalization; using the {stats_name} statistics "
              f"mean={mean} std={std}", file=sys.stderr)
    size = info["kwargs"].get("img_size") or DEFAULT_IMAGE_SIZE
    network = load_backbone(path, raw=True).to(device)
    return Encoder(network, mean, std, int(size), str(path.resolve()), info["name"], info["export_id"])


# ----------------------------------------------------------------------------------------------- reading the images


@dataclass
class Images:
    """Where the images come from: a count, batches of ``(uint8 (b, C, H, W), names, labels or None)``, classes."""

    count: int
    batches: Iterator[tuple[torch.Tensor, list[str], torch.Tensor | None]]
    classes: list[str] | None
    description: dict


def open_images(data: str, encoder: Encoder, *, split: str = "train", root: str | None = None,
                batch_size: int = 256) -> Images:
    """``data``: an image folder or file (a path), or a dataset name (``split`` of it, found under ``root``)."""
    path = Path(data).expanduser()
    if path.exists():
        return _folder_images(path, encoder, batch_size)
    from selfsup.data.datasets import canonical_name

    try:
        name = canonical_name(data)
    except ValueError as e:
        raise EmbedError(f"{data!r} is neither an existing folder or image file nor a dataset name ({e.args[0]})") \
            from None
    if name == "folder":
        raise EmbedError("for an image folder, pass its path as DATA (e.g. selfsup embed RUN ~/photos --out x.npz)")
    return _dataset_images(name, split, root, encoder, batch_size)


def _dataset_images(name: str, split: str, root: str | None, encoder: Encoder, batch_size: int) -> Images:
    from selfsup.data.datasets import load_dataset

    try:
        ds = load_dataset(name, split, root=root)
    except ValueError as e:  # an unknown split
        raise EmbedError(str(e)) from None
    channels = ds.image_shape[0]
    if channels not in (1, encoder.in_chans):
        raise EmbedError(f"{name} has {channels}-channel images but the model takes {encoder.in_chans} channels")

    def batches():
        for start in range(0, len(ds), batch_size):
            x = ds.images[start:start + batch_size]
            if channels != encoder.in_chans:  # grayscale into an RGB model: replicate, as the folder reader does
                x = x.expand(-1, encoder.in_chans, -1, -1)
            names = [f"{split}/{i:06d}" for i in range(start, start + len(x))]
            y = None if ds.labels is None else ds.labels[start:start + len(x)]
            yield x, names, y

    return Images(len(ds), batches(), ds.classes, {"dataset": name, "split": split, "image_size": ds.image_shape[1]})


def _folder_images(path: Path, encoder: Encoder, batch_size: int) -> Images:
    """Every image under a folder (labels from class sub-folders when every image sits in one), or one file."""
    from selfsup.data.folder import labels_from_subfolders, scan_images

    if path.is_dir():
        directory, (files, problems) = path, scan_images(path)
    else:
        directory, files, problems = path.parent, [path.name], []
    for rel, reason in problems:
        print(f"selfsup embed: skipped {directory / rel}: {reason}", file=sys.stderr)
    if not files:
        raise EmbedError(f"no image files under {path}")
    labels, classes = labels_from_subfolders(files)
    size = encoder.image_size

    def batches():
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(files), batch_size):
                chunk = list(range(start, min(start + batch_size, len(files))))
                decoded = pool.map(lambda i: read_image(directory / files[i], size, encoder.in_chans), chunk)
                kept = [(i, a) for i, a in zip(chunk, decoded) if a is not None]
                if not kept:
                    continue
                x = torch.from_numpy(np.stack([a for _, a in kept]))
                y = None if labels is None else torch.tensor([labels[i] for i, _ in kept])
                yield x, [files[i] for i, _ in kept], y

    return Images(len(files), batches(), classes, {"folder": str(path.resolve()), "image_size": size})


def read_image(path: Path, size: int, channels: int, *, strict: bool = False) -> np.ndarray | None:
    """One image as uint8 ``(channels, size, size)`` by the folder reader's rules; None (with a note on stderr) when
    it cannot be read, or :class:`selfsup.data.types.DataError` with ``strict=True``."""
    from selfsup.data.folder import decode_image, skip_reason
    from selfsup.data.types import DataError

    result = decode_image(path, size, "L" if channels == 1 else "RGB")
    if isinstance(result, Exception):
        if strict:
            raise DataError(f"cannot read image {path}: {skip_reason(result)}")
        print(f"selfsup embed: skipped {path}: {skip_reason(result)}", file=sys.stderr)
        return None
    return np.ascontiguousarray(result)  # a writable copy (PIL's buffers are read-only)


# ----------------------------------------------------------------------------------------------- embedding


def embed(source: str | os.PathLike, data: str, out: str | os.PathLike, *, split: str = "train",
          root: str | None = None, image_size: int | None = None, batch_size: int = 256,
          device: str = "auto") -> Path:
    """Write the embeddings of ``data`` by the model at ``source`` to ``out`` (.npz or .parquet); return ``out``."""
    from selfsup.runtime import select_device

    out = Path(out)
    check_output(out)
    if batch_size < 1:
        raise EmbedError(f"the batch size must be >= 1, got {batch_size}")
    dev = select_device(device)
    data_name = None if Path(data).expanduser().exists() else data
    encoder = load_encoder(source, data_name=data_name, image_size=image_size, device=dev)
    images = open_images(data, encoder, split=split, root=root, batch_size=batch_size)
    embeddings, names, labels = _embed_all(encoder, images, dev)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "source": encoder.source, "backbone": encoder.backbone,
            "export_id": encoder.export_id, "image_size": encoder.image_size, "in_chans": encoder.in_chans,
            "mean": encoder.mean, "std": encoder.std, "classes": images.classes, **images.description}
    write_embeddings(out, embeddings, names, labels, meta)
    print(f"selfsup embed: {len(names)} embeddings of dimension {embeddings.shape[1]} -> {out}", file=sys.stderr)
    return out


def check_output(out: Path) -> None:
    """Refuse an output suffix that is neither format, and Parquet without pyarrow, before any work."""
    if out.suffix not in SUFFIXES:
        raise EmbedError(f"--out {out}: the suffix chooses the format; use .npz (NumPy) or .parquet (pyarrow)")
    if out.suffix == ".parquet":
        _pyarrow()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("writing or reading .parquet needs pyarrow: pip install pyarrow (or write .npz)") from None
    return pyarrow


def _embed_all(encoder: Encoder, images: Images, device) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """All embeddings, names and labels, batch after batch (a progress bar on stderr for big sets)."""
    from tqdm import tqdm

    chunks, names, labels = [], [], []
    bar = tqdm(total=images.count, unit="img", desc="selfsup embed", file=sys.stderr,
               disable=True if images.count < PROGRESS_MIN_IMAGES else None)  # None: only on a terminal
    with bar:
        for x, batch_names, y in images.batches:
            chunks.append(encoder.embed(x, device).numpy())
            names += batch_names
            labels.append(y)
            bar.update(len(batch_names))
    if not chunks:
        raise EmbedError("none of the images could be read (see the messages above)")
    known = all(y is not None for y in labels)
    return np.concatenate(chunks), names, torch.cat(labels).numpy().astype(np.int64) if known else None


# ----------------------------------------------------------------------------------------------- files


def write_embeddings(out: str | os.PathLike, embeddings: np.ndarray, names: list[str], labels: np.ndarray | None,
                     meta: dict) -> None:
    """Write the rows atomically (a crash leaves the previous file, never half of one)."""
    from selfsup.runtime import atomic_write_bytes

    out = Path(out)
    check_output(out)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(names) != len(embeddings) or (labels is not None and len(labels) != len(embeddings)):
        raise ValueError(f"{len(embeddings)} embeddings but {len(names)} names"
                         + ("" if labels is None else f" and {len(labels)} labels"))
    text = json.dumps(meta)
    if out.suffix == ".npz":
        arrays = {"embeddings": embeddings, "names": np.array(names, dtype=str), "meta": np.array(text)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        atomic_write_bytes(out, lambda f: np.savez(f, **arrays))
        return
    pa = _pyarrow()
    columns = {"name": pa.array(names, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    dim = embeddings.shape[1]
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
    table = pa.table(columns).replace_schema_metadata({"selfsup": text})
    atomic_write_bytes(out, lambda f: pa.parquet.write_table(table, f))


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray | None, dict]:
    """``(embeddings (N, D) float32, names, labels or None, meta)`` of a file written by :func:`embed`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmbedError(f"no embeddings file at {path}: write one with selfsup embed MODEL DATA --out {path.name}")
    check_output(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                emb, names = f["embeddings"], f["names"].tolist()
                labels = f["labels"] if "labels" in f.files else None
                meta = json.loads(str(f["meta"]))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[b"selfsup"])
            emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
            names = table.column("name").to_pylist()
            labels = np.asarray(table.column("label")) if "label" in table.column_names else None
    except (KeyError, ValueError, OSError) as e:
        raise EmbedError(f"{path} is not a selfsup embeddings file ({type(e).__name__}: {e}); write it with "
                         "selfsup embed") from None
    if meta.get("format") != FORMAT:
        raise EmbedError(f"{path} is not a selfsup embeddings file (its metadata names no {FORMAT!r} format)")
    return np.array(emb, dtype=np.float32), names, labels, meta  # a writable copy (Parquet buffers are read-only)


# ----------------------------------------------------------------------------------------------- queries


def query(index: str | os.PathLike, image: str | os.PathLike, k: int = 5, *, source: str | None = None,
          device: str = "auto") -> list[dict]:
    """The ``k`` rows of ``index`` nearest to ``image`` by cosine similarity, best first:
    ``[{"name", "similarity", "label"?, "class"?}, ...]``.

    The image is embedded by the model the index records (``source`` overrides its path, e.g. after moving the
    run), prepared with the index's image size and normalization.
    """
    from selfsup.runtime import select_device

    if k < 1:
        raise EmbedError(f"-k must be >= 1, got {k}")
    emb, names, labels, meta = read_embeddings(index)
    dev = select_device(device)
    encoder = _query_encoder(meta, source, dev)
    pixels = read_image(Path(image).expanduser(), encoder.image_size, encoder.in_chans, strict=True)
    q = encoder.embed(torch.from_numpy(pixels)[None], dev)[0]
    if q.shape[0] != emb.shape[1]:
        raise EmbedError(f"the model at {encoder.source} gives {q.shape[0]}-d embeddings but {index} holds "
                         f"{emb.shape[1]}-d ones: pass the model that wrote the index")
    sims = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1) @ torch.nn.functional.normalize(q, dim=0)
    top = torch.topk(sims, min(k, len(names)))
    return [_hit(i, float(s), names, labels, meta.get("classes")) for s, i in zip(top.values, top.indices.tolist())]


def _query_encoder(meta: dict, source: str | None, device) -> Encoder:
    """The index's model with the index's preprocessing (which is what its rows were embedded with)."""
    where = source or meta.get("source")
    try:
        encoder = load_encoder(where, device=device)
    except EmbedError as e:
        raise EmbedError(f"{e}\n(the index was written from {meta.get('source')}; pass the model's current path as "
                         "selfsup embed MODEL --query IMAGE --index FILE)") from None
    if meta.get("export_id") and encoder.export_id and encoder.export_id != meta["export_id"]:
        print(f"selfsup embed: warning: {where} was exported again since the index was written (export_id "
              f"{encoder.export_id} vs {meta['export_id']}); similarities compare embeddings of two models",
              file=sys.stderr)
    encoder.mean, encoder.std = meta["mean"], meta["std"]
    encoder.image_size = meta.get("image_size") or encoder.image_size
    return encoder


def _hit(i: int, similarity: float, names: list[str], labels, classes) -> dict:
    hit = {"name": names[i], "similarity": similarity}
    if labels is not None:
        hit["label"] = int(labels[i])
        if classes and 0 <= hit["label"] < len(classes):
            hit["class"] = classes[hit["label"]]
    return hit


def format_hits(hits: list[dict]) -> str:
    """One line per neighbour: rank, cosine similarity, name (and class when known)."""
    lines = []
    for rank, h in enumerate(hits, 1):
        cls = f"  [{h['class']}]" if "class" in h else (f"  [label {h['label']}]" if "label" in h else "")
        lines.append(f"{rank:3d}  {h['similarity']:.4f}  {h['name']}{cls}")
    return "\n".join(lines)
