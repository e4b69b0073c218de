"""Stage 2 `detector`: Visual Genome detection fine-tune of the cnn backbone + region features.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads a Visual Genome folder (``image_data.json``, ``objects.json``, ``train_ids.txt``,
``val_ids.txt``, ``images/<image_id>.jpg``) from the ``data`` stage and the classifier in
``outputs/model/`` of the ``backbone_from`` stage. Trains a torchvision Faster R-CNN (ResNet body +
FPN) on the object names, reports COCO box mAP on val against a detector that predicts nothing,
and writes
    outputs/model/     model.safetensors + config.json (everything :func:`load_model` needs)
    outputs/regions/   a RegionStore (stages.regions): the top-K detections of every scene image
                       (train and val) with pooled box features, class probabilities and geometry
    outputs/per_class_ap.json   AP@0.5 per class name on val
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from stages.base import StageConfig, StageContext, StageError, StageResult, Strict
from stages.checkpoint import load_into, load_weights, save_weights
from stages.cnn import ModelConfig as BackboneConfig
from stages.cnn import build_classifier, init_weights
from stages.data import VGImage, build_vocab, image_size, load_vg, open_rgb, read_id_list
from stages.metrics import detection_map
from stages.regions import RegionStoreWriter
from stages.train import TrainConfig, autocast, fit, to_device

# torchvision's _resnet_fpn_extractor semantics: trainable_layers=n unfreezes the last n of these
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
RESNET_ARCHS = ("narrow_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")


class ModelConfig(Strict):
    num_classes_k: int = Field(0, ge=0, description="0 = every object name is a class; else the K most frequent names")
    trainable_layers: int = Field(5, ge=0, le=5, description="backbone stages that train, counted from layer4 "
                                                                  "(torchvision semantics: 0 = body frozen, 5 = all)")
    backbone: BackboneConfig | None = Field(None, description="backbone architecture when backbone_from is null "
                                                              "(null = the cnn stage's default narrow_resnet)")
    returned_layers: list[int] = Field(default_factory=lambda: [2, 3, 4],
                                       description="ResNet stages feeding the FPN (+ a max-pooled extra level)")
    fpn_channels: int = Field(64, ge=1)
    anchor_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32, 64],
                                    description="anchor side in pixels, one per FPN level (returned_layers + pool)")
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: int = Field(64, ge=1, description="GeneralizedRCNNTransform resize: shorter side")
    max_size: int = Field(64, ge=1, description="GeneralizedRCNNTransform resize: longer side cap")
    representation_size: int = Field(128, ge=1, description="box-head (TwoMLPHead) width = region feature dim")
    rpn_pre_nms_top_n: int = Field(300, ge=1, description="RPN proposals per level before NMS (train and test)")
    rpn_post_nms_top_n: int = Field(100, ge=1, description="RPN proposals per image after NMS (train and test)")
    rpn_batch_size_per_image: int = Field(64, ge=1)
    box_batch_size_per_image: int = Field(64, ge=1)
    box_detections_per_img: int = Field(100, ge=1, description="detections kept per image (COCO maxDets = 100)")

    @model_validator(mode="after")
    def _check(self):
        if not self.returned_layers or sorted(set(self.returned_layers)) != self.returned_layers \
                or min(self.returned_layers) < 1 or max(self.returned_layers) > 4:
            raise ValueError(f"model.returned_layers={self.returned_layers} must be increasing ResNet stages in 1..4")
        if len(self.anchor_sizes) != len(self.returned_layers) + 1:
            raise ValueError(f"model.anchor_sizes has {len(self.anchor_sizes)} entries but the FPN has "
                             f"{len(self.returned_layers) + 1} levels (model.returned_layers + pool): one size per level")
        if self.max_size < self.min_size:
            raise ValueError(f"model.max_size={self.max_size} is smaller than model.min_size={self.min_size}")
        return self


class RegionsConfig(Strict):
    k: int = Field(10, ge=1, description="boxes kept per image (zero-padded when fewer are detected)")
    score_thresh: float = Field(0.0, ge=0.0, lt=1.0, description="detections at or below this score are dropped")


class Config(StageConfig):
    kind: Literal["detector"] = "detector"
    data: str = Field("world", description="stage providing the `vg` output")
    backbone_from: str | None = Field("cnn", description="stage whose outputs/model initialises the backbone; "
                                                         "null = random init of model.backbone")
    model: ModelConfig = Field(default_factory=ModelConfig)
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    # 250 x 8 images: ~70 s of training on one CPU core at 64x64 (the whole stage ~80 s)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=250, batch_size=8, lr=1e-3, warmup_steps=20))
    eval_batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.model.backbone is not None and self.model.backbone.arch not in RESNET_ARCHS:
            raise ValueError(f"model.backbone.arch={self.model.backbone.arch!r}: the detector's FPN needs a ResNet-family "
                             f"backbone ({', '.join(RESNET_ARCHS)})")
        if self.backbone_from is not None and self.model.backbone is not None:
            raise ValueError(f"model.backbone is set but backbone_from={self.backbone_from!r} decides the backbone "
                             "(its outputs/model/config.json): set one of them")
        if self.regions.k > self.model.box_detections_per_img:
            raise ValueError(f"regions.k={self.regions.k} exceeds model.box_detections_per_img="
                             f"{self.model.box_detections_per_img}")
        return self

    def upstream_refs(self) -> dict[str, str]:
        refs = {"data": self.data}
        if self.backbone_from is not None:
            refs["backbone_from"] = self.backbone_from
        return refs


# ----------------------------------------------------------------------------------------------
# model


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics (torchvision's choice
    for a pretrained detection backbone: batches of a few images would spoil the statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


def _stage_channels(body: nn.Module, layer: int) -> int:
    last = getattr(body, f"layer{layer}")[-1]  # BasicBlock (bn2) or Bottleneck (bn3)
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).weight.shape[0]


def build_detector(cfg: ModelConfig, body: nn.Module, num_classes: int, pretrained: bool) -> FasterRCNN:
    """ResNet-family classifier ``body`` (attributes conv1, bn1, layer1..4) + ``num_classes`` foreground
    classes -> an untrained-head Faster R-CNN (torchvision), body frozen per ``cfg.trainable_layers``.

    A ``pretrained`` body gets FrozenBatchNorm2d, a random one keeps BatchNorm2d (as torchvision's
    ``fasterrcnn_resnet50_fpn``). The classifier's avgpool/fc are dropped by the FPN's layer getter.

    >>> body = build_classifier(BackboneConfig(), 10)
    >>> m = build_detector(ModelConfig(), body, num_classes=3, pretrained=False).eval()
    >>> sorted(m([torch.rand(3, 64, 64)])[0])
    ['boxes', 'labels', 'scores']"""
    if not hasattr(body, "layer4"):
        raise StageError(f"the detector needs a ResNet-family backbone (conv1, bn1, layer1..4); got "
                         f"{type(body).__name__}")
    if not 0 <= cfg.trainable_layers <= 5:
        raise StageError(f"model.trainable_layers={cfg.trainable_layers} must be in 0..5")
    if pretrained:
        _freeze_batchnorm(body)
    train_prefixes = TRAINABLE_ORDER[:cfg.trainable_layers] + (("bn1",) if cfg.trainable_layers == 5 else ())
    for name, p in body.named_parameters():
        p.requires_grad_(name.startswith(train_prefixes))

    return_layers = {f"layer{k}": str(i) for i, k in enumerate(cfg.returned_layers)}
    in_channels = [_stage_channels(body, k) for k in cfg.returned_layers]
    backbone = BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels)  # + LastLevelMaxPool ("pool")
    levels = len(cfg.returned_layers) + 1
    anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg.anchor_sizes),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * levels)
    roi_pool = MultiScaleRoIAlign(featmap_names=list(return_layers.values()), output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)
    predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
    n_pre, n_post = cfg.rpn_pre_nms_top_n, cfg.rpn_post_nms_top_n
    return FasterRCNN(backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
                      rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head, box_predictor=predictor,
                      rpn_pre_nms_top_n_train=n_pre, rpn_pre_nms_top_n_test=n_pre,
                      rpn_post_nms_top_n_train=n_post, rpn_post_nms_top_n_test=n_post,
                      rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                      box_batch_size_per_image=cfg.box_batch_size_per_image,
                      box_detections_per_img=cfg.box_detections_per_img)


def backbone_body(cfg: Config, ctx: StageContext | None = None) -> tuple[nn.Module, BackboneConfig, bool, str]:
    """The ResNet body the detector starts from: (body, its config, pretrained?, where it came from).

    With ``backbone_from`` it is the upstream stage's classifier (``outputs/model``) with its weights;
    otherwise ``model.backbone`` (default: the cnn stage's narrow_resnet), random or ``model.backbone.init``."""
    if cfg.backbone_from is None:
        bcfg = cfg.model.backbone or BackboneConfig()
        body = build_classifier(bcfg, 1)
        init_weights(body, bcfg)
        return body, bcfg, bool(bcfg.init), bcfg.init or "random init"
    model_dir = ctx.input(cfg.backbone_from, "model")
    meta_file = model_dir / "config.json"
    if not meta_file.is_file():
        raise StageError(f"backbone_from={cfg.backbone_from!r}: {meta_file} not found")
    meta = json.loads(meta_file.read_text())
    bcfg = BackboneConfig(**meta["model"])
    body = build_classifier(bcfg, len(meta["classes"]))
    load_into(body, load_weights(model_dir / "model.safetensors"), str(model_dir / "model.safetensors"))
    return body, bcfg, True, str(model_dir)


def transfer_blocks(model: FasterRCNN) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """Backbone body stem, layer1..layer4 as blocks (only their trainable_layers-unfrozen tensors, so
    a transfer plan never unfreezes what trainable_layers froze); FPN + RPN + RoI heads as the head."""
    body = model.backbone.body  # IntermediateLayerGetter: layers past the last returned one are gone

    def live(*modules: nn.Module) -> list[nn.Parameter]:
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    blocks = [live(body.conv1, body.bn1)]
    blocks += [live(getattr(body, f"layer{i}")) if hasattr(body, f"layer{i}") else [] for i in range(1, 5)]
    head = [*model.backbone.fpn.parameters(), *model.rpn.parameters(), *model.roi_heads.parameters()]
    return blocks, head


def save_model(model: FasterRCNN, cfg: ModelConfig, backbone: BackboneConfig, pretrained: bool, classes: list[str],
               out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": cfg.model_dump(), "backbone": backbone.model_dump(),
                                                 "frozen_batchnorm": pretrained, "classes": classes}, indent=2))


