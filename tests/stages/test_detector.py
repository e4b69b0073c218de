"""Stage 2 `detector`: a tiny end-to-end run on a generated world (outputs, region store, loss going
down, resume), config errors that name their key, the backbone coming from the cnn stage's file,
the attribute head, min/max-K region selection, the vg_splits train/val split, VGG16 / AlexNet
single-feature-map detectors, and padded regions being invisible to the VLP transformer."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torchvision.ops import boxes as box_ops

from stages import cnn, detector, vl, world
from stages.contract import NullTracker, StageContext, StageResult
from stages.data.regions import RegionStore
from stages.models import detection, resnet
from stages.train.checkpoint import load_weights
from stages.train.transfer import Transfer, build_plan

CNN = cnn.ModelConfig(widths=[8, 16, 16, 32])
TINY = {"fpn_channels": 16, "representation_size": 32, "rpn_batch_size_per_image": 32,
        "box_batch_size_per_image": 32}
RUNTIME = {"checkpoint_every": 10, "log_every": 10, "device": "cpu", "threads": 1}


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
    resnet.save_classifier(body, CNN, [f"c{i}" for i in range(36)], root / "cnn" / "outputs" / "model")
    cres = StageResult(stage="cnn", kind="cnn", fingerprint="c", outputs={"model": "outputs/model"})
    return {"world": (wres, root / "world"), "cnn": (cres, root / "cnn")}


def data_image(upstream) -> torch.Tensor:
    """The world's first scene image as float (3, H, W) in [0, 1]."""
    from PIL import Image
    path = sorted((upstream["world"][1] / "outputs" / "vg" / "images").glob("*.jpg"))[0]
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def make_ctx(upstream, stage_dir, **config) -> StageContext:
    cfg = detector.Config(**({"runtime": RUNTIME} | config))
    names = ["world"] + (["cnn"] if cfg.backbone_from else [])
    return StageContext(name="detector", config=cfg, stage_dir=stage_dir,
                        upstream={n: upstream[n][0] for n in names}, upstream_dirs={n: upstream[n][1] for n in names},
                        fingerprint="t", tracker=NullTracker())


