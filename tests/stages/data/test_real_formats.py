"""Real dataset formats on the committed fixtures (tests/fixtures, written by make_fixtures.py):
ImageNet layout with unreadable images, Visual Genome v1.0 / v1.4 quirks, bottom-up-attention TSV
import into the region store, the store surviving SIGKILL, and the real-data recipe configs/vlp-base.yaml."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import cnn, detector, world
from stages.contract import NullTracker, StageContext, StageError
from stages.data import imagenet, visual_genome
from stages.data.regions import (
    RegionStore,
    RegionStoreWriter,
    import_bua_tsv,
    read_class_vocab,
)
from stages.fsio import temp_path, temps_of

ROOT = Path(__file__).resolve().parents[3]
FIX = ROOT / "tests" / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

RUNTIME = {"device": "cpu", "checkpoint_every": 50, "log_every": 50}


def real_world(tmp_path: Path, **paths) -> tuple:
    """A `world` stage with source: real pointing at fixture folders -> (result, stage dir)."""
    cfg = world.Config(source="real", paths={k: str(v) for k, v in paths.items()})
    d = tmp_path / "world"
    res = world.run(StageContext(name="world", config=cfg, stage_dir=d, upstream={}, upstream_dirs={},
                                 fingerprint="w", tracker=NullTracker()))
    return res, d


def stage_ctx(name: str, cfg, stage_dir: Path, ups: dict) -> StageContext:
    return StageContext(name=name, config=cfg, stage_dir=stage_dir, upstream={n: r for n, (r, _) in ups.items()},
                        upstream_dirs={n: d for n, (_, d) in ups.items()}, fingerprint="t", tracker=NullTracker())


def test_fixtures_are_small_and_complete():
    files = [p for p in FIX.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total < 200_000, f"fixtures are {total} bytes"
    for name in mf.OUTPUTS:
        assert (FIX / name).is_dir(), f"run tests/fixtures/make_fixtures.py ({name} missing)"


# ---------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_layout_and_its_odd_files_load():
    paths, labels, classes = imagenet.load_imagefolder(FIX / "imagenet" / "train")
    assert classes == ["n01440764", "n01443537"] and labels == [0, 0, 1, 1]
    ds = imagenet.ImageClassDataset(paths, labels, image_size=16, train=False)  # CMYK JPEG, PNG named .JPEG
    assert ds.images.shape == (4, 3, 16, 16) and not ds.skipped
    vpaths, vlabels, vclasses = imagenet.load_imagefolder(FIX / "imagenet" / "val")
    assert vclasses == classes
    x, y = imagenet.ImageClassDataset(vpaths, vlabels, image_size=16, train=False)[0]  # greyscale
    assert x.shape == (3, 16, 16) and y == 0
    assert imagenet.read_synset_words(FIX / "imagenet") == {"n01440764": "tench, Tinca tinca",
                                                       "n01443537": "goldfish, Carassius auratus"}
    assert imagenet.class_index(classes, FIX / "imagenet")["wnid_to_index"] == {"n01440764": 0, "n01443537": 1}
    assert imagenet.class_index(classes, FIX)["names"] == {}  # no synset_words.txt there


def test_unreadable_image_error_names_the_file_or_is_skipped_and_counted():
    bad = FIX / "imagenet_bad" / "train" / "n01440764" / "n01440764_2.JPEG"
    paths, labels, _ = imagenet.load_imagefolder(FIX / "imagenet_bad" / "train")
    with pytest.raises(StageError, match=re.escape(str(bad))):
        imagenet.ImageClassDataset(paths, labels, image_size=16, train=False)
    ds = imagenet.ImageClassDataset(paths, labels, image_size=16, train=False, skip_bad=True)
    assert len(ds) == 3 and ds.images.shape[0] == 3 and bad not in ds.paths
    assert [p for p, _ in ds.skipped] == [bad] and str(bad) in ds.skipped[0][1]
    assert ds.labels == [0, 1, 1]  # labels follow the kept files


def test_cnn_stage_skip_bad_images_and_class_index(tmp_path):
    wres = real_world(tmp_path, imagenet=FIX / "imagenet_bad")
    base = dict(model={"widths": [4, 4, 4, 4]}, image_size=16, eval_batch_size=4, runtime=RUNTIME,
                train={"steps": 2, "batch_size": 2, "lr": 1e-3})
    with pytest.raises(StageError, match=r"n01440764_2\.JPEG"):
        cnn.run(stage_ctx("cnn", cnn.Config(**base), tmp_path / "strict", {"world": wres}))
    ctx = stage_ctx("cnn", cnn.Config(**base, skip_bad_images=True), tmp_path / "skip", {"world": wres})
    res = cnn.run(ctx)
    assert res.metrics["data/skipped_bad_images"] == 1 and res.info["data/skipped_bad_images"] == 1
    assert res.info["skipped_files"] == [str(FIX / "imagenet_bad" / "train" / "n01440764" / "n01440764_2.JPEG")]
    index = json.loads((ctx.stage_dir / res.outputs["classes"]).read_text())
    assert res.outputs["classes"] == "outputs/model/classes.json"
    assert index == {"wnid_to_index": {"n01440764": 0, "n01443537": 1},
                     "names": {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus"}}


# ---------------------------------------------------------------------------------------------- Visual Genome


def test_vg_v14_quirks():
    vg = FIX / "vg_v14"
    images, stats = visual_genome.load_vg(vg)
    assert [im.image_id for im in images] == [1, 2, 2417890]
    # images are found where the real download unpacks them: the folder named in each url
    assert [im.path for im in images] == [vg / "VG_100K" / "1.jpg", vg / "VG_100K" / "2.jpg",
                                          vg / "VG_100K_2" / "2417890.jpg"]
    assert all(im.path.is_file() for im in images)
    im1, im2, im3 = images
    # 103 merged into 102, 105 fully outside, 106 zero width, 107 nameless: dropped; 104 clipped
    assert im1.names == ["man", "shirt", "window", "zebra crossing"]
    np.testing.assert_array_equal(im1.boxes[2], [10, 0, 16, 3])
    assert stats["merged"] == 1 and stats["dropped_degenerate"] == 2 and stats["dropped_unnamed"] == 1
    assert stats["clipped"] == 1 and stats["objects"] == 4 + 3 + 3
    # attributes: normalised, merged object's go to the survivor, missing "attributes" key / record -> []
    assert im1.attributes == [["standing", "tall"], ["white"], [], []]
    assert im2.names == ["man", "window", "tree"] and im2.attributes == [["standing"], [], []]
    np.testing.assert_array_equal(im2.boxes[2], [0, 0, 16, 12])  # exactly the (16x12) image: not clipped
    assert im3.attributes == [[], [], []]
    assert (im2.width, im2.height) == (16, 12)
    for im in images:  # boxes inside the image, positive area
        assert (im.boxes[:, 0] >= 0).all() and (im.boxes[:, 2] <= im.width).all() and (im.boxes[:, 3] <= im.height).all()
        assert ((im.boxes[:, 2] > im.boxes[:, 0]) & (im.boxes[:, 3] > im.boxes[:, 1])).all()

    objects, attributes, vstats = visual_genome.vg_vocabularies(images, num_objects=3, num_attributes=1)
    assert objects == ["man", "window", "tree"] and attributes == ["standing"]
    assert vstats["boxes"] == 10 and vstats["boxes_unknown_name"] == 2  # shirt, zebra crossing
    assert vstats["attributes"] == 4 and vstats["attributes_unknown"] == 2
    all_objects, _, s = visual_genome.vg_vocabularies(images, 0, 0)
    assert len(all_objects) == 5 and s["boxes_unknown_name"] == 0

    splits, how = visual_genome.vg_splits(vg, images, seed=0)
    assert splits == {"train": [0, 2], "val": [1]} and "id lists" in how


def test_vg_v10_keys_no_attributes_and_seeded_split(tmp_path):
    vg = FIX / "vg_v10"
    images, stats = visual_genome.load_vg(vg)
    assert [im.image_id for im in images] == [10, 11]
    assert images[0].path == vg / "VG_100K" / "10.jpg" and images[0].path.is_file()
    assert images[0].names == ["dog", "ball"] and images[1].names == ["dog"]
    np.testing.assert_array_equal(images[0].boxes[1], [12, 12, 16, 16])
    assert stats["dropped_degenerate"] == 1 and stats["clipped"] == 1 and stats["with_attributes"] == 0
    assert all(a == [] for im in images for a in im.attributes)
    splits, how = visual_genome.vg_splits(vg, images, seed=0)  # no id lists
    assert sorted(splits["train"] + splits["val"]) == [0, 1] and len(splits["val"]) == 1 and "seeded" in how

    many = [visual_genome.VGImage(i, Path(f"{i}.jpg"), 4, 4, np.zeros((0, 4), np.float32), []) for i in range(200)]
    a, _ = visual_genome.vg_splits(tmp_path, many, seed=3, val_fraction=0.1)
    b, _ = visual_genome.vg_splits(tmp_path, many, seed=3, val_fraction=0.1)
    c, _ = visual_genome.vg_splits(tmp_path, many, seed=4, val_fraction=0.1)
    assert a == b and a != c and len(a["val"]) == 20 and not set(a["train"]) & set(a["val"])
    assert sorted(a["train"] + a["val"]) == list(range(200))


def test_vg_split_from_one_list_and_list_errors(tmp_path):
    images = [visual_genome.VGImage(i, Path(f"{i}.jpg"), 4, 4, np.zeros((0, 4), np.float32), []) for i in (5, 6, 7)]
    (tmp_path / "val_ids.txt").write_text("6\n")
    splits, _ = visual_genome.vg_splits(tmp_path, images, seed=0)
    assert splits == {"train": [0, 2], "val": [1]}
    (tmp_path / "train_ids.txt").write_text("5\n6\n")
    with pytest.raises(StageError, match=r"in both, e\.g\. 6"):
        visual_genome.vg_splits(tmp_path, images, seed=0)
    (tmp_path / "train_ids.txt").write_text("5\n99\n")
    with pytest.raises(StageError, match=r"train_ids\.txt.*not in image_data\.json.*99"):
        visual_genome.vg_splits(tmp_path, images, seed=0)


def test_detector_runs_on_the_vg_fixture(tmp_path):
    """The real-format quirks end to end: url folders, a non-square image, clipped/dropped boxes. A box
    with no area inside its image is an error naming it unless the config says to drop such boxes."""
    wres = real_world(tmp_path, vg=FIX / "vg_v14")
    strict = detector.Config(backbone_from=None, runtime=RUNTIME, train={"steps": 2, "batch_size": 2})
    with pytest.raises(StageError, match=r"objects\.json: record 0 \(image_id 1\) object \d \(object_id 105\): box "
                                         r"x=\S+ y=\S+ w=\S+ h=\S+ has no area inside its 16x16 image \(set bad_boxes: drop"):
        detector.run(stage_ctx("detector", strict, tmp_path / "strict", {"world": wres}))
    assert not (tmp_path / "strict" / "result.json").exists()
    cfg = detector.Config(backbone_from=None, runtime=RUNTIME, eval_batch_size=3, regions={"k": 3}, bad_boxes="drop",
                          model={"num_classes_k": 3, "backbone": {"widths": [4, 8, 8, 8]}, "fpn_channels": 8,
                                 "representation_size": 16, "min_size": 32, "max_size": 32,
                                 "anchor_sizes": [4, 8, 16, 32], "rpn_batch_size_per_image": 16,
                                 "box_batch_size_per_image": 16},
                          train={"steps": 2, "batch_size": 2, "lr": 1e-3})
    ctx = stage_ctx("detector", cfg, tmp_path / "det", {"world": wres})
    res = detector.run(ctx)
    store = RegionStore(ctx.stage_dir / res.outputs["regions"])
    assert store.image_ids == [1, 2, 2417890] and store.k == 3 and store.feature_dim == 16
    assert store.classes == ["man", "window", "shirt"]  # top 3 of the train split (ties alphabetical)


# ---------------------------------------------------------------------------------------------- TSV import


def _expected_geometry(r: dict) -> np.ndarray:
    w, h = r["image_w"], r["image_h"]
    b = np.clip(r["boxes"] / np.array([w, h, w, h], np.float32), 0, 1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.concatenate([b, area[:, None], np.ones((len(b), 1))], 1)


def test_bua_tsv_import_round_trip(tmp_path):
    rows = mf.bua_rows(0)
    store = import_bua_tsv(FIX / "bua" / "tiny.tsv", tmp_path / "regions")
    assert store.image_ids == [9, 25, 42] and store.k == 5 and store.feature_dim == mf.BUA_DIM
    assert store.num_classes == 0 and store.prob_dim == 1
    assert store.features.dtype == np.float16 and isinstance(store.features, np.memmap)
    for r in rows:
        f, g, p, n = store[r["image_id"]]
        assert n == r["num_boxes"]
        np.testing.assert_allclose(f[:n].astype(np.float32), r["features"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(g[:n].astype(np.float32), _expected_geometry(r), rtol=1e-3, atol=1e-3)
        assert (g[0, 2] == 1.0) and (p == 0).all()  # the box past the border is clipped; no cls_prob
        assert not f[n:].any() and not g[n:].any()  # zero padding up to K


def test_bua_tsv_with_header_cls_prob_and_vocab(tmp_path):
    rows = mf.bua_rows(1, with_cls=True)
    vocab = FIX / "bua" / "objects_vocab.txt"
    assert read_class_vocab(vocab) == ["man", "window", "tree"]
    store = import_bua_tsv(FIX / "bua" / "tiny_cls.tsv", tmp_path / "regions", classes=vocab)
    assert store.image_ids == [73, 74] and store.classes == ["man", "window", "tree"] and store.prob_dim == 4
    for r in rows:
        f, g, p, n = store[r["image_id"]]
        np.testing.assert_allclose(p[:n].astype(np.float32), r["cls_prob"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(f[:n].astype(np.float32), r["features"], rtol=1e-3, atol=1e-3)
    with pytest.raises(StageError, match=r"cls_prob has 4 columns but classes has 1 names"):
        import_bua_tsv(FIX / "bua" / "tiny_cls.tsv", tmp_path / "r2", classes=["man"])


def test_bua_tsv_other_column_order_and_top_k_by_confidence(tmp_path):
    """LXMERT-style dumps: img_id, img_h, img_w, objects_id, objects_conf, ... in another order."""
    fields = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
              "boxes", "features"]
    rows = mf.bua_rows(0)
    for r in rows:
        n = r["num_boxes"]
        r.update(objects_id=np.arange(n, dtype=np.float32), attrs_id=np.zeros(n, np.float32),
                 attrs_conf=np.zeros(n, np.float32), objects_conf=np.linspace(0.1, 0.9, n, dtype=np.float32),
                 img_id=r["image_id"], img_h=r["image_h"], img_w=r["image_w"])
    tsv = tmp_path / "lxmert.tsv"
    mf.write_bua_tsv(tsv, rows, fields)
    store = import_bua_tsv(tsv, tmp_path / "regions", k=2, fieldnames=fields)
    assert store.k == 2
    r = rows[1]  # 5 boxes, confidence rising: the last two are kept, most confident first
    f, g, _, n = store[25]
    assert n == 2
    np.testing.assert_allclose(f.astype(np.float32), r["features"][[4, 3]], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(g[:, 5].astype(np.float32), [0.9, 0.7], rtol=1e-3)


def test_bua_tsv_errors_name_the_line(tmp_path):
    rows = mf.bua_rows(0)
    dup = tmp_path / "dup.tsv"
    mf.write_bua_tsv(dup, [rows[0], rows[1], rows[0]], mf.BUA_FIELDS)
    with pytest.raises(StageError, match=r"dup\.tsv: line 3 \(image_id 9\): duplicate image_id, first at dup\.tsv line 1"):
        import_bua_tsv(dup, tmp_path / "out")
    short = tmp_path / "short.tsv"
    bad = dict(rows[1], features=rows[1]["features"][:, :5])
    mf.write_bua_tsv(short, [rows[0], bad], mf.BUA_FIELDS)
    with pytest.raises(StageError, match=r"short\.tsv: line 2 \(image_id 25\): column 'features'"):
        import_bua_tsv(short, tmp_path / "out")
    with pytest.raises(StageError, match="not found"):
        import_bua_tsv(tmp_path / "nope.tsv", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not temps_of(tmp_path / "out")


def test_bua_tsv_cli(tmp_path):
    out = tmp_path / "regions"
    p = subprocess.run([sys.executable, "-m", "stages.data.regions", "import-tsv", str(FIX / "bua" / "tiny.tsv"),
                        str(FIX / "bua" / "tiny_cls.tsv"), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "shards must have the same columns" in p.stderr and not out.exists()
    p = subprocess.run([sys.executable, "-m", "stages.data.regions", "import-tsv", str(FIX / "bua" / "tiny_cls.tsv"),
                        str(out), "--classes", str(FIX / "bua" / "objects_vocab.txt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["images"] == 2 and summary["num_classes"] == 3
    assert RegionStore(out).image_ids == [73, 74]


# ---------------------------------------------------------------------------------------------- atomic store

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from stages.data.regions import RegionStoreWriter
    out, n, k, d, delay, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    w = RegionStoreWriter(out, n, k, d, ["a", "b"])
    print("tmp", w.tmp, flush=True)
    for i in range(n):
        w.add(i, np.full((k, d), tag, np.float32), np.ones((k, 6)), np.ones((k, 3)))
        if i == 5:
            print("writing", flush=True)
        time.sleep(delay)
    w.close()
    print("done", flush=True)
""")


