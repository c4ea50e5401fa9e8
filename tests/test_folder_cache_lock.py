"""The processes of a multi-process run load an image folder at the same moment (torchrun, srun): one of them decodes
it into the cache and the others wait and map the same file, instead of every process decoding every image."""

import multiprocessing as mp
import os

import numpy as np
import torch
from PIL import Image


def _write_folder(root, n=24):
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(cls / f"{i}.png")


def _load(root, cache, log, barrier, out):
    import selfsup.data.folder as fd

    build = fd._build_cache

    def counted(*args, **kwargs):  # record each decode of the whole folder, and make it slow enough to overlap
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        import time

        time.sleep(0.5)
        return build(*args, **kwargs)

    fd._build_cache = counted
    barrier.wait()  # every process starts loading at once
    data = fd.load_folder(root, image_size=16, cache_dir=cache)
    torch.save({"images": data.images.clone(), "labels": data.labels}, out)


def test_one_process_decodes_and_the_others_map_its_cache(tmp_path):
    root, cache, log = tmp_path / "imgs", tmp_path / "cache", tmp_path / "decodes.log"
    _write_folder(root)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_load, args=(root, cache, log, barrier, tmp_path / f"{i}.pt")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # decoded once, not once per process
    got = [torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(3)]
    assert got[0]["images"].shape == (24, 3, 16, 16)
    assert all(torch.equal(g["images"], got[0]["images"]) and torch.equal(g["labels"], got[0]["labels"])
               for g in got)