RUN = {"model": TINY | {"attributes": {"enabled": True, "num_attributes_k": 6}},
       "regions": {"k": 5, "min_k": 2, "score_thresh": 0.3},
       "train": {"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2}, "eval_batch_size": 16}


def test_run_writes_model_regions_and_learns(upstream, tmp_path):
    ctx = make_ctx(upstream, tmp_path / "det", **RUN)
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
    assert losses[-1] < 0.95 * losses[0], losses
    att_losses = [m["train/loss_attributes"] for _, m in ctx.tracker.metrics if "train/loss_attributes" in m]
    # logged, finite, on the class loss's scale; one micro-batch's value per log line is too noisy to show the
    # head learning in 30 steps (per step: 0.38 +- 0.03 throughout, on main too): that is
    # test_attribute_head_trains_the_box_head_features's job
    assert len(att_losses) == 3 and all(0 < a < 5 for a in att_losses), att_losses
    # train/val come from vg_splits: the world's id lists (40 / 12 scenes)
    assert res.info["split"].startswith("id lists") and (res.info["train_images"], res.info["val_images"]) == (40, 12)
    assert res.info["attributes"] == 6  # top-6 of 6 colours + 2 sizes

    meta = json.loads((out / "model" / "config.json").read_text())
    classes = meta["classes"]
    assert len(meta["attributes"]) == 6 and set(meta["attributes"]) <= set(world.COLOUR_NAMES) | set(world.SIZES)
    assert set(json.loads((out / "per_class_ap.json").read_text())) <= set(classes)
    store = RegionStore(out / "regions")
    assert len(store) == 52 and store.k == 5 and store.feature_dim == 32 and store.prob_dim == len(classes) + 1
    assert store.classes == classes
    counts = []
    for iid in store.image_ids:
        feats, geom, probs, n = store[iid]
        counts.append(n)
        # min/max-K: 2 <= n <= 5; beyond the first min_k, every kept region scores >= score_thresh
        assert 2 <= n <= 5
        assert (np.asarray(geom[2:n, 5], dtype=np.float32) >= 0.3 - 1e-3).all()
        assert feats.shape == (5, 32) and geom.shape == (5, 6) and probs.shape == (5, len(classes) + 1)
        # one region per object: no two of an image's regions overlap by more than regions.nms (0.5)
        boxes = torch.as_tensor(np.asarray(geom[:n, :4], dtype=np.float32))
        assert (torch.triu(box_ops.box_iou(boxes, boxes), diagonal=1) <= 0.5 + 1e-3).all()
        for a in (feats, geom, probs):
            assert np.isfinite(np.asarray(a, dtype=np.float32)).all()
        assert (np.asarray(feats[n:]) == 0).all() and (np.asarray(geom[n:]) == 0).all()
        g = np.asarray(geom[:n], dtype=np.float32)
        assert (g >= 0).all() and (g[:, :5] <= 1.0 + 1e-3).all()
        assert (g[:, 2] >= g[:, 0]).all() and (g[:, 3] >= g[:, 1]).all()
        np.testing.assert_allclose(np.asarray(probs[:n], dtype=np.float32).sum(1), 1.0, atol=1e-2)
    assert sum(store.num_boxes) > 0 and res.info["regions_per_image_mean"] == pytest.approx(np.mean(counts))

    # the saved model rebuilds on its own, with the trained weights
    model, loaded_classes = detection.load_model(out / "model")
    assert loaded_classes == classes
    saved = load_weights(out / "model" / "model.safetensors")
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.attribute_predictor.weight"):
        assert torch.equal(model.state_dict()[key], saved[key]), key
    det = detector.detect(model, [torch.rand(3, 64, 64)], k=5)[0]
    assert det["attribute_probs"].shape == (len(det["features"]), 6)
    # class-agnostic NMS picks the regions only: the detections mAP is measured on are the same
    img = data_image(upstream)
    plain, dedup = (detector.detect(model, [img], k=50, nms=nms)[0] for nms in (None, 0.5))
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(plain[key], dedup[key]), key
    assert torch.equal(plain["region_index"], torch.arange(len(plain["region_index"])))
    assert len(dedup["region_index"]) < len(plain["region_index"])  # the per-label copies of objects are gone

    # rerunning the same stage dir resumes from the last checkpoint: nothing retrains, same result
    again = detector.run(make_ctx(upstream, tmp_path / "det", **RUN))
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
    ({"backbone_from": None, "model": {"anchor_sizes": [8, 16]}}, "model.anchor_sizes"),
    ({"model": {"anchor_sizes": []}}, "model.anchor_sizes"),
    ({"model": {"backbone": {"arch": "narrow_resnet"}}}, "model.backbone"),  # and backbone_from: cnn
    ({"regions": {"k": 200}}, "regions.k"),
    ({"regions": {"k": 10, "min_k": 11}}, "regions.min_k"),
    ({"regions": {"score_thresh": 1.0}}, "score_thresh"),
    ({"model": {"attributes": {"num_attributes_k": -1}}}, "num_attributes_k"),
    ({"model": {"attributes": {"loss_weight": -0.5}}}, "loss_weight"),
    ({"model": {"attributes": {"enable": True}}}, "enable"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"model": {"num_classes": 3}}, "num_classes"),
])
def test_bad_config_is_refused_naming_the_key(config, key):
    with pytest.raises(ValidationError) as e:
        detector.Config(**config)
    assert key in str(e.value)


def test_upstream_refs():
    assert detector.Config().upstream_refs() == {"data": "world", "backbone_from": "cnn"}
    assert detector.Config(backbone_from=None, data="w2").upstream_refs() == {"data": "w2"}