def _writer(out: Path, n: int, delay: float, k: int = 10, d: int = 64, tag: float = 1.0) -> subprocess.Popen:
    """A subprocess writing a store of n images whose features are all ``tag``."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(n), str(k), str(d), str(delay), str(tag)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_sigkill_mid_write_never_leaves_a_complete_looking_store(tmp_path):
    out = tmp_path / "regions"
    proc = _writer(out, 2000, 0.01)  # ~20 s if left alone
    assert proc.stdout.readline().startswith("tmp ")
    assert proc.stdout.readline().strip() == "writing"
    tmp = temp_path(out, pid=proc.pid)
    assert tmp.is_dir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(StageError, match="incomplete or missing"):
        RegionStore(out)
    with pytest.raises(StageError, match="incomplete or missing"):
        RegionStore(tmp)  # the leftover temp dir does not read as a store either
    # the next writer of the same path clears the dead writer's leftovers and publishes
    w = RegionStoreWriter(out, 1, 2, 4, [])
    assert not tmp.exists()
    w.add(7, np.ones((2, 4)), np.ones((2, 6)), np.ones((2, 1)))
    w.close()
    assert RegionStore(out).image_ids == [7] and not temps_of(out)


def test_sigkill_at_any_moment_leaves_the_previous_store_or_the_new_one(tmp_path):
    """Kills spread over a whole write (start-up, appends, fsync, publish): what reads back is always a
    complete store, the previous one or the new one, or (between the two renames) no store."""
    out, n, k, d = tmp_path / "regions", 300, 100, 512  # 31 MB of features
    t0 = time.perf_counter()
    assert _writer(out, n, 0.0, k, d, tag=1).wait(timeout=120) == 0
    full = time.perf_counter() - t0
    complete, outcomes = 1.0, []
    for j, frac in enumerate(np.linspace(0.3, 1.2, 10)):
        tag = float(j + 2)
        proc = _writer(out, n, 0.0, k, d, tag=tag)
        time.sleep(frac * full)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        try:
            store = RegionStore(out)
        except StageError as e:
            assert "incomplete or missing" in str(e)
            outcomes.append("none")
            continue
        t = float(store.features[0, 0])
        assert t in (complete, tag), (t, complete, tag)
        assert store.image_ids == list(range(n)) and store.num_boxes == [k] * n
        assert (store.features == t).all() and (store.geometry == 1).all() and (store.probs == 1).all()
        outcomes.append("new" if t == tag else "previous")
        complete = t
    print(f"\nwrite of {full:.2f} s, killed at 30%..120%: {outcomes}")
    assert len(outcomes) == 10


def test_store_without_index_or_with_short_arrays_is_refused(tmp_path):
    out = tmp_path / "regions"
    w = RegionStoreWriter(out, 2, 3, 4, ["a"])
    for i in range(2):
        w.add(i, np.ones((3, 4)), np.ones((3, 6)), np.ones((3, 2)))
    w.close()
    features = (out / "features.npy").read_bytes()
    (out / "features.npy").write_bytes(features[: len(features) - 8])
    with pytest.raises(StageError, match=r"features\.npy"):
        RegionStore(out)
    (out / "index.json").unlink()
    with pytest.raises(StageError, match="incomplete or missing"):
        RegionStore(out)


# ---------------------------------------------------------------------------------------------- throughput


class _StoreItems(torch.utils.data.Dataset):
    def __init__(self, path: Path):
        self.path, self.store = path, None

    def __len__(self) -> int:
        return len(RegionStore(self.path)) if self.store is None else len(self.store)

    def __getitem__(self, i: int):
        if self.store is None:  # opened in the worker: memory maps do not cross fork well
            self.store = RegionStore(self.path)
        f, g, p, n = self.store[self.store.image_ids[i]]
        return torch.from_numpy(np.array(f)), torch.from_numpy(np.array(g)), torch.from_numpy(np.array(p)), n


@pytest.mark.slow
@pytest.mark.parametrize("c", [0, 1600], ids=["no-probs", "1600-classes"])
def test_region_store_throughput(tmp_path, c):
    n, k, d = 2000, 100, 2048
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((16, k, d)).astype(np.float32)
    geom, probs = rng.random((k, 6)).astype(np.float32), rng.random((k, c + 1)).astype(np.float32)
    t0 = time.perf_counter()
    w = RegionStoreWriter(tmp_path / "regions", n, k, d, [f"c{i}" for i in range(c)])
    for i in range(n):
        w.add(i, feats[i % 16], geom, probs)
    w.close()
    write_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (tmp_path / "regions").iterdir())

    loader = torch.utils.data.DataLoader(_StoreItems(tmp_path / "regions"), batch_size=64, num_workers=2,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    seen = 0
    for f, g, p, nb in loader:
        assert f.dtype == torch.float16 and f.shape[1:] == (k, d)
        seen += len(f)
    read_s = time.perf_counter() - t0
    assert seen == n
    rows = n * k
    print(f"\nregion store K={k} D={d} C+1={c + 1}, {n} images, {size / 1e9:.2f} GB: "
          f"write {rows / write_s:,.0f} rows/s ({size / write_s / 1e6:,.0f} MB/s, {write_s:.1f} s), "
          f"read (DataLoader, 2 workers, shuffled, warm page cache) {rows / read_s:,.0f} rows/s "
          f"({size / read_s / 1e6:,.0f} MB/s, {read_s:.1f} s)")


# ---------------------------------------------------------------------------------------------- the recipe


def test_vlp_base_recipe_validates_with_the_paper_sizes():
    from flows.fingerprint import plan_fingerprints
    from stages.recipe import load_recipe

    path = ROOT / "configs" / "vlp-base.yaml"
    assert path.read_text().splitlines()[0] == "#   baton run configs/vlp-base.yaml"  # opens with its command
    r = load_recipe(path)
    s = r.stages
    assert list(s) == ["world", "cnn", "detector", "bert", "vl", "caption", "vqa"]
    fps = plan_fingerprints(s)
    assert len({sp.fingerprint for sp in fps.values()}) == len(s)

    assert s["world"].source == "real"
    assert {k for k, v in s["world"].paths.model_dump().items() if v} == {"imagenet", "vg", "corpus", "coco", "vqa"}
    assert s["cnn"].model.arch == "resnet50" and s["cnn"].model.stem == "imagenet" and s["cnn"].image_size == 224
    m = s["detector"].model
    assert m.num_classes_k == 1600 and s["detector"].regions.k == 100
    assert (m.min_size, m.max_size, m.representation_size) == (600, 1000, 2048)
    assert len(m.anchor_sizes) == len(m.returned_layers) + 1
    b = s["bert"]
    assert (b.model.hidden_size, b.model.num_layers, b.model.num_heads, b.model.intermediate_size) == (768, 12, 12, 3072)
    assert b.tokenizer.vocab_size == 30522 and b.seq_len == 128
    assert s["vqa"].num_answers == 3129
    for name in ("vl", "caption", "vqa"):  # [CLS] + K regions + [SEP] + text + [SEP] fits BERT's positions
        text = getattr(s[name], "max_caption_len", None) or s[name].max_question_len
        assert s["detector"].regions.k + 3 + text <= b.model.max_position
    for cfg in s.values():
        rt = cfg.runtime
        assert (rt.device, rt.precision, rt.channels_last, rt.num_workers) == ("cuda", "bf16", True, 8)
