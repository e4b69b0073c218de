"""Caption formats beyond COCO: Karpathy split JSON and Conceptual-Captions-style TSV (committed
fixtures, tests/fixtures/make_fixtures.py), their conversion by the ``world`` stage into the COCO
captions layout vl / caption read, and the caption stage's sample PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
from PIL import Image

from stages import world
from stages.contract import NullTracker, StageContext, StageError, StageResult
from stages.data import captions, synthetic
from stages.data.regions import RegionStoreWriter

FIX = Path(__file__).resolve().parents[2] / "fixtures"
KARPATHY = FIX / "karpathy" / "dataset_coco.json"
CC = FIX / "cc"


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


def real_world(stage_dir: Path, **cfg) -> StageResult:
    ctx = StageContext(name="world", config=world.Config(source="real", **cfg), stage_dir=stage_dir, upstream={},
                       upstream_dirs={}, fingerprint="w", tracker=NullTracker())
    res = world.run(ctx)
    (stage_dir / "result.json").write_text(res.model_dump_json())
    return res


def ids(images: list[captions.CaptionImage]) -> list[int]:
    return [im.image_id for im in images]


# ---------------------------------------------------------------------------------------------- Karpathy


def test_karpathy_split_json_and_its_quirks():
    splits, stats = captions.load_karpathy(KARPATHY)
    assert ids(splits["train"]) == [9, 42, 5]  # restval (42) joins train; 5: no cocoid, so its imgid
    assert ids(splits["val"]) == [73, 74] and ids(splits["test"]) == [133]
    assert stats == {"id_from_cocoid": 5, "id_from_imgid": 1, "restval": 1}
    first = splits["train"][0]
    assert first.captions == ["A red square next to a blue circle .", "a square and a circle"]
    assert splits["val"][0].captions[1] == "A star and a cross."  # a newline inside raw
    assert first.file_name == "COCO_train2014_000000000009.jpg"
    assert Path(first.file_path) == FIX / "karpathy" / "train2014" / "COCO_train2014_000000000009.jpg"
    assert Path(first.file_path).is_file()
    dropped, _ = captions.load_karpathy(KARPATHY, restval="drop")
    assert ids(dropped["train"]) == [9, 5]
    moved, _ = captions.load_karpathy(KARPATHY, image_root=Path("/data/coco"))
    assert moved["val"][0].file_path == "/data/coco/val2014/COCO_val2014_000000000073.jpg"


def _karpathy_variant(tmp_path: Path, edit) -> Path:
    d = json.loads(KARPATHY.read_text())
    edit(d["images"])
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("edit, message", [
    (lambda ims: ims[2].pop("filename"), r"images\[2\] \(cocoid 73\): missing key 'filename'"),
    (lambda ims: ims[3].update(split="dev"), r"images\[3\] \(cocoid 74\): unknown split 'dev'"),
    (lambda ims: [ims[5].pop("imgid")], r"images\[5\]: missing key 'imgid'"),
    (lambda ims: ims[0].update(sentences=[]), r"images\[0\] \(cocoid 9\): no sentences"),
    (lambda ims: ims[1]["sentences"][0].pop("raw"), r"images\[1\] \(cocoid 42\) sentences\[0\]: missing key 'raw'"),
    (lambda ims: ims[4].update(cocoid=73), r"images\[4\] \(cocoid 73\): image id 73 repeats images\[2\]"),
])
def test_karpathy_bad_records_name_file_and_record(tmp_path, edit, message):
    with pytest.raises(StageError, match=r"dataset_coco\.json: " + message):
        captions.load_karpathy(_karpathy_variant(tmp_path, edit))


def test_karpathy_empty_caption_fixture():
    with pytest.raises(StageError, match=r"karpathy_bad/dataset_coco\.json: images\[1\] \(cocoid 42\) "
                                         r"sentences\[1\]: empty caption"):
        captions.load_karpathy(FIX / "karpathy_bad" / "dataset_coco.json")


# ---------------------------------------------------------------------------------------------- CC TSV


def test_cc_tsv_header_ids_quotes_and_urls():
    train = captions.load_cc_tsv(CC / "train.tsv")
    assert ids(train) == [2, 3, 4, 5]  # line numbers; line 1 is the header
    assert train[0].captions == ['a "red" square on grey'] and train[2].captions == ["actor's star on a grey background"]
    assert Path(train[0].file_path) == CC / "images" / "0001.jpg" and train[0].file_name == "0001.jpg"
    assert train[2].file_path == "https://example.invalid/cc/0003.jpg"
    val = captions.load_cc_tsv(CC / "val.tsv", captions.CC_VAL_ID_BASE)  # no header: line 1 is data
    assert ids(val) == [1_000_000_001, 1_000_000_002]


def test_cc_tsv_only_an_exact_first_line_header_is_skipped(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("caption\turl\ncaption\turl\n\na dog\tdog.jpg\n")  # line 2 is data, blank line 3 skipped
    assert [(im.image_id, im.captions[0], im.file_name) for im in captions.load_cc_tsv(p)] == \
        [(2, "caption", "url"), (4, "a dog", "dog.jpg")]
    p.write_text("a dog\turl\n")  # not a header: the caption cell is not a header word
    assert ids(captions.load_cc_tsv(p)) == [1]


@pytest.mark.parametrize("text, message", [
    ("a dog\td.jpg\na cat\tc.jpg\textra\n", r"line 2: expected 2 tab-separated columns \(caption, image\), got 3"),
    ("a dog\td.jpg\njust a caption\n", r"line 2: expected 2 .* got 1"),
    ("a dog\t \n", r"line 1: empty image path/url"),
    ("caption\turl\n", r"no caption rows"),
    (b"a d\xffog\td.jpg\n", r"line 1: not UTF-8"),
])
def test_cc_tsv_malformed_rows_name_the_line(tmp_path, text, message):
    p = tmp_path / "bad.tsv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StageError, match=r"bad\.tsv: " + message):
        captions.load_cc_tsv(p)


def test_cc_empty_caption_fixture():
    with pytest.raises(StageError, match=r"cc/bad\.tsv: line 3: empty caption"):
        captions.load_cc_tsv(CC / "bad.tsv")


# ---------------------------------------------------------------------------------------------- world stage


def test_world_converts_karpathy_to_the_coco_layout(tmp_path):
    res = real_world(tmp_path / "world", paths={"karpathy": str(KARPATHY)})
    assert res.outputs == {"coco": "outputs/coco"}
    assert res.metrics["captions_train"] == 6 and res.metrics["images_val"] == 2 and res.metrics["images_test"] == 1
    coco = tmp_path / "world" / res.outputs["coco"]
    caps, info = {}, {}
    for split in ("train", "val", "test"):
        caps[split], info[split] = captions.load_coco_captions(captions.coco_captions_file(coco, split))
    assert sorted(caps["train"]) == [5, 9, 42] and sorted(caps["val"]) == [73, 74] and sorted(caps["test"]) == [133]
    assert caps["val"][73] == ["a yellow star above a purple cross", "A star and a cross."]
    val_json = captions.coco_captions_file(coco, "val")
    assert captions.caption_image_path(val_json, info["val"][73], "val") == \
        FIX / "karpathy" / "val2014" / "COCO_val2014_000000000073.jpg"
    assert captions.caption_image_path(val_json, info["val"][74], "val") is None  # not on disk
    dropped = real_world(tmp_path / "world2", paths={"karpathy": str(KARPATHY)}, karpathy_restval="drop")
    assert dropped.metrics["images_train"] == 2


def test_world_converts_cc(tmp_path):
    res = real_world(tmp_path / "world", paths={"cc_train": str(CC / "train.tsv"), "cc_val": str(CC / "val.tsv")})
    coco = tmp_path / "world" / res.outputs["coco"]
    train, _ = captions.load_coco_captions(captions.coco_captions_file(coco, "train"))
    val, info = captions.load_coco_captions(captions.coco_captions_file(coco, "val"))
    assert sorted(train) == [2, 3, 4, 5] and sorted(val) == [1_000_000_001, 1_000_000_002]
    val_json = captions.coco_captions_file(coco, "val")
    assert captions.caption_image_path(val_json, info[1_000_000_001], "val") == CC / "images" / "0101.jpg"
    assert captions.caption_image_path(val_json, info[1_000_000_002], "val") is None  # a URL


def test_world_bad_caption_file_leaves_nothing_half_written(tmp_path):
    d = tmp_path / "world"
    with pytest.raises(StageError, match=r"karpathy_bad/dataset_coco\.json: images\[1\]"):
        real_world(d, paths={"karpathy": str(FIX / "karpathy_bad" / "dataset_coco.json")})
    assert sorted(p.name for p in d.iterdir()) == []


@pytest.mark.parametrize("paths, message", [
    ({"karpathy": "a.json", "coco": "/c"}, r"paths.coco and paths.karpathy both provide"),
    ({"karpathy": "a.json", "cc_train": "t.tsv", "cc_val": "v.tsv"}, r"paths.karpathy and paths.cc_train/cc_val"),
    ({"cc_train": "t.tsv"}, r"cc_train and paths.cc_val go together"),
    ({"karpathy_images": "/x", "vg": "/vg"}, r"karpathy_images is set without paths.karpathy"),
])
def test_world_caption_source_config_errors(paths, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        world.Config(source="real", paths=paths)


def test_real_paths_are_the_world_external_inputs():
    cfg = world.Config(source="real", paths={"karpathy": str(KARPATHY), "vg": "/vg"})
    assert {k: v.value for k, v in cfg.external_inputs().items()} == {"paths.karpathy": str(KARPATHY), "paths.vg": "/vg"}


# ---------------------------------------------------------------------------------------------- caption samples


def test_sample_images_of_the_synthetic_world(tmp_path):
    """The synthetic world's COCO JSON points at its images (file_path): N PNGs, larger than the image."""
    from stages.caption import write_sample_images

    cfg = world.Config(scenes={"train": 2, "val": 5, "image_size": 48})
    synthetic.write_scenes(tmp_path, cfg, 0)
    val_json = captions.coco_captions_file(tmp_path / "coco", "val")
    caps, info = captions.load_coco_captions(val_json)
    val_ids = sorted(caps)
    generated = {i: caps[i][-1] for i in val_ids}
    written, skipped = write_sample_images(val_json, info, val_ids, generated, caps, tmp_path / "samples", 3)
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert (written, skipped) == (3, 0) and [p.name for p in pngs] == [f"{k:02d}_{i}.png" for k, i in
                                                                       enumerate(val_ids[:3])]
    for p, iid in zip(pngs, val_ids):
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 48 and im.height > im.width  # enlarged, plus the text band
            src = Image.open(tmp_path / "vg" / "images" / f"{iid}.jpg").convert("RGB")
            f = im.width // 48
            top = np.asarray(im.convert("RGB"))[:48 * f:f, :48 * f:f]
            assert np.array_equal(top, np.asarray(src))  # the image itself, enlarged without resampling


