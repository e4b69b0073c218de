"""Region rows per second: the vision-language stages' input (issue 13 part 7).

    python -m tools.bench_regions [--images 600] [--classes 1 1601] [--batch 256] [--seq-per-s 2940]

Writes a float16 region store (K=100, D=2048) of random rows, then reads batches the way the training loop
does (ResumableBatchSampler -> DataLoader(num_workers=0) -> TextRegionData.collate, the gather from the
memory maps) three ways: reading alone; serial with a step of ``batch / seq_per_s`` seconds (the step is a
sleep, which releases the GIL as a CUDA step waiting on the GPU does); and overlapped, read ahead in the
loop's prefetch thread (stages.train.prefetch). rows/s = batch x K per batch over the wall time. The need
is ``seq_per_s`` x K (the H200 anchor for VLP base: 2,940 seq/s x 100 = 0.29M rows/s)."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.data.regions import GEOMETRY_DIM, RegionStore, RegionStoreWriter
from stages.data.text_regions import RegionTable, TextRegionData
from stages.train.prefetch import read_ahead
from stages.train.sampler import ResumableBatchSampler


def write_store(path: Path, n_images: int, k: int, dim: int, classes: int, seed: int = 0) -> RegionStore:
    """A complete store of ``n_images`` x ``k`` random float16 rows (written in chunks of 50 images)."""
    rng = np.random.default_rng(seed)
    with RegionStoreWriter(path, n_images, k, dim, [f"c{i}" for i in range(classes)]) as w:
        for s in range(0, n_images, 50):
            n = min(50, n_images - s)
            f = rng.standard_normal((n, k, dim), dtype=np.float32).astype(np.float16)
            g = rng.random((n, k, GEOMETRY_DIM), dtype=np.float32).astype(np.float16)
            p = rng.random((n, k, classes + 1), dtype=np.float32).astype(np.float16)
            for i in range(n):
                w.add(s + i, f[i], g[i], p[i])
        w.close()
    return RegionStore(path)


def _batches(store: RegionStore, batch: int, steps: int, prefetch: bool):
    table = RegionTable(store, store.image_ids)
    n = len(store.image_ids)
    data = TextRegionData(table, list(range(n)), [[5, 6, 7, 8, 9, 3]] * n, pad_id=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=ResumableBatchSampler(n, batch, 0, 0, steps),
                                         collate_fn=data.collate, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    return read_ahead(it, data, 0) if prefetch else it


def rows_per_s(store: RegionStore, batch: int, steps: int, step_s: float, prefetch: bool) -> float:
    it = _batches(store, batch, steps, prefetch)
    next(it)  # the first batch (and the reader's start) is not timed
    t = time.perf_counter()
    done = 0
    for b in it:
        assert b["feats"].dtype == torch.float16
        if step_s:
            time.sleep(step_s)
        done += 1
    return done * batch * store.k / (time.perf_counter() - t)


def measure(workdir: Path, images: int = 600, classes: tuple[int, ...] = (1, 1601), k: int = 100, dim: int = 2048,
            batch: int = 256, seq_per_s: float = 2940.0, steps: int = 24) -> dict:
    """{classes: {read_only, serial, overlapped} rows/s} and the need, for each class-column count."""
    step_s = batch / seq_per_s
    out: dict = {"k": k, "feature_dim": dim, "batch": batch, "images": images, "step_s": round(step_s, 4),
                 "need_rows_per_s": round(seq_per_s * k)}
    for c in classes:
        path = Path(workdir) / f"regions-c{c}"
        store = write_store(path, images, k, dim, c)
        rows_per_s(store, batch, 4, 0.0, False)  # warm the page cache
        r = {name: round(rows_per_s(store, batch, steps, s, p)) for name, s, p in
             (("read_only", 0.0, False), ("serial", step_s, False), ("overlapped", step_s, True))}
        r["overlapped_meets_need"] = r["overlapped"] >= 0.95 * out["need_rows_per_s"]
        out[f"classes_{c}"] = r
        del store
        shutil.rmtree(path, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--classes", type=int, nargs="+", default=[1, 1601])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seq-per-s", type=float, default=2940.0, help="the step rate to keep up with (anchor seq/s)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-regions-") as d:
        print(json.dumps(measure(Path(d), a.images, tuple(a.classes), batch=a.batch, seq_per_s=a.seq_per_s,
                                 steps=a.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