def load_model(model_dir: Path) -> tuple[FasterRCNN, list[str]]:
    """``outputs/model`` of a detector stage -> (the trained Faster R-CNN in eval mode, class names 1..C)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    body = build_classifier(BackboneConfig(**meta["backbone"]), 1)
    model = build_detector(ModelConfig(**meta["model"]), body, len(meta["classes"]), meta["frozen_batchnorm"])
    load_into(model, load_weights(model_dir / "model.safetensors"), str(model_dir))
    return model.eval(), meta["classes"]


# ----------------------------------------------------------------------------------------------
# data


class VGPixels(torch.utils.data.Dataset):
    """VG images decoded on access, as uint8 (3, H, W): nothing is held in memory, so a DataLoader's
    workers decode them per item (Visual Genome's 108k images would be ~90 GB decoded). ``pixels[i]``,
    ``pixels[a:b]`` (a list), ``pixels.subset(indices)``."""

    def __init__(self, images: list[VGImage]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: list[int]) -> "VGPixels":
        return VGPixels([self.images[i] for i in indices])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        im = self.images[i]
        rgb = open_rgb(im.path)
        _check_size(im, rgb.size)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _check_size(im: VGImage, size: tuple[int, int]) -> None:
    if size != (im.width, im.height):
        raise StageError(f"{im.path}: image is {size[0]}x{size[1]} but image_data.json says "
                         f"{im.width}x{im.height} (image_id {im.image_id})")


def decode_images(images: list[VGImage]) -> VGPixels:
    """The images as a lazily decoding :class:`VGPixels`. Every file's header is read now (no pixel
    decoding), so a missing or unreadable file or a size that differs from image_data.json is an error
    naming the file before training starts."""
    for im in images:
        _check_size(im, image_size(im.path))
    return VGPixels(images)


class DetectionDataset(torch.utils.data.Dataset):
    """(image (3, H, W) uint8, {"boxes": (n, 4) float x1y1x2y2, "labels": (n,) int64 in 1..C}); boxes whose
    name is not a class are left out. ``pixels``: uint8 images by position (a lazily decoding
    :class:`VGPixels`, or a list of tensors), decoded in the loader's workers. Scaling to [0, 1] and the
    random flip happen on the batch in the main process (:func:`prepare_batch`), so they do not depend
    on ``num_workers`` and a resumed run draws the flips the unbroken run drew (the RNG is checkpointed)."""

    def __init__(self, images: list[VGImage], pixels, class_ids: dict[str, int], train: bool):
        self.pixels, self.train = pixels, train
        self.targets = []
        for im in images:
            keep = [i for i, n in enumerate(im.names) if n in class_ids]
            self.targets.append({"boxes": torch.from_numpy(im.boxes[keep]).reshape(-1, 4).float(),
                                 "labels": torch.tensor([class_ids[im.names[i]] for i in keep], dtype=torch.int64)})

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        return self.pixels[i], self.targets[i]


def prepare_batch(xs: list[torch.Tensor], targets: list[dict], train: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """uint8 images (on any device) -> float in [0, 1]; ``train``: each image and its boxes flipped
    horizontally with probability 1/2 (main-process torch RNG, one draw per image)."""
    out_x, out_t = [], []
    flips = torch.rand(len(xs)) < 0.5 if train else torch.zeros(len(xs), dtype=torch.bool)
    for x, t, f in zip(xs, targets, flips.tolist()):
        x = x.float().div_(255.0)
        if f:
            w = x.shape[-1]
            x = x.flip(-1)
            b = t["boxes"]
            t = {"boxes": torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1), "labels": t["labels"]}
        out_x.append(x)
        out_t.append(t)
    return out_x, out_t


def collate(batch):
    """-> (list of images, list of targets): Faster R-CNN takes images of different sizes."""
    return [x for x, _ in batch], [t for _, t in batch]


# ----------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
def detect(model: FasterRCNN, images: list[torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """Eval-mode Faster R-CNN on float images (3, H, W) in [0, 1]. Per image: "boxes" (n, 4) in image
    pixels, "scores" (n,), "labels" (n,) in 1..C, sorted by score (n <= box_detections_per_img), and for
    the first min(n, k) boxes "features" (m, representation_size) = box head on the RoI-pooled FPN
    features of the final box, and "probs" (m, C+1) = softmax of the box predictor's class logits."""
    original_sizes = [tuple(x.shape[-2:]) for x in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)  # {level: (b, fpn_channels, h_l, w_l)}
    proposals, _ = model.rpn(batch, features)
    dets, _ = model.roi_heads(features, proposals, batch.image_sizes)  # boxes in resized-image pixels
    top = [d["boxes"][:k] for d in dets]
    pooled = model.roi_heads.box_roi_pool(features, top, batch.image_sizes)  # (sum m, fpn_channels, 7, 7)
    feats = model.roi_heads.box_head(pooled)  # (sum m, representation_size)
    logits, _ = model.roi_heads.box_predictor(feats)  # (sum m, C+1)
    probs = logits.float().softmax(-1)
    dets = model.transform.postprocess(dets, batch.image_sizes, original_sizes)
    sizes = [len(b) for b in top]
    for d, f, p in zip(dets, feats.float().split(sizes), probs.split(sizes)):
        d["features"], d["probs"] = f, p
    return dets


