"""Stage 2 `detector`: a tiny end-to-end run on a generated world (outputs, region store, loss going
down, resume), config errors that name their key, and the backbone coming from the cnn stage's file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stages import cnn, detector, world
from stages.base import NullTracker, StageContext, StageResult
from stages.checkpoint import load_weights
from stages.regions import RegionStore
from stages.transfer import Transfer, build_plan

CNN = cnn.ModelConfig(widths=[8, 16, 16, 32])
TINY = {"fpn_channels": 16, "representation_size": 32, "rpn_batch_size_per_image": 32,
        "box_batch_size_per_image": 32}
RUNTIME = {"checkpoint_every": 10, "log_every": 10, "device": "cpu"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny synthetic world (40 train / 12 val scenes) and a cnn stage's model dir (untrained weights:
    only where they come from matters here)."""
    root = tmp_path_factory.mktemp("up")
    wcfg = world.Config(classification={"train": 36, "val": 36}, scenes={"train": 40, "val": 12},
                        corpus={"documents": 2})
    wres = world.run(StageContext(name="world", config=wcfg, stage_dir=root / "world", upstream={},
                                  upstream_dirs={}, fingerprint="w"))
    torch.manual_seed(0)
    body = cnn.build_classifier(CNN, 36)
    with torch.no_grad():  # non-trivial BN statistics, so the frozen-BN copy is checked too
        for m in body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    cnn.save_model(body, CNN, [f"c{i}" for i in range(36)], root / "cnn" / "outputs" / "model")
    cres = StageResult(stage="cnn", kind="cnn", fingerprint="c", outputs={"model": "outputs/model"})
    return {"world": (wres, root / "world"), "cnn": (cres, root / "cnn")}


def make_ctx(upstream, stage_dir, **config) -> StageContext:
    cfg = detector.Config(**({"runtime": RUNTIME} | config))
    names = ["world"] + (["cnn"] if cfg.backbone_from else [])
    return StageContext(name="detector", config=cfg, stage_dir=stage_dir,
                        upstream={n: upstream[n][0] for n in names}, upstream_dirs={n: upstream[n][1] for n in names},
                        fingerprint="t", tracker=NullTracker())


