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

from stages import cnn, world
from stages.contract import (
    NullTracker,
    StageContext,
    StageError,
    StageResult,
    seed_stage,
)
from stages.data import common, synthetic
from stages.data import imagenet as imagenet_data
from stages.train.checkpoint import load_weights
from stages.train.sampler import ResumableBatchSampler

ROOT = Path(__file__).resolve().parents[3]
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
    paths, labels, _ = imagenet_data.load_imagefolder(imagenet / "train")
    cached = imagenet_data.ImageClassDataset(paths, labels, 16, train=True, cache=None, cache_mb=1.0, raw=True)
    streamed = imagenet_data.ImageClassDataset(paths, labels, 16, train=True, cache=None, cache_mb=0.001, raw=True)
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
    out = imagenet_data.normalize_images(x, torch.tensor([True, False, True, False]))
    per_item = imagenet_data.ImageClassDataset(paths[:4], labels[:4], 16, train=False, cache=False)
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


# ---------------------------------------------------------------------------------------------- detector


def test_detector_decodes_lazily_and_checks_sizes_up_front(tmp_path):
    from stages import detector
    from stages.data import visual_genome

    images, _ = visual_genome.load_vg(FIX / "vg_v14")
    pixels = detector.decode_images(images)
    assert isinstance(pixels, visual_genome.VGPixels) and len(pixels) == len(images)
    x = pixels[1]
    assert x.dtype == torch.uint8 and x.shape == (3, images[1].height, images[1].width)
    assert torch.equal(x, torch.from_numpy(np.array(common.open_rgb(images[1].path))).permute(2, 0, 1))
    sub = pixels.subset([2, 0])
    assert [im.image_id for im in sub.images] == [images[2].image_id, images[0].image_id]
    bad = [images[0].__class__(**{**images[0].__dict__, "width": images[0].width + 1})]
    with pytest.raises(StageError, match=rf"{images[0].path}: image is .* but image_data.json says"):
        detector.decode_images(bad)


def _det_cfg(workers: int):
    from stages import detector

    return detector.Config(backbone_from=None, eval_batch_size=2, regions={"k": 3}, bad_boxes="drop",
                           runtime={"device": "cpu", "threads": 1, "num_workers": workers, "checkpoint_every": 50},
                           model={"num_classes_k": 3, "backbone": {"widths": [4, 8, 8, 8]}, "fpn_channels": 8,
                                  "representation_size": 16, "min_size": 32, "max_size": 32,
                                  "anchor_sizes": [4, 8, 16, 32], "rpn_batch_size_per_image": 16,
                                  "box_batch_size_per_image": 16},
                           train={"steps": 3, "batch_size": 2, "lr": 1e-3})