def predict_all(ctx: StageContext, model: FasterRCNN, pixels, k: int,
                batch_size: int) -> list[dict[str, np.ndarray]]:
    """``detect`` over every image in batches of ``batch_size``; numpy on the CPU. The images (uint8, by
    position: :class:`VGPixels` or a list) stream through a DataLoader, decoded in ``runtime.num_workers``
    workers while the model runs; only the current batch is in memory."""
    model.eval()
    out = []
    loader = torch.utils.data.DataLoader(pixels, batch_size=batch_size, collate_fn=list,
                                         num_workers=ctx.config.runtime.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    for batch in loader:
        xs = [x.to(ctx.device, non_blocking=True).float().div_(255.0) for x in batch]
        with autocast(ctx):
            dets = detect(model, xs, k)
        out.extend({key: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                    for key, v in d.items()} for d in dets)
    return out


def region_rows(det: dict[str, np.ndarray], width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's top-k detections -> (features (m, D), geometry (m, 6), probs (m, C+1)); geometry =
    x1, y1, x2, y2 / image size, box area / image area, detection score."""
    m = len(det["features"])
    b = det["boxes"][:m] / np.array([width, height, width, height], dtype=np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    geometry = np.concatenate([b, area[:, None], det["scores"][:m, None]], 1)
    return det["features"], geometry, det["probs"]


# ----------------------------------------------------------------------------------------------
# the stage


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    vg_dir = ctx.input(cfg.data, "vg")
    images, vg_stats = load_vg(vg_dir)
    by_id = {im.image_id: i for i, im in enumerate(images)}
    splits = {}
    for split in ("train", "val"):
        ids = read_id_list(vg_dir / f"{split}_ids.txt")
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise StageError(f"{vg_dir}/{split}_ids.txt: image ids {missing[:5]} are not in image_data.json")
        splits[split] = [by_id[i] for i in ids]
    train_imgs = [images[i] for i in splits["train"]]
    classes = build_vocab((im.names for im in train_imgs), cfg.model.num_classes_k or 1 << 30)
    if not classes:
        raise StageError(f"{vg_dir}: the train split has no named objects")
    class_ids = {n: i + 1 for i, n in enumerate(classes)}
    pixels = decode_images(images)
    train_ds = DetectionDataset(train_imgs, pixels.subset(splits["train"]), class_ids, train=True)
    val_ds = DetectionDataset([images[i] for i in splits["val"]], pixels.subset(splits["val"]), class_ids,
                              train=False)

    body, backbone_cfg, pretrained, source = backbone_body(cfg, ctx)
    model = build_detector(cfg.model, body, len(classes), pretrained)
    blocks, head = transfer_blocks(model)
    ctx.tracker.log_params({"data.classes": len(classes), "data.train": len(train_ds), "data.val": len(val_ds),
                            "data.objects": vg_stats["objects"], "backbone.source": source,
                            "model.params": sum(p.numel() for p in model.parameters())})

    def loss_fn(m: FasterRCNN, batch, step: int):
        xs, targets = prepare_batch(*batch, train=True)
        losses = m(xs, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}

    res = fit(ctx, model, train_ds, collate, loss_fn, cfg.train, blocks, head)

    # one inference pass over every scene image: val detections for mAP, top-K of all for the region store
    t0 = time.perf_counter()
    model.roi_heads.score_thresh = cfg.regions.score_thresh
    dets = predict_all(ctx, model, pixels, cfg.regions.k, cfg.eval_batch_size)
    infer_s = time.perf_counter() - t0
    val_gts = [{"image_id": images[i].image_id} | {k: v.numpy() for k, v in t.items()}
               for i, t in zip(splits["val"], val_ds.targets)]
    val_preds = [{"image_id": images[i].image_id, "boxes": dets[i]["boxes"], "scores": dets[i]["scores"],
                  "labels": dets[i]["labels"]} for i in splits["val"]]
    scores, per_class = detection_map(val_preds, val_gts, len(classes))
    empty, _ = detection_map([], val_gts, len(classes))
    metrics = {f"val/{k}": v for k, v in scores.items()}
    baselines = {f"val/{k}_predict_nothing": v for k, v in empty.items() if k in ("map", "map50")}
    (ctx.outputs / "per_class_ap.json").write_text(json.dumps(
        {classes[c - 1]: ap for c, ap in sorted(per_class.items())}, indent=2))

    t1 = time.perf_counter()
    writer = RegionStoreWriter(ctx.outputs / "regions", len(images), cfg.regions.k,
                               cfg.model.representation_size, classes)
    for im, d in zip(images, dets):
        writer.add(im.image_id, *region_rows(d, im.width, im.height))
    writer.close()
    write_s = time.perf_counter() - t1

    ctx.tracker.log_metrics(metrics | {"train/steps_per_s_mean": res.steps_per_s}, step=res.step)
    save_model(model.cpu(), cfg.model, backbone_cfg, pretrained, classes, ctx.outputs / "model")
    rows = len(images) * cfg.regions.k
    return ctx.result(outputs={"model": "outputs/model", "regions": "outputs/regions"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds,
                            "train_images_per_s": res.steps_per_s * cfg.train.batch_size,
                            "backbone": source, "classes": len(classes), "region_images": len(images),
                            "inference_seconds": infer_s, "region_rows_per_s": rows / max(infer_s + write_s, 1e-9),
                            "region_store_write_rows_per_s": rows / max(write_s, 1e-9)})