def test_anchor_count_of_an_fpn_is_checked_when_the_backbone_is_known():
    # with backbone_from the arch is only known when the stage starts: build_detector refuses it then
    cfg = detector.Config(model={"anchor_sizes": [8, 16]})
    with pytest.raises(detector.StageError, match="model.anchor_sizes has 2 entries but the FPN"):
        detector.build_detector(cfg.model, cnn.build_classifier(CNN, 2), 3, False, "narrow_resnet")
    # a single-map VGG16 takes any number of sizes, all on its one feature map
    assert detector.Config(backbone_from=None, model={"anchor_sizes": [8, 16], "backbone": {"arch": "vgg16"}})


@pytest.mark.parametrize("scores, k, min_k, thresh, n", [
    ([0.9, 0.8, 0.3, 0.1], 3, 1, 0.2, 3),     # three above 0.2, capped at k=3
    ([0.9, 0.8, 0.3, 0.1], 10, 1, 0.5, 2),    # two above 0.5
    ([0.15, 0.1, 0.05], 10, 2, 0.2, 2),       # none above: the best min_k anyway
    ([0.15], 10, 2, 0.2, 1),                   # min_k, as far as there are detections
    ([], 10, 2, 0.2, 0),
    ([0.9, 0.2, 0.2], 10, 0, 0.2, 3),         # >= threshold is kept
    ([0.9, 0.8, 0.7], 2, 2, 0.0, 2),          # fixed K (min_k = k)
])
def test_num_regions_min_max_k_and_threshold(scores, k, min_k, thresh, n):
    assert detection.num_regions(torch.tensor(scores), k, min_k, thresh) == n


def _toy_targets(num_attributes: int, with_attributes: bool = True):
    boxes = torch.tensor([[4.0, 4.0, 28.0, 28.0], [30.0, 34.0, 60.0, 60.0]])
    att = torch.zeros(2, num_attributes)
    if with_attributes:
        att[0, 0] = att[0, 2] = att[1, 1] = 1.0
    return [{"boxes": boxes, "labels": torch.tensor([1, 2]), "attributes": att}] * 2


def test_attribute_head_trains_the_box_head_features():
    torch.manual_seed(0)
    cfg = detector.ModelConfig(**TINY, trainable_layers=0, attributes={"enabled": True, "loss_weight": 1.0})
    model = detector.build_detector(cfg, cnn.build_classifier(CNN, 2), 3, False, num_attributes=4).train()
    assert isinstance(model.roi_heads, detection.AttributeRoIHeads)
    xs = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model(xs, _toy_targets(4))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_attributes"}
    # prior-initialised bias: the first loss is ~ attributes per box x log A, not ~A x log 2
    assert 1.0 < losses["loss_attributes"].item() < 4.0
    losses["loss_attributes"].backward()  # the attribute loss alone reaches the region-feature layers
    assert model.roi_heads.box_head.fc7.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None
    # boxes without annotated attributes give no attribute loss (a missing attribute is not a negative)
    model.zero_grad()
    assert model(xs, _toy_targets(4, with_attributes=False))["loss_attributes"].item() == 0.0
    # a few steps fit the attributes of the two boxes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(xs, _toy_targets(4))["loss_attributes"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
    # targets without "attributes" are refused by name
    with pytest.raises(detector.StageError, match="attributes"):
        model(xs, [{k: v for k, v in t.items() if k != "attributes"} for t in _toy_targets(4)])


def test_attribute_config_without_attributes_is_refused():
    cfg = detector.ModelConfig(**TINY, attributes={"enabled": True})
    with pytest.raises(detector.StageError, match="model.attributes.enabled"):
        detector.build_detector(cfg, cnn.build_classifier(CNN, 2), 3, False, num_attributes=0)