def test_run_writes_model_regions_and_learns(upstream, tmp_path):
    ctx = make_ctx(upstream, tmp_path / "det", model=TINY, regions={"k": 5},
                   train={"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2}, eval_batch_size=16)
    res = detector.run(ctx)

    assert res.outputs == {"model": "outputs/model", "regions": "outputs/regions"}
    out = ctx.stage_dir / "outputs"
    for f in ("model/model.safetensors", "model/config.json", "regions/index.json", "per_class_ap.json"):
        assert (out / f).is_file(), f
    assert 0.0 <= res.metrics["val/map"] <= res.metrics["val/map50"] <= 1.0
    assert res.baselines["val/map50_predict_nothing"] == 0.0
    assert res.info["region_rows_per_s"] > 0 and res.info["train_images_per_s"] > 0

    losses = [m["train/loss"] for _, m in ctx.tracker.metrics if "train/loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses  # windows of 10 steps: 2.48 -> 2.38 -> 2.14 here

    classes = json.loads((out / "model" / "config.json").read_text())["classes"]
    assert set(json.loads((out / "per_class_ap.json").read_text())) <= set(classes)
    store = RegionStore(out / "regions")
    assert len(store) == 52 and store.k == 5 and store.feature_dim == 32 and store.prob_dim == len(classes) + 1
    assert store.classes == classes
    for iid in store.image_ids:
        feats, geom, probs, n = store[iid]
        assert feats.shape == (5, 32) and geom.shape == (5, 6) and probs.shape == (5, len(classes) + 1)
        for a in (feats, geom, probs):
            assert np.isfinite(np.asarray(a, dtype=np.float32)).all()
        assert (np.asarray(feats[n:]) == 0).all() and (np.asarray(geom[n:]) == 0).all()
        g = np.asarray(geom[:n], dtype=np.float32)
        assert (g >= 0).all() and (g[:, :5] <= 1.0 + 1e-3).all()
        assert (g[:, 2] >= g[:, 0]).all() and (g[:, 3] >= g[:, 1]).all()
        np.testing.assert_allclose(np.asarray(probs[:n], dtype=np.float32).sum(1), 1.0, atol=1e-2)
    assert sum(store.num_boxes) > 0

    # the saved model rebuilds on its own, with the trained weights
    model, loaded_classes = detector.load_model(out / "model")
    assert loaded_classes == classes
    saved = load_weights(out / "model" / "model.safetensors")
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       saved["roi_heads.box_predictor.cls_score.weight"])

    # rerunning the same stage dir resumes from the last checkpoint: nothing retrains, same result
    again = detector.run(make_ctx(upstream, tmp_path / "det", model=TINY, regions={"k": 5},
                                  train={"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2},
                                  eval_batch_size=16))
    assert again.info["resumed_from"] == 30
    assert again.metrics == pytest.approx(res.metrics)


def test_backbone_comes_from_the_cnn_model_file(upstream, tmp_path):
    ctx = make_ctx(upstream, tmp_path / "det", model=TINY)
    body, bcfg, pretrained, source = detector.backbone_body(ctx.config, ctx)
    assert pretrained and bcfg == CNN and source.endswith("outputs/model")
    model = detector.build_detector(ctx.config.model, body, num_classes=3, pretrained=pretrained)
    state = load_weights(upstream["cnn"][1] / "outputs" / "model" / "model.safetensors")
    mine = model.state_dict()
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer4.0.conv2.weight", "layer2.0.bn1.running_mean",
              "layer3.0.bn2.running_var", "bn1.weight"):
        assert torch.equal(mine[f"backbone.body.{k}"], state[k]), k
    assert not any(k.startswith("backbone.body.fc") for k in mine)  # the classifier head is dropped

    # a random backbone (backbone_from: null) has the same architecture but not those weights
    rnd = make_ctx(upstream, tmp_path / "rnd", backbone_from=None, model=TINY | {"backbone": CNN.model_dump()})
    body2, bcfg2, pretrained2, _ = detector.backbone_body(rnd.config, rnd)
    assert not pretrained2 and bcfg2 == CNN
    assert body2.conv1.weight.shape == body.conv1.weight.shape
    assert not torch.equal(body2.conv1.weight, state["conv1.weight"])


def test_trainable_layers_freeze_and_stay_frozen(upstream, tmp_path):
    ctx = make_ctx(upstream, tmp_path / "det", model=TINY | {"trainable_layers": 2})
    body, _, pretrained, _ = detector.backbone_body(ctx.config, ctx)
    model = detector.build_detector(ctx.config.model, body, 3, pretrained)
    trains = {n for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("layer3", "layer4")) for n in trains)
    blocks, head = detector.transfer_blocks(model)
    assert len(blocks) == 5 and blocks[0] == blocks[1] == blocks[2] == []
    build_plan(blocks, head, Transfer(), 0.0).apply(0)  # what fit does every step
    assert {n for n, p in model.backbone.body.named_parameters() if p.requires_grad} == trains
    assert all(p.requires_grad for p in head)


@pytest.mark.parametrize("config, key", [
    ({"model": {"trainable_layers": 6}}, "trainable_layers"),
    ({"model": {"trainable_layers": -1}}, "trainable_layers"),
    ({"model": {"anchor_sizes": [8, 16]}}, "model.anchor_sizes"),
    ({"model": {"backbone": {"arch": "narrow_resnet"}}}, "model.backbone"),  # and backbone_from: cnn
    ({"backbone_from": None, "model": {"backbone": {"arch": "vgg16"}}}, "model.backbone.arch"),
    ({"regions": {"k": 200}}, "regions.k"),
    ({"model": {"num_classes": 3}}, "num_classes"),
])
def test_bad_config_is_refused_naming_the_key(config, key):
    with pytest.raises(ValidationError) as e:
        detector.Config(**config)
    assert key in str(e.value)


def test_upstream_refs():
    assert detector.Config().upstream_refs() == {"data": "world", "backbone_from": "cnn"}
    assert detector.Config(backbone_from=None, data="w2").upstream_refs() == {"data": "w2"}