def test_detector_streamed_through_workers_writes_the_same_store(tmp_path):
    """Images decoded per item in 2 workers (training and the region pass) vs in the main process:
    the same region store, bit for bit (flips are drawn in the main process)."""
    from stages import detector
    from stages.data.regions import RegionStore

    wres = real_world(tmp_path, vg=FIX / "vg_v14")
    stores = []
    for workers in (0, 2):
        cfg = _det_cfg(workers)
        ctx = ctx_for("detector", cfg, tmp_path / f"det{workers}", {"world": wres})
        seed_stage(cfg)
        res = detector.run(ctx)
        stores.append(RegionStore(ctx.stage_dir / res.outputs["regions"]))
    a, b = stores
    assert a.image_ids == b.image_ids and a.num_boxes == b.num_boxes
    for name in ("features", "geometry", "probs"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------------------- region reading


def _store(path: Path, n: int = 12, k: int = 5, d: int = 24, c: int = 3, seed: int = 0):
    from stages.data.regions import RegionStore, RegionStoreWriter

    rng = np.random.default_rng(seed)
    w = RegionStoreWriter(path, n, k, d, [f"c{i}" for i in range(c)])
    for i in range(n):
        m = 1 + i % k
        w.add(100 + i, rng.normal(size=(m, d)), rng.random((m, 6)), rng.random((m, c + 1)))
    w.close()
    return RegionStore(path)


def _old_table(store, image_ids):
    """The in-memory float32 table vl used before (np.stack of every image, then indexing)."""
    parts = [store[i] for i in image_ids]
    return {"feats": torch.from_numpy(np.stack([p[0] for p in parts]).astype(np.float32)),
            "geom": torch.from_numpy(np.stack([p[1] for p in parts]).astype(np.float32)),
            "probs": torch.from_numpy(np.stack([p[2] for p in parts]).astype(np.float32)),
            "n_boxes": torch.tensor([p[3] for p in parts], dtype=torch.long)}


def test_region_table_reads_the_memmap_per_batch_equal_to_the_old_in_memory_table(tmp_path):
    import pickle

    from stages.data.text_regions import RegionTable, TextRegionData

    store = _store(tmp_path / "regions")
    ids = [111, 100, 105, 103, 110, 101]  # a subset, not in store order
    table = RegionTable(store, ids)
    assert not hasattr(table, "feats")  # nothing stacked up front
    old = _old_table(store, ids)
    rows = torch.tensor([3, 0, 5, 3, 1])
    new = table.batch(rows)
    assert new["feats"].dtype == torch.float16  # float32 only on the device, in VisualEmbedding
    for key, v in old.items():
        assert torch.equal(new[key].float() if v.is_floating_point() else new[key], v[rows]), key
    # a DataLoader over TextRegionData: the gather runs in the collate, in the main process or in workers
    texts = [[5 + i % 3, 7, 2] for i in range(len(ids) * 2)]
    ds = TextRegionData(table, [i % len(ids) for i in range(len(texts))], texts, pad_id=0)
    got = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate, num_workers=workers)
        got[workers] = list(loader)
    for a, b in zip(got[0], got[2]):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for b, batch in enumerate(got[0]):
        r = batch["row"]
        assert torch.equal(batch["feats"].float(), old["feats"][r]) and torch.equal(batch["probs"].float(), old["probs"][r])
    # what the model computes from them: identical (float16 -> float32 is exact, wherever it happens)
    from stages.models.vlp import VisualEmbedding

    torch.manual_seed(0)
    emb = VisualEmbedding(store.feature_dim, store.prob_dim, 8)
    assert torch.equal(emb(new["feats"], new["geom"], new["probs"]),
                       emb(old["feats"][rows], old["geom"][rows], old["probs"][rows]))
    copy = pickle.loads(pickle.dumps(table))  # spawn-started workers: re-opens the maps by path
    assert copy._store is None and len(pickle.dumps(table)) < 2000
    assert torch.equal(copy.batch(rows)["feats"], new["feats"])