def _narrow_features(arch: str) -> torch.nn.Module:
    """A VGG16- or AlexNet-shaped `features` at 1/16 (VGG) or 1/8 (AlexNet) width: the detector only
    reads `.features`, so the (huge) classifier of the real models is not built here."""
    from torchvision.models.vgg import make_layers
    nn = torch.nn
    if arch == "vgg16":
        feats = make_layers([4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M"])
    else:  # torchvision alexnet.features with 8x fewer channels
        feats = nn.Sequential(nn.Conv2d(3, 8, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                              nn.Conv2d(8, 24, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                              nn.Conv2d(24, 48, 3, padding=1), nn.ReLU(inplace=True),
                              nn.Conv2d(48, 32, 3, padding=1), nn.ReLU(inplace=True),
                              nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    body = nn.Module()
    body.features = feats
    return body


@pytest.mark.parametrize("arch, stage_convs", [("vgg16", [2, 2, 3, 3, 3]), ("alexnet", [1, 1, 1, 1, 1])])
def test_vgg16_and_alexnet_single_map_detectors_train_and_detect(arch, stage_convs):
    torch.manual_seed(0)
    cfg = detector.ModelConfig(**TINY, trainable_layers=2, anchor_sizes=[16, 32],
                               attributes={"enabled": True})
    model = detector.build_detector(cfg, _narrow_features(arch), 3, False, arch, num_attributes=4)
    bb = model.backbone
    assert isinstance(bb, detection.SingleMapBackbone) and bb.out_channels == 32
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in st) for st in bb.body] == stage_convs
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in list(bb.body[-1])[-1:])  # last pool dropped
    assert bb(torch.zeros(1, 3, 64, 64))["0"].shape[-1] == (4 if arch == "vgg16" else 3)
    # trainable_layers=2: only the last two stages train; transfer blocks hold just those
    assert [all(p.requires_grad for p in st.parameters()) for st in bb.body] == [False, False, False, True, True]
    assert not any(p.requires_grad for st in bb.body[:3] for p in st.parameters())
    blocks, head = detector.transfer_blocks(model)
    assert len(blocks) == 5 and blocks[:3] == [[], [], []] and all(blocks[3:])
    assert {id(p) for p in head} >= {id(p) for p in model.roi_heads.attribute_predictor.parameters()}

    frozen = bb.body[0][0].weight.detach().clone()
    top = bb.body[4][0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _toy_targets(4))
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_attributes" in losses
    sum(losses.values()).backward()
    opt.step()
    assert torch.equal(bb.body[0][0].weight, frozen) and not torch.equal(bb.body[4][0].weight, top)

    dets = detector.detect(model.eval(), [torch.rand(3, 64, 64), torch.rand(3, 48, 64)], k=4, min_k=1,
                           score_thresh=0.0)
    for d in dets:
        m = len(d["features"])
        assert 1 <= m <= 4 and d["features"].shape == (m, 32) and d["probs"].shape == (m, 4)
        assert d["attribute_probs"].shape == (m, 4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_full_size_torchvision_vgg16_and_alexnet_keep_the_cnn_weights_and_reload(arch, tmp_path):
    bcfg = cnn.ModelConfig(arch=arch)
    classifier = cnn.build_classifier(bcfg, 3)
    first_conv = classifier.features[0].weight.detach().clone()
    cfg = detector.ModelConfig(**TINY)
    model = detector.build_detector(cfg, classifier, 2, True, arch)
    assert model.backbone.out_channels == (512 if arch == "vgg16" else 256)
    assert torch.equal(model.backbone.body[0][0].weight, first_conv)
    detector.save_model(model, cfg, bcfg, True, ["x", "y"], tmp_path / "det")
    loaded, classes = detection.load_model(tmp_path / "det")
    assert classes == ["x", "y"] and len(detector.detect(loaded, [torch.rand(3, 64, 64)], k=3)) == 1


def test_split_is_seeded_when_the_vg_folder_has_no_id_lists(upstream, tmp_path):
    wres, wdir = upstream["world"]
    src = wdir / wres.outputs["vg"]
    vg = tmp_path / "world" / wres.outputs["vg"]
    vg.mkdir(parents=True)
    for f in ("image_data.json", "objects.json", "attributes.json"):
        shutil.copy(src / f, vg / f)
    (vg / "images").symlink_to(src / "images")
    ups = dict(upstream, world=(wres, tmp_path / "world"))
    ctx = make_ctx(ups, tmp_path / "det", val_fraction=0.25, seed=3, model=TINY, regions={"k": 2},
                   train={"steps": 1, "batch_size": 4, "warmup_steps": 0})
    res = detector.run(ctx)
    assert res.info["split"].startswith("seeded split (seed 3, val_fraction 0.25")
    assert (res.info["train_images"], res.info["val_images"]) == (39, 13)
    from stages.data.visual_genome import load_vg, vg_splits
    images, _ = load_vg(vg)
    assert vg_splits(vg, images, 3, 0.25)[0]["val"] != vg_splits(vg, images, 4, 0.25)[0]["val"]


def test_padded_regions_do_not_change_the_vlp_output():
    """The region store zero-pads rows past n_boxes; the VLP encoder (and so caption / vqa, which read
    [CLS] and text positions of it) must not see them, whatever they hold."""
    from transformers import BertForMaskedLM

    from stages.config.bert import BertSizes
    from stages.models.bert import build_bert_config
    torch.manual_seed(0)
    model = vl.VLP(BertForMaskedLM(build_bert_config(BertSizes(), 50)), feature_dim=8, prob_dim=4,
                   special={"cls": 2, "sep": 3, "pad": 0, "mask": 4}).eval()
    k = 4
    regions = {"feats": torch.randn(2, k, 8), "geom": torch.rand(2, k, 6), "probs": torch.rand(2, k, 4),
               "n_boxes": torch.tensor([2, 4])}
    text = torch.tensor([[7, 8, 9, 3], [9, 7, 3, 0]])
    for s2s in (torch.tensor([False, False]), torch.tensor([True, True])):
        base = model(text, regions, s2s)
        padded = {key: v.clone() for key, v in regions.items()}
        for key in ("feats", "geom", "probs"):
            padded[key][0, 2:] = torch.randn_like(padded[key][0, 2:]) * 10  # image 0: slots 2, 3 are padding
        out = model(text, padded, s2s)
        seen = [0, 1, 2, k + 1] + list(range(k + 2, k + 2 + text.shape[1]))  # [CLS], 2 regions, [SEP], text
        torch.testing.assert_close(out[0, seen], base[0, seen])
        torch.testing.assert_close(out[1], base[1])
        # the same change to a real region (image 1 has 4) does change it: the check can fail
        real = {key: v.clone() for key, v in regions.items()}
        real["feats"][1, 3] = torch.randn(8) * 10
        assert not torch.allclose(model(text, real, s2s)[1, 0], base[1, 0])


def test_colour_probe_reads_colour_from_region_features(upstream, tmp_path):
    """tools.probe: regions whose features encode the matched box's colour (one-hot + noise) give a
    near-perfect probe; the same boxes with colour-free features stay near chance."""
    from stages.data.regions import RegionStoreWriter
    from stages.data.visual_genome import load_vg
    from tools.probe import attribute_probe

    wres, wdir = upstream["world"]
    vg = wdir / wres.outputs["vg"]
    images, _ = load_vg(vg)
    colours = list(world.COLOUR_NAMES)
    rng = np.random.default_rng(0)
    for name, informative in (("coloured", True), ("blind", False)):
        with RegionStoreWriter(tmp_path / name, len(images), 4, 8, ["x"]) as w:
            for im in images:
                n = min(len(im.names), 4)
                feats = rng.normal(0, 0.3, (n, 8)).astype(np.float32)
                if informative:
                    for j in range(n):
                        feats[j, colours.index(next(a for a in im.attributes[j] if a in colours))] += 2.0
                b = im.boxes[:n] / np.array([im.width, im.height] * 2, dtype=np.float32)
                geom = np.concatenate([b, np.ones((n, 2), np.float32)], 1)
                w.add(im.image_id, feats, geom, np.full((n, 2), 0.5, np.float32))
            w.close()
    good = attribute_probe(tmp_path / "coloured", vg, colours)
    blind = attribute_probe(tmp_path / "blind", vg, colours)
    assert good["boxes_matched"] == blind["boxes_matched"] > 0 and good["val_examples"] > 10
    assert good["split"].startswith("id lists")
    assert good["val_accuracy"] > 0.9 > good["val_majority_baseline"]
    assert blind["val_accuracy"] < 0.6
