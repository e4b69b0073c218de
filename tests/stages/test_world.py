"""Stage 0 `world` (synthetic generator) and the dataset loaders in stages/data.py."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stages.config.world import Config
from stages.contract import StageContext, StageError
from stages.data import captions, imagenet, text, visual_genome
from stages.data import vqa as vqa_data
from stages.data.synthetic import PLURALS
from stages.fsio import temps_of
from stages.world import run

SMALL = dict(classification={"train": 60, "val": 20}, scenes={"train": 12, "val": 6}, corpus={"documents": 20},
             captions_per_image=5, questions_per_image=4)


def make_ctx(stage_dir: Path, **cfg) -> StageContext:
    config = Config(**{"seed": 0, **SMALL, **cfg})
    return StageContext(name="world", config=config, stage_dir=stage_dir, upstream={}, upstream_dirs={},
                        fingerprint="test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("w") / "world"
    res = run(make_ctx(d))
    return d, res


def out(world, key) -> Path:
    d, res = world
    return d / res.outputs[key]


FILES = ["vg/objects.json", "vg/images/1.jpg", "coco/captions_train.json", "corpus/train.txt",
         "vqa/v2_mscoco_val_annotations.json", "imagenet/train/n00000001/n00000001_0.JPEG"]


# ---------------------------------------------------------------------------------------------- generator


def test_deterministic(world, tmp_path):
    d0, _ = world
    run(make_ctx(tmp_path / "same"))
    run(make_ctx(tmp_path / "other", seed=1))
    for f in FILES:
        a = (d0 / "outputs" / f).read_bytes()
        assert a == (tmp_path / "same" / "outputs" / f).read_bytes(), f
        assert a != (tmp_path / "other" / "outputs" / f).read_bytes(), f


def test_result_and_counts(world):
    d, res = world
    assert res.kind == "world" and res.fingerprint == "test"
    assert set(res.outputs) == {"imagenet", "vg", "corpus", "coco", "vqa"}
    for v in res.outputs.values():
        assert (d / v).is_dir()
    assert not temps_of(d / "outputs")
    m = res.metrics
    assert m["classification_train"] == 60 and m["classification_val"] == 20
    assert m["scenes_train"] == 12 and m["scenes_val"] == 6
    assert m["captions_train"] == 60 and m["questions_val"] == 24
    assert res.info["classes"] == 36
    json.dumps(res.model_dump())


def test_rerun_replaces_stale_outputs(tmp_path):
    d = tmp_path / "world"
    (d / "outputs.tmp-99999").mkdir(parents=True)
    (d / "outputs").mkdir()
    (d / "outputs" / "junk").write_text("partial")
    run(make_ctx(d, classification={"train": 36, "val": 36}, scenes={"train": 2, "val": 1}, corpus={"documents": 2}))
    assert not (d / "outputs" / "junk").exists() and not temps_of(d / "outputs")
    assert (d / "outputs" / "vg" / "objects.json").is_file()


def test_imagenet_loads(world):
    root = out(world, "imagenet")
    paths, labels, classes = imagenet.load_imagefolder(root / "train")
    assert len(paths) == 60 and len(classes) == 36 and classes[0] == "n00000001"
    vpaths, vlabels, vclasses = imagenet.load_imagefolder(root / "val")
    assert len(vpaths) == 20 and vclasses == classes
    words = (root / "synset_words.txt").read_text().splitlines()
    assert len(words) == 36 and re.fullmatch(r"n\d{8} \w+ \w+", words[0])
    ds = imagenet.ImageClassDataset(paths, labels, image_size=32, train=True)
    assert ds.images.shape == (60, 3, 32, 32) and ds.images.dtype == torch.uint8
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[0]
    assert -3 < float(x.min()) and float(x.max()) < 3
    nc = imagenet.ImageClassDataset(paths[:4], labels[:4], image_size=16, train=False, cache=False)
    assert nc[1][0].shape == (3, 16, 16)
    ev = imagenet.ImageClassDataset(paths[:4], labels[:4], image_size=32, train=False)
    assert torch.equal(ev[2][0], ev[2][0])


def test_vg_loads_and_boxes_inside(world):
    vg = out(world, "vg")
    images, stats = visual_genome.load_vg(vg)
    assert stats["images"] == 18 == len(images)
    assert stats["dropped_degenerate"] == 0 and stats["clipped"] == 0
    assert stats["objects"] == sum(len(im.names) for im in images) > 0
    for im in images:
        assert im.path.is_file()
        assert im.boxes.dtype == np.float32 and im.boxes.shape == (len(im.names), 4)
        assert 1 <= len(im.names) <= 4
        b = im.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= im.width).all() and (b[:, 3] <= im.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert all(len(a) == 2 for a in im.attributes)
    train, val = visual_genome.read_id_list(vg / "train_ids.txt"), visual_genome.read_id_list(vg / "val_ids.txt")
    assert len(train) == 12 and len(val) == 6 and not set(train) & set(val)
    vocab = visual_genome.build_vocab([im.names for im in images], 100)
    assert set(vocab) <= {"circle", "square", "triangle", "diamond", "cross", "star"}


def test_captions_and_vqa_load_and_are_true(world):
    images, _ = visual_genome.load_vg(out(world, "vg"))
    scene = {im.image_id: list(zip(im.names, [a[0] for a in im.attributes])) for im in images}
    coco, vqa_dir = out(world, "coco"), out(world, "vqa")
    ids = set()
    for split, n in (("train", 12), ("val", 6)):
        caps, info = captions.load_coco_captions(captions.coco_captions_file(coco, split))
        assert len(caps) == n and all(len(c) == 5 and all(s.strip() for s in c) for c in caps.values())
        for iid, inf in info.items():
            assert inf["file_name"] == f"{iid}.jpg" and iid in scene
            for c in caps[iid]:  # every (colour, shape) mentioned is in the scene
                for colour, shape in re.findall(r"(red|green|blue|yellow|purple|orange) (\w+)", c):
                    assert (shape, colour) in scene[iid], (c, scene[iid])
        recs = vqa_data.load_vqa(*vqa_data.vqa_files(vqa_dir, split))
        assert len(recs) == 4 * n
        assert {r.answer_type for r in recs} <= {"yes/no", "number", "other"}
        for r in recs:
            assert len(r.answers) == 10 and r.multiple_choice_answer == Counter(r.answers).most_common(1)[0][0]
            ids.add(r.image_id)
            objs = scene[r.image_id]
            truth = None
            if m := re.fullmatch(r"how many (\w+) are there\?", r.question):
                shape = {v: k for k, v in PLURALS.items()}[m.group(1)]
                truth = str(sum(s == shape for s, _ in objs))
            elif m := re.fullmatch(r"what color is the (\w+)\?", r.question):
                (truth,) = [c for s, c in objs if s == m.group(1)]
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", r.question):
                truth = "yes" if (m.group(2), m.group(1)) in objs else "no"
            if truth is not None:  # annotators are noisy, but mostly right
                assert Counter(r.answers)[truth] >= 3, (r, objs)
    assert ids == set(scene)
    all_recs = vqa_data.load_vqa(*vqa_data.vqa_files(vqa_dir, "train"))
    assert {r.question_type for r in all_recs} >= {"is there a", "how many"}


def test_corpus_loads(world):
    corpus = out(world, "corpus")
    assert len(text.read_corpus(corpus / "train.txt")) == 20
    assert len(text.read_corpus(corpus / "val.txt")) == 2
    docs = text.read_corpus(corpus)
    assert len(docs) == 22 and all("\n" not in d and d.endswith(" .") for d in docs)


def test_config_strict_and_real_paths(tmp_path):
    with pytest.raises(ValidationError):
        Config(bogus=1)
    with pytest.raises(ValidationError):
        Config(scenes={"train": 1, "extra": 2})
    with pytest.raises(ValidationError):
        Config(scenes={"min_objects": 3, "max_objects": 2})
    (tmp_path / "corpus").mkdir()
    ctx = make_ctx(tmp_path / "w", source="real", paths={"corpus": str(tmp_path / "corpus"),
                                                         "vg": str(tmp_path / "missing_vg")})
    with pytest.raises(StageError, match=r"paths\.vg.*missing_vg"):
        run(ctx)
    ctx = make_ctx(tmp_path / "w", source="real", paths={"corpus": str(tmp_path / "corpus")})
    res = run(ctx)
    assert res.outputs == {"corpus": str((tmp_path / "corpus").resolve())}


# ---------------------------------------------------------------------------------------------- loader errors


def _vg(tmp_path, image_data, objects, attributes=None) -> Path:
    d = tmp_path / "vg"
    d.mkdir()
    (d / "image_data.json").write_text(json.dumps(image_data))
    (d / "objects.json").write_text(json.dumps(objects))
    if attributes is not None:
        (d / "attributes.json").write_text(json.dumps(attributes))
    return d


def test_vg_missing_image_id(tmp_path):
    d = _vg(tmp_path, [{"image_id": 1, "width": 10, "height": 10}, {"width": 10, "height": 10}], [])
    with pytest.raises(StageError, match=r"image_data\.json.*record 1.*'image_id'"):
        visual_genome.load_vg(d)


def test_vg_clip_drop_v10_and_no_attributes(tmp_path):
    d = _vg(tmp_path, [{"id": 7, "width": 20, "height": 10}],  # v1.0 key
            [{"id": 7, "objects": [
                {"id": 1, "x": 15, "y": -2, "w": 10, "h": 5, "name": " Red  Ball "},  # partly outside
                {"object_id": 2, "x": 3, "y": 3, "w": 0, "h": 4, "names": ["stick"]},  # zero area
                {"object_id": 3, "x": 25, "y": 1, "w": 4, "h": 4, "names": ["ghost"]},  # outside: zero area
                {"object_id": 4, "x": 1, "y": 1, "w": 4, "h": 4, "names": ["Cup"]},
            ]}])
    images, stats = visual_genome.load_vg(d)
    im = images[0]
    assert im.image_id == 7 and im.path == d / "images" / "7.jpg"
    assert im.names == ["red ball", "cup"] and im.attributes == [[], []]
    np.testing.assert_array_equal(im.boxes, np.array([[15, 0, 20, 3], [1, 1, 5, 5]], dtype=np.float32))
    assert stats["clipped"] == 1 and stats["dropped_degenerate"] == 2 and stats["objects"] == 2


def test_vg_attributes_and_merged(tmp_path):
    d = _vg(tmp_path, [{"image_id": 1, "width": 20, "height": 20}],
            [{"image_id": 1, "objects": [{"object_id": 5, "x": 0, "y": 0, "w": 5, "h": 5, "names": ["dog"],
                                          "merged_object_ids": [6]},
                                         {"object_id": 6, "x": 0, "y": 0, "w": 5, "h": 5, "names": ["dog"]}]}],
            [{"image_id": 1, "attributes": [{"object_id": 6, "attributes": ["Brown "]}]}])
    images, stats = visual_genome.load_vg(d, image_dir=tmp_path / "imgs")
    assert images[0].names == ["dog"] and images[0].attributes == [["brown"]]
    assert images[0].path == tmp_path / "imgs" / "1.jpg" and stats["merged"] == 1


def test_vg_object_missing_key(tmp_path):
    d = _vg(tmp_path, [{"image_id": 1, "width": 20, "height": 20}],
            [{"image_id": 1, "objects": [{"object_id": 5, "x": 0, "y": 0, "w": 5, "names": ["dog"]}]}])
    with pytest.raises(StageError, match=r"objects\.json.*object_id 5.*'h'"):
        visual_genome.load_vg(d)


def test_corrupt_image(tmp_path):
    root = tmp_path / "train" / "n00000001"
    root.mkdir(parents=True)
    bad = root / "n00000001_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths, labels, _ = imagenet.load_imagefolder(tmp_path / "train")
    with pytest.raises(StageError, match=re.escape(str(bad))):
        imagenet.ImageClassDataset(paths, labels, image_size=32, train=False)


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(StageError, match="nope"):
        imagenet.load_imagefolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="empty"):
        imagenet.load_imagefolder(tmp_path / "empty")


def test_empty_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("\n   \n\n")
    with pytest.raises(StageError, match=r"empty corpus"):
        text.read_corpus(tmp_path / "c")
    with pytest.raises(StageError, match="missing"):
        text.read_corpus(tmp_path / "missing")
    (tmp_path / "c" / "b.txt").write_text("one\ntwo\n\n\nthree\n")
    assert text.read_corpus(tmp_path / "c") == ["one two", "three"]


def _coco(tmp_path, anns, images=None) -> Path:
    p = tmp_path / "captions.json"
    images = images if images is not None else [{"id": 1, "file_name": "1.jpg", "width": 4, "height": 4}]
    p.write_text(json.dumps({"images": images, "annotations": anns}))
    return p


def test_coco_errors(tmp_path):
    p = _coco(tmp_path, [{"id": 11, "image_id": 1, "caption": "a dog"}, {"id": 12, "image_id": 1, "caption": "  "}])
    with pytest.raises(StageError, match=r"captions\.json.*annotation id 12.*empty caption"):
        captions.load_coco_captions(p)
    p = _coco(tmp_path, [{"id": 11, "image_id": 1}])
    with pytest.raises(StageError, match=r"captions\.json.*annotations\[0\].*'caption'"):
        captions.load_coco_captions(p)
    p = _coco(tmp_path, [], images=[{"id": 1, "width": 4, "height": 4}])
    with pytest.raises(StageError, match=r"captions\.json.*images\[0\].*'file_name'"):
        captions.load_coco_captions(p)


def test_vqa_missing_answers(tmp_path):
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"image_id": 1, "question": "is it?", "question_id": 10}]}))
    ann = {"question_id": 10, "image_id": 1, "question_type": "is it", "answer_type": "yes/no",
           "multiple_choice_answer": "yes"}
    a.write_text(json.dumps({"annotations": [ann]}))
    with pytest.raises(StageError, match=r"a\.json.*question_id 10.*'answers'"):
        vqa_data.load_vqa(q, a)
    a.write_text(json.dumps({"annotations": [{**ann, "answers": [{"answer": "yes", "answer_confidence": "yes",
                                                                    "answer_id": 1}]}]}))
    (r,) = vqa_data.load_vqa(q, a)
    assert r.question_id == 10 and r.answers == ["yes"] and r.answer_type == "yes/no"


def test_vocab_and_id_list(tmp_path):
    assert visual_genome.build_vocab([["b", "a"], ["b", "c", "a"], ["d"]], 3) == ["a", "b", "c"]
    p = tmp_path / "ids.txt"
    p.write_text("1\n\n2\nx\n")
    with pytest.raises(StageError, match=r"ids\.txt.*line 4"):
        visual_genome.read_id_list(p)