@pytest.mark.slow
@pytest.mark.parametrize("c", [0, 1600], ids=["no-probs", "1600-classes"])
def test_region_table_loader_throughput(tmp_path, c):
    """rows/s through TextRegionData's DataLoader at K=100, D=2048 (the gather + float32 of each batch);
    prints the numbers. The store is written once; reads hit the page cache (warm)."""
    import time

    from stages.data.regions import RegionStore, RegionStoreWriter
    from stages.data.text_regions import RegionTable, TextRegionData

    n, k, d, bs = 2000, 100, 2048, 64
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, k, d)).astype(np.float32)
    geom, probs = rng.random((k, 6)).astype(np.float32), rng.random((k, c + 1)).astype(np.float32)
    w = RegionStoreWriter(tmp_path / "regions", n, k, d, [f"c{i}" for i in range(c)])
    for i in range(n):
        w.add(i, feats[i % 8], geom, probs)
    w.close()
    table = RegionTable(RegionStore(tmp_path / "regions"), list(range(n)))
    ds = TextRegionData(table, list(range(n)), [[5, 6, 7, 2]] * n, pad_id=0)
    for workers in (0, 2):
        sampler = ResumableBatchSampler(n, bs, seed=0, total=n // bs)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate, num_workers=workers)
        t0 = time.perf_counter()
        seen = 0
        for batch in loader:
            assert batch["feats"].dtype == torch.float16 and batch["feats"].shape[1:] == (k, d)
            seen += len(batch["row"])
        s = time.perf_counter() - t0
        row_bytes = 2 * (d + 6 + c + 1)
        print(f"\nRegionTable via DataLoader, K={k} D={d} C+1={c + 1}, batch {bs}, {workers} workers: "
              f"{seen * k / s:,.0f} rows/s = {seen / s:,.0f} images/s ({seen * k * row_bytes / s / 1e9:.2f} GB/s "
              f"float16 out)")
    # the ceiling of worker -> main-process transfer alone: batches of the same size, no reading at all
    shape = (bs, k, d + 6 + c + 1)
    loader = torch.utils.data.DataLoader(range(n), batch_size=bs, num_workers=2,
                                         collate_fn=lambda idx: torch.empty(shape, dtype=torch.float16))
    t0 = time.perf_counter()
    seen = sum(len(b) for b in loader)
    s = time.perf_counter() - t0
    print(f"\n(ceiling) empty float16 batches {shape} from 2 workers: {seen * k / s:,.0f} rows/s")


# ---------------------------------------------------------------------------------------------- start at stage 4


def _text_world(root: Path) -> Path:
    """The synthetic world's COCO captions, VQA and corpus (no images needed downstream of regions)."""
    cfg = world.Config(scenes={"train": 12, "val": 4}, corpus={"documents": 30})
    out = root / "outputs"
    out.mkdir(parents=True)
    synthetic.write_scenes(out, cfg, 0)
    synthetic.write_corpus(out, cfg, 0)
    return out


def _bua_tsv(path: Path, image_ids: list[int], dim: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for iid in image_ids:
        n = int(rng.integers(2, 5))
        xy = rng.uniform(0, 30, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 30, (n, 2))], 1).astype(np.float32)
        rows.append({"image_id": iid, "image_w": 64, "image_h": 64, "num_boxes": n, "boxes": boxes,
                     "features": rng.gamma(1.0, 1.0, (n, dim)).astype(np.float32)})
    mf.write_bua_tsv(path, rows, mf.BUA_FIELDS)
    return path


TINY = ["runtime={device: cpu, precision: fp32, num_workers: 0, threads: 1, log_every: 2, checkpoint_every: 50}",
        "stages.bert.model={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position: 40}",
        "stages.bert.seq_len=24", "stages.bert.train={steps: 3, batch_size: 8, lr: 0.003}",
        "stages.bert.eval_batch_size=16",
        "stages.vl.max_caption_len=12", "stages.vl.train={steps: 4, batch_size: 8, lr: 0.001}",
        "stages.vl.eval_batch_size=16"]