def test_caption_stage_on_karpathy_trains_and_draws_samples(tmp_path):
    """world (paths.karpathy) -> caption (init: null, a tokenizer trained on the captions, random region
    features): results JSON over the Karpathy val ids; a PNG for the val image on disk, the other skipped."""
    from stages import caption
    from stages.config.bert import TokenizerConfig
    from stages.data.text import train_tokenizer

    real_world(tmp_path / "world", paths={"karpathy": str(KARPATHY)})
    splits, _ = captions.load_karpathy(KARPATHY)
    all_ims = [im for s in splits.values() for im in s]
    tok = train_tokenizer([c for im in all_ims for c in im.captions], TokenizerConfig(vocab_size=120))
    tok.save_pretrained(tmp_path / "bert" / "outputs" / "tokenizer")
    rng = np.random.default_rng(0)
    w = RegionStoreWriter(tmp_path / "detector" / "outputs" / "regions", len(all_ims), 3, 8, ["a", "b"])
    for im in all_ims:
        w.add(im.image_id, rng.random((3, 8)), np.tile([0.1, 0.1, 0.5, 0.5, 0.16, 0.9], (3, 1)),
              np.full((3, 3), 1 / 3))
    w.close()
    ups = {"world": StageResult.model_validate_json((tmp_path / "world" / "result.json").read_text()),
           "detector": StageResult(stage="detector", kind="detector", fingerprint="d",
                                   outputs={"regions": "outputs/regions"}),
           "bert": StageResult(stage="bert", kind="bert", fingerprint="b", outputs={"tokenizer": "outputs/tokenizer"})}
    cfg = caption.Config(seed=0, init=None, tokenizer_from="bert", runtime={"device": "cpu", "threads": 1},
                         model={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                                "max_position": 32},
                         max_caption_len=8, train={"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1},
                         decode={"max_len": 6})
    tracker = RecordingTracker()
    ctx = StageContext(name="caption", config=cfg, stage_dir=tmp_path / "caption", upstream=ups,
                       upstream_dirs={n: tmp_path / n for n in ups}, fingerprint="c", tracker=tracker)
    res = caption.run(ctx)
    out = tmp_path / "caption"
    results = json.loads((out / res.outputs["captions"]).read_text())
    assert [r["image_id"] for r in results] == [73, 74]
    assert (res.info["sample_images"], res.info["sample_images_skipped"]) == (1, 1)  # 74 is not on disk
    pngs = list((out / res.outputs["sample_images"]).glob("*.png"))
    assert [p.name for p in pngs] == ["00_73.png"]
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.width > 16 and im.height > im.width * 12 / 16
    assert tracker.artifacts == [(out / "outputs" / "samples.json", "samples"), (out / "outputs" / "samples", "samples")]
