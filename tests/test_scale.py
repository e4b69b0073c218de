"""Real-scale data paths: cnn image caching as a memory budget (cached and streamed decoding give the
same batches and the same trained weights, for any num_workers, and a resumed run sees the same
augmentations), the detector's lazy per-item decoding, the float16 memory-mapped region reading of
vl/caption/vqa (batches equal to the old in-memory float32 table), and starting at stage 4 from an
imported bottom-up-attention TSV store (``world.paths.regions``)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import cnn, data, world
from stages.base import NullTracker, StageContext, StageError, StageResult, seed_stage
from stages.checkpoint import load_weights
from stages.train import ResumableBatchSampler

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)


def ctx_for(name: str, cfg, stage_dir: Path, ups: dict[str, tuple[StageResult, Path]]) -> StageContext:
    return StageContext(name=name, config=cfg, stage_dir=stage_dir, upstream={n: r for n, (r, _) in ups.items()},
                        upstream_dirs={n: d for n, (_, d) in ups.items()}, fingerprint="t", tracker=NullTracker())


def real_world(tmp_path: Path, name: str = "world", **paths) -> tuple[StageResult, Path]:
    cfg = world.Config(source="real", paths={k: str(v) for k, v in paths.items()})
    d = tmp_path / name
    return world.run(ctx_for(name, cfg, d, {})), d


# ---------------------------------------------------------------------------------------------- cnn


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """3 classes x (6 train + 2 val) JPEGs of 48x40 (so a 16 px read uses JPEG draft scaling) and one PNG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(3):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                a[:, : 16 + 8 * c, c] += 180  # a class-coloured band on the left: flips matter
                ext = ".png" if (split, c, i) == ("train", 0, 0) else ".JPEG"
                Image.fromarray(a).save(d / f"n0000000{c}_{i}{ext}", quality=90)
    return root


def test_decode_uses_jpeg_draft_and_cached_equals_streamed(imagenet):
    paths, labels, _ = data.load_imagefolder(imagenet / "train")
    cached = data.ImageClassDataset(paths, labels, 16, train=True, cache=None, cache_mb=1.0, raw=True)
    streamed = data.ImageClassDataset(paths, labels, 16, train=True, cache=None, cache_mb=0.001, raw=True)
    assert cached.cached and not streamed.cached and streamed.images is None
    assert cached.decoded_mb == pytest.approx(18 * 3 * 16 * 16 / 2 ** 20)
    with Image.open(paths[1]) as im:  # a JPEG: draft mode reads it at half scale (24x20) before the resize
        im.draft("RGB", (16, 16))
        assert im.size == (24, 20)
    # the same batches through the training sampler, in the main process and in 2 workers
    batches = {}
    for name, ds, workers in (("cached", cached, 0), ("streamed", streamed, 0), ("streamed-2w", streamed, 2)):
        sampler = ResumableBatchSampler(len(ds), 4, seed=1, start=0, total=6)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        batches[name] = [(x.clone(), y.clone()) for x, y in loader]
    for name in ("streamed", "streamed-2w"):
        for (xa, ya), (xb, yb) in zip(batches["cached"], batches[name]):
            assert xa.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb), name
    # normalisation + flips on the batch = the per-item path of a non-raw dataset
    x = torch.stack([cached[i][0] for i in range(4)])
    out = data.normalize_images(x, torch.tensor([True, False, True, False]))
    per_item = data.ImageClassDataset(paths[:4], labels[:4], 16, train=False, cache=False)
    assert out.dtype == torch.float32 and torch.allclose(out[1], per_item[1][0], atol=1e-6)
    assert torch.allclose(out[0], per_item[0][0].flip(-1), atol=1e-6)


def _cnn_cfg(workers: int, cache_mb: float, seed: int = 0):
    return cnn.Config(seed=seed, model={"widths": [4, 4, 8, 8]}, image_size=16, eval_batch_size=8,
                      runtime={"device": "cpu", "threads": 1, "num_workers": workers, "cache_images_mb": cache_mb,
                               "checkpoint_every": 3, "log_every": 3},
                      train={"steps": 6, "batch_size": 4, "lr": 3e-3})


def _run_cnn(tmp_path: Path, wres, name: str, cfg, stage_dir: Path | None = None):
    ctx = ctx_for("cnn", cfg, stage_dir or tmp_path / name, {"world": wres})
    seed_stage(cfg)  # as the flow's worker does before run
    res = cnn.run(ctx)
    return res, load_weights(ctx.stage_dir / "outputs" / "model" / "model.safetensors"), ctx


def test_cnn_cached_and_streamed_train_the_same_weights_and_resume_exactly(tmp_path, imagenet):
    """Cached in the main process vs streamed through 2 workers: identical weights and metrics. Killed
    after step 3 and resumed (2 workers, streamed): the same weights as the unbroken run, so the
    resumed run drew the same flips (they come from the checkpointed main-process RNG)."""
    wres = real_world(tmp_path, imagenet=imagenet)
    res_c, w_c, ctx_c = _run_cnn(tmp_path, wres, "cached", _cnn_cfg(0, 2048.0))
    res_s, w_s, ctx_s = _run_cnn(tmp_path, wres, "streamed", _cnn_cfg(2, 0.0))
    assert ctx_c.tracker.params["data.train_cached"] is True and ctx_s.tracker.params["data.train_cached"] is False
    assert res_c.metrics == res_s.metrics
    for k, v in w_c.items():
        assert torch.equal(v, w_s[k]), k
    d = ctx_s.stage_dir
    shutil.rmtree(d / "checkpoints" / f"{6:08d}")
    shutil.rmtree(d / "outputs")
    res_r, w_r, _ = _run_cnn(tmp_path, wres, "streamed", _cnn_cfg(2, 0.0), d)
    assert res_r.info["resumed_from"] == 3
    for k, v in w_s.items():
        assert torch.equal(v, w_r[k]), k