def test_vl_from_an_imported_bua_store_via_world_paths_regions(tmp_path):
    """configs/vlp-from-features.yaml, shrunk by overrides, run stage by stage with `python -m stages`:
    world (real: paths.regions = a store imported from a BUA TSV, coco, corpus) -> bert -> vl reading
    `regions: world`. Then the failures name the key: a store without one of the images, a paths.regions
    that is not a store, and a world without paths.regions (refused when the recipe is validated)."""
    from stages.__main__ import main
    from stages.data.captions import coco_captions_file, load_coco_captions
    from stages.data.regions import import_bua_tsv
    from stages.recipe import RecipeError, load_recipe

    config = ROOT / "configs" / "vlp-from-features.yaml"
    r = load_recipe(config)
    assert list(r.stages) == ["world", "bert", "vl", "caption", "vqa"]
    assert r.stages["world"].paths.regions and r.stages["world"].declared_outputs() == {"regions", "corpus", "coco", "vqa"}
    assert all(r.stages[s].regions == "world" and "detector" not in r.stages[s].needs for s in ("vl", "caption", "vqa"))
    with pytest.raises(RecipeError, match=r"stages\.vl\.regions: stage 'world' has no 'regions' output .*"
                                          r"set stages\.world\.paths\.regions"):
        load_recipe(config, ["stages.world.paths.regions=null"])

    out = _text_world(tmp_path / "text")
    ids = sorted(i for split in ("train", "val")
                 for i in load_coco_captions(coco_captions_file(out / "coco", split))[0])
    store = import_bua_tsv(_bua_tsv(tmp_path / "feats.tsv", ids), tmp_path / "bua_store")
    assert store.k == 4 and store.feature_dim == 16 and store.image_ids == ids
    paths = [f"stages.world.paths={{regions: {tmp_path / 'bua_store'}, coco: {out / 'coco'}, corpus: {out / 'corpus'}}}"]
    ov = TINY + paths
    for d in ("world", "bert", "vl"):
        (tmp_path / d).mkdir()
    assert main([str(config), "world", *ov, "--out", str(tmp_path / "world")]) == 0
    w = json.loads((tmp_path / "world" / "result.json").read_text())
    assert w["outputs"]["regions"] == str(tmp_path / "bua_store") and w["info"]["regions"]["k"] == 4
    assert main([str(config), "bert", *ov, "--out", str(tmp_path / "bert"), "--upstream",
                 f"world={tmp_path / 'world'}"]) == 0
    ups = ["--upstream", f"world={tmp_path / 'world'}", "--upstream", f"bert={tmp_path / 'bert'}"]
    assert main([str(config), "vl", *ov, "--out", str(tmp_path / "vl"), *ups]) == 0
    res = json.loads((tmp_path / "vl" / "result.json").read_text())
    assert np.isfinite(res["metrics"]["val/mlm_ppl"]) and res["metrics"]["val/mlm_ppl"] > 1
    assert (tmp_path / "vl" / "outputs" / "model" / "model.safetensors").is_file()

    # a store that lacks one val image: the error names the key and the image
    import_bua_tsv(_bua_tsv(tmp_path / "short.tsv", ids[:-1]), tmp_path / "short_store")
    wres, wdir = real_world(tmp_path, "world_short", regions=tmp_path / "short_store", coco=out / "coco")
    from stages import vl

    cfg = load_recipe(config, ov).stages["vl"]
    bert_res = StageResult.model_validate_json((tmp_path / "bert" / "result.json").read_text())
    ctx = ctx_for("vl", cfg, tmp_path / "vl_short", {"world": (wres, wdir), "bert": (bert_res, tmp_path / "bert")})
    with pytest.raises(StageError, match=rf"stages\.vl\.regions = 'world': region store .*short_store has no regions "
                                         rf"for 1 image\(s\), e\.g\. image_id \[{ids[-1]}\]"):
        vl.run(ctx)
    (tmp_path / "not_a_store").mkdir()
    with pytest.raises(StageError, match=r"paths\.regions = .*not_a_store.*no index\.json"):
        real_world(tmp_path, "world_bad", regions=tmp_path / "not_a_store")
    # a world stage without paths.regions, run directly (no recipe check): the error names the key too
    wres, wdir = real_world(tmp_path, "world_noreg", coco=out / "coco")
    ctx = ctx_for("vl", cfg, tmp_path / "vl_noreg", {"world": (wres, wdir), "bert": (bert_res, tmp_path / "bert")})
    with pytest.raises(StageError, match=r"stages\.vl\.regions = 'world': stage 'world' has no `regions` output "
                                         r"\(set stages\.world\.paths\.regions"):
        vl.run(ctx)


@pytest.mark.slow
def test_decode_throughput(tmp_path):
    """images/s of decode_resized (PIL draft for JPEGs) vs a full decode + resize, on a 500x375 JPEG
    (ImageNet's typical size); prints the numbers. Same process, one thread."""
    import time

    y, x = np.mgrid[0:375, 0:500]
    a = np.stack([(x * 0.5) % 255, (y * 0.7) % 255, ((x + y) * 0.3) % 255], -1)
    a = a + np.random.default_rng(0).normal(0, 20, a.shape)
    path = tmp_path / "photo.JPEG"
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)

    def full(p, s):
        with Image.open(p) as im:
            return np.array(im.convert("RGB").resize((s, s), Image.BILINEAR))

    for s in (224, 64):
        for name, fn in (("full decode + resize", full), ("decode_resized (draft)", imagenet_data.decode_resized)):
            fn(path, s)
            t0, n = time.perf_counter(), 60
            for _ in range(n):
                fn(path, s)
            print(f"\n500x375 JPEG -> {s}px, {name}: {n / (time.perf_counter() - t0):,.0f} images/s")
