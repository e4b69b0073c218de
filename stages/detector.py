"""Stage 2 `detector`: Visual Genome detection fine-tune of the cnn backbone + region features.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads a Visual Genome folder (``image_data.json``, ``objects.json``, ``train_ids.txt``,
``val_ids.txt``, ``images/<image_id>.jpg``) from the ``data`` stage and the classifier in
``outputs/model/`` of the ``backbone_from`` stage. Train/val come from :func:`stages.data.vg_splits`
(the id-list files when present, else a seeded split of ``val_fraction``). Trains a torchvision Faster
R-CNN on the object names -- ResNet body + FPN, or for VGG16 / AlexNet a single feature map (their
conv ``features`` minus the last max-pool, stride 16, as in the original Faster R-CNN) -- optionally
with a multi-label attribute head on the box-head features (bottom-up attention, Anderson et al.
2018: ``model.attributes``), reports COCO box mAP on val against a detector that predicts nothing,
and writes
    outputs/model/     model.safetensors + config.json (everything :func:`load_model` needs)
    outputs/regions/   a RegionStore (stages.regions): per scene image (train and val) the detections
                       with score >= regions.score_thresh, at least regions.min_k and at most
                       regions.k (by score), with pooled box features, class probabilities and geometry
    outputs/per_class_ap.json   AP@0.5 per class name on val
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from stages.base import StageContext, StageError, StageResult
from stages.checkpoint import load_into, load_weights, save_weights
from stages.cnn import ModelConfig as BackboneConfig
from stages.cnn import build_classifier, init_weights
from stages.config.detector import (RESNET_ARCHS, SINGLE_MAP_ARCHS, TRAINABLE_ORDER, Config,  # noqa: F401 - the kind's config
                                    ModelConfig, RegionsConfig, check_anchors)
from stages.data import VGImage, image_size, load_vg, open_rgb, vg_splits, vg_vocabularies
from stages.metrics import detection_map
from stages.regions import RegionStoreWriter
from stages.train import autocast, fit

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


class SingleMapBackbone(nn.Module):
    """The conv ``features`` of a torchvision VGG16 / AlexNet classifier without its last max-pool
    (stride 16: conv5_3 of VGG16 as in Faster R-CNN, Ren et al. 2015), as ``body`` = 5 stages
    (VGG16: conv1_x..conv5_x, each after the first starting behind a max-pool; AlexNet: one conv
    layer each, a max-pool closing conv1 and conv2). ``forward`` -> {"0": (B, out_channels, H/16, W/16)}."""

    def __init__(self, features: nn.Sequential, arch: str):
        super().__init__()
        mods = list(features)
        if isinstance(mods[-1], nn.MaxPool2d):
            mods = mods[:-1]
        stages: list[list[nn.Module]] = []
        after_pool = True
        for m in mods:
            if isinstance(m, nn.Conv2d) and (arch == "alexnet" or after_pool):
                stages.append([])
            after_pool = isinstance(m, nn.MaxPool2d) or (after_pool and not isinstance(m, nn.Conv2d))
            stages[-1].append(m)
        if len(stages) != 5:
            raise StageError(f"{arch} features: expected 5 conv stages, found {len(stages)}")
        self.body = nn.Sequential(*(nn.Sequential(*st) for st in stages))
        self.out_channels = [m for m in mods if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.body(x))])


class AttributeRoIHeads(RoIHeads):
    """torchvision RoIHeads plus a multi-label attribute classifier (bottom-up attention, Anderson et
    al. 2018) on the box-head features of the positive training proposals -- the same representation
    the region store keeps, so the loss pushes attribute (colour, size) information into it.

    Targets carry "attributes": (n, A) multi-hot float per ground-truth box. A positive proposal
    takes the attributes of the ground-truth box it was matched to; proposals whose box has no
    attribute in the vocabulary are left out (Visual Genome leaves most attributes unannotated, so a
    missing attribute is not a negative for an unannotated box). Loss ``loss_attributes`` =
    ``loss_weight`` x BCE summed over attributes, averaged over those proposals; the predictor's bias
    starts at the prior log(1/(A-1)) so the first loss is ~(attributes per box) x log A, on the class
    loss's scale. Multi-label BCE rather than BUA's softmax because attributes are not exclusive
    (a box is "red" and "small"): a softmax would make them compete for one unit of probability."""

    def __init__(self, *args, num_attributes: int, attribute_loss_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        rep = self.box_predictor.cls_score.in_features
        self.attribute_predictor = nn.Linear(rep, num_attributes)
        nn.init.normal_(self.attribute_predictor.weight, std=0.01)
        nn.init.constant_(self.attribute_predictor.bias, -float(np.log(max(num_attributes - 1, 1))))
        self.attribute_loss_weight = attribute_loss_weight
        self._matched: tuple[torch.Tensor, torch.Tensor] | None = None

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        atts = []
        for t, idx in zip(targets, matched_idxs):
            a = t["attributes"]
            atts.append(a[idx] if len(a) else a.new_zeros(len(idx), self.attribute_predictor.out_features))
        self._matched = (torch.cat(atts), torch.cat(labels) > 0)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None or any("attributes" not in t for t in targets):
            raise StageError("the attribute head trains on targets with an 'attributes' (n, A) tensor")
        box_features: list[torch.Tensor] = []
        hook = self.box_head.register_forward_hook(lambda m, i, out: box_features.append(out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        att, positive = self._matched
        self._matched = None
        use = positive & (att.sum(1) > 0)
        logits = self.attribute_predictor(box_features[0][use]).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, att[use].float(), reduction="sum")
        losses["loss_attributes"] = self.attribute_loss_weight * loss / max(int(use.sum()), 1)
        return result, losses


def build_detector(cfg: ModelConfig, body: nn.Module, num_classes: int, pretrained: bool,
                   arch: str = "narrow_resnet", num_attributes: int = 0) -> FasterRCNN:
    """Classifier ``body`` + ``num_classes`` foreground classes -> an untrained-head Faster R-CNN
    (torchvision), body frozen per ``cfg.trainable_layers``. ResNet family (``arch`` in RESNET_ARCHS:
    conv1, bn1, layer1..4) -> FPN; ``vgg16`` / ``alexnet`` (their ``features``) -> one feature map
    (:class:`SingleMapBackbone`). ``num_attributes`` > 0 adds the attribute head
    (:class:`AttributeRoIHeads`, needs cfg.attributes.enabled).

    A ``pretrained`` ResNet body gets FrozenBatchNorm2d, a random one keeps BatchNorm2d (as torchvision's
    ``fasterrcnn_resnet50_fpn``). The classifier's avgpool/fc (classifier) are dropped.

    >>> body = build_classifier(BackboneConfig(), 10)
    >>> m = build_detector(ModelConfig(), body, num_classes=3, pretrained=False).eval()
    >>> sorted(m([torch.rand(3, 64, 64)])[0])
    ['boxes', 'labels', 'scores']"""
    if not 0 <= cfg.trainable_layers <= 5:
        raise StageError(f"model.trainable_layers={cfg.trainable_layers} must be in 0..5")
    if arch in SINGLE_MAP_ARCHS:
        if not isinstance(getattr(body, "features", None), nn.Sequential):
            raise StageError(f"backbone arch {arch!r} needs a classifier with conv `features`; got {type(body).__name__}")
        backbone = SingleMapBackbone(body.features, arch)
        for i, stage in enumerate(backbone.body):
            stage.requires_grad_(i >= 5 - cfg.trainable_layers)
        anchors = AnchorGenerator(sizes=(tuple(cfg.anchor_sizes),), aspect_ratios=(tuple(cfg.aspect_ratios),))
        roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, cfg.representation_size)
    else:
        if not hasattr(body, "layer4"):
            raise StageError(f"the detector's FPN needs a ResNet-family backbone (conv1, bn1, layer1..4) or one of "
                             f"{', '.join(SINGLE_MAP_ARCHS)}; got {type(body).__name__} (arch {arch!r})")
        check_anchors(cfg, arch if arch in RESNET_ARCHS else "narrow_resnet")
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
    model = FasterRCNN(backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
                       rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head, box_predictor=predictor,
                       rpn_pre_nms_top_n_train=n_pre, rpn_pre_nms_top_n_test=n_pre,
                       rpn_post_nms_top_n_train=n_post, rpn_post_nms_top_n_test=n_post,
                       rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                       box_batch_size_per_image=cfg.box_batch_size_per_image,
                       box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh)
    if num_attributes:
        if not cfg.attributes.enabled:
            raise StageError(f"num_attributes={num_attributes} but model.attributes.enabled is false")
        rh = model.roi_heads
        model.roi_heads = AttributeRoIHeads(
            rh.box_roi_pool, rh.box_head, rh.box_predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,  # FasterRCNN's
            batch_size_per_image=cfg.box_batch_size_per_image, positive_fraction=0.25, bbox_reg_weights=None,
            score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh, detections_per_img=rh.detections_per_img,
            num_attributes=num_attributes, attribute_loss_weight=cfg.attributes.loss_weight)
    elif cfg.attributes.enabled:
        raise StageError("model.attributes.enabled but there are no attributes (num_attributes=0): "
                         "the train split's attributes.json has none")
    return model


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
    """Backbone body stem, layer1..layer4 (VGG16 / AlexNet: its 5 stages) as blocks (only their
    trainable_layers-unfrozen tensors, so a transfer plan never unfreezes what trainable_layers froze);
    FPN + RPN + RoI heads (incl. the attribute head) as the head."""
    body = model.backbone.body  # IntermediateLayerGetter: layers past the last returned one are gone

    def live(*modules: nn.Module) -> list[nn.Parameter]:
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    if isinstance(model.backbone, SingleMapBackbone):
        return [live(stage) for stage in body], [*model.rpn.parameters(), *model.roi_heads.parameters()]
    blocks = [live(body.conv1, body.bn1)]
    blocks += [live(getattr(body, f"layer{i}")) if hasattr(body, f"layer{i}") else [] for i in range(1, 5)]
    head = [*model.backbone.fpn.parameters(), *model.rpn.parameters(), *model.roi_heads.parameters()]
    return blocks, head


def save_model(model: FasterRCNN, cfg: ModelConfig, backbone: BackboneConfig, pretrained: bool, classes: list[str],
               out: Path, attributes: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": cfg.model_dump(), "backbone": backbone.model_dump(),
                                                 "frozen_batchnorm": pretrained, "classes": classes,
                                                 "attributes": attributes or []}, indent=2))


def load_model(model_dir: Path) -> tuple[FasterRCNN, list[str]]:
    """``outputs/model`` of a detector stage -> (the trained Faster R-CNN in eval mode, class names 1..C).
    The attribute vocabulary (index order of the attribute head) is ``config.json``'s "attributes"."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    bcfg = BackboneConfig(**meta["backbone"])
    body = build_classifier(bcfg, 1)
    model = build_detector(ModelConfig(**meta["model"]), body, len(meta["classes"]), meta["frozen_batchnorm"],
                           bcfg.arch, len(meta.get("attributes", [])))
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
    on ``num_workers`` and a resumed run draws the flips the unbroken run drew (the RNG is checkpointed).
    With ``attribute_ids`` each target also has "attributes": (n, A) multi-hot float."""

    def __init__(self, images: list[VGImage], pixels, class_ids: dict[str, int], train: bool,
                 attribute_ids: dict[str, int] | None = None):
        self.pixels, self.train = pixels, train
        self.targets = []
        for im in images:
            keep = [i for i, n in enumerate(im.names) if n in class_ids]
            t = {"boxes": torch.from_numpy(im.boxes[keep]).reshape(-1, 4).float(),
                 "labels": torch.tensor([class_ids[im.names[i]] for i in keep], dtype=torch.int64)}
            if attribute_ids:
                att = torch.zeros(len(keep), len(attribute_ids))
                for row, i in enumerate(keep):
                    for a in (im.attributes[i] if i < len(im.attributes) else []):
                        if a in attribute_ids:
                            att[row, attribute_ids[a]] = 1.0
                t["attributes"] = att
            self.targets.append(t)

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
            t = t | {"boxes": torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)}
        out_x.append(x)
        out_t.append(t)
    return out_x, out_t


def collate(batch):
    """-> (list of images, list of targets): Faster R-CNN takes images of different sizes."""
    return [x for x, _ in batch], [t for _, t in batch]


# ----------------------------------------------------------------------------------------------
# inference


def num_regions(scores: torch.Tensor | np.ndarray, k: int, min_k: int, score_thresh: float) -> int:
    """How many of an image's detections (``scores`` sorted high to low) become regions: those with
    score >= score_thresh, but at least min_k and at most k (never more than there are).

    >>> num_regions(torch.tensor([0.9, 0.5, 0.1, 0.05]), k=3, min_k=1, score_thresh=0.2)
    2
    >>> num_regions(torch.tensor([0.1, 0.05]), k=3, min_k=1, score_thresh=0.2)
    1"""
    above = int((scores >= score_thresh).sum())
    return min(len(scores), k, max(min_k, above))


@torch.no_grad()
def detect(model: FasterRCNN, images: list[torch.Tensor], k: int, min_k: int | None = None,
           score_thresh: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """Eval-mode Faster R-CNN on float images (3, H, W) in [0, 1]. Per image: "boxes" (n, 4) in image
    pixels, "scores" (n,), "labels" (n,) in 1..C, sorted by score (n <= box_detections_per_img), and for
    the first m = :func:`num_regions` (k, min_k (None = k), score_thresh) boxes "features"
    (m, representation_size) = box head on the RoI-pooled backbone features of the final box, "probs"
    (m, C+1) = softmax of the box predictor's class logits, and with an attribute head
    "attribute_probs" (m, A) = its sigmoid."""
    original_sizes = [tuple(x.shape[-2:]) for x in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)  # {level: (b, channels, h_l, w_l)}
    proposals, _ = model.rpn(batch, features)
    dets, _ = model.roi_heads(features, proposals, batch.image_sizes)  # boxes in resized-image pixels
    lower = k if min_k is None else min_k
    top = [d["boxes"][:num_regions(d["scores"], k, lower, score_thresh)] for d in dets]
    pooled = model.roi_heads.box_roi_pool(features, top, batch.image_sizes)  # (sum m, fpn_channels, 7, 7)
    feats = model.roi_heads.box_head(pooled)  # (sum m, representation_size)
    logits, _ = model.roi_heads.box_predictor(feats)  # (sum m, C+1)
    probs = logits.float().softmax(-1)
    att = getattr(model.roi_heads, "attribute_predictor", None)
    att_probs = att(feats).float().sigmoid() if att is not None else None
    dets = model.transform.postprocess(dets, batch.image_sizes, original_sizes)
    sizes = [len(b) for b in top]
    for i, (d, f, p) in enumerate(zip(dets, feats.float().split(sizes), probs.split(sizes))):
        d["features"], d["probs"] = f, p
        if att_probs is not None:
            d["attribute_probs"] = att_probs.split(sizes)[i]
    return dets


def predict_all(ctx: StageContext, model: FasterRCNN, pixels, regions: RegionsConfig,
                batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``detect`` (with ``regions``' k / min_k / score_thresh) over every image in batches of ``batch_size``,
    yielding each image's detections as numpy on the CPU, in order. The images (uint8, by position:
    :class:`VGPixels` or a list) stream through a DataLoader, decoded in ``runtime.num_workers`` workers
    while the model runs; only the current batch is in memory (the caller writes each image's regions
    away as it comes: all of VG's top-100 features would be ~80 GB)."""
    model.eval()
    loader = torch.utils.data.DataLoader(pixels, batch_size=batch_size, collate_fn=list,
                                         num_workers=ctx.config.runtime.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    for batch in loader:
        xs = [x.to(ctx.device, non_blocking=True).float().div_(255.0) for x in batch]
        with autocast(ctx):
            dets = detect(model, xs, regions.k, regions.lower, regions.score_thresh)
        for d in dets:
            yield {key: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for key, v in d.items()}


def region_rows(det: dict[str, np.ndarray], width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's selected detections -> (features (m, D), geometry (m, 6), probs (m, C+1)); geometry =
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
    images, vg_stats = load_vg(vg_dir, bad_boxes=cfg.bad_boxes)
    splits, split_how = vg_splits(vg_dir, images, cfg.seed, cfg.val_fraction)
    train_imgs = [images[i] for i in splits["train"]]
    att_k = cfg.model.attributes.num_attributes_k if cfg.model.attributes.enabled else -1
    classes, attributes, _ = vg_vocabularies(train_imgs, cfg.model.num_classes_k, max(att_k, 0))
    attributes = attributes if cfg.model.attributes.enabled else []
    if not classes:
        raise StageError(f"{vg_dir}: the train split has no named objects")
    if cfg.model.attributes.enabled and not attributes:
        raise StageError(f"model.attributes.enabled but the train split of {vg_dir} has no attributes "
                         f"({vg_dir / 'attributes.json'} missing or empty)")
    class_ids = {n: i + 1 for i, n in enumerate(classes)}
    attribute_ids = {a: i for i, a in enumerate(attributes)}
    pixels = decode_images(images)
    train_ds = DetectionDataset(train_imgs, pixels.subset(splits["train"]), class_ids, train=True,
                                attribute_ids=attribute_ids)
    val_ds = DetectionDataset([images[i] for i in splits["val"]], pixels.subset(splits["val"]), class_ids,
                              train=False)

    body, backbone_cfg, pretrained, source = backbone_body(cfg, ctx)
    model = build_detector(cfg.model, body, len(classes), pretrained, backbone_cfg.arch, len(attributes))
    blocks, head = transfer_blocks(model)
    ctx.tracker.log_params({"data.classes": len(classes), "data.attributes": len(attributes),
                            "data.train": len(train_ds), "data.val": len(val_ds), "data.split": split_how,
                            "data.objects": vg_stats["objects"], "data.boxes_clipped": vg_stats["clipped"],
                            "data.boxes_dropped": vg_stats["dropped_degenerate"], "backbone.source": source,
                            "backbone.arch": backbone_cfg.arch,
                            "model.params": sum(p.numel() for p in model.parameters())})

    def loss_fn(m: FasterRCNN, batch, step: int):
        xs, targets = prepare_batch(*batch, train=True)
        losses = m(xs, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg[, loss_attributes]
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    res = fit(ctx, model, train_ds, collate, loss_fn, cfg.train, blocks, head)

    # one inference pass over every scene image, streamed: each image's top-K regions go straight into the
    # region store (published atomically at the end); val images' detections are kept for mAP
    t0 = time.perf_counter()
    val_pos = {i: j for j, i in enumerate(splits["val"])}
    val_preds: list[dict | None] = [None] * len(val_pos)
    n_regions = []
    with RegionStoreWriter(ctx.outputs / "regions", len(images), cfg.regions.k, cfg.model.representation_size,
                           classes) as writer:
        for i, (im, d) in enumerate(zip(images, predict_all(ctx, model, pixels, cfg.regions, cfg.eval_batch_size))):
            writer.add(im.image_id, *region_rows(d, im.width, im.height))
            n_regions.append(len(d["features"]))
            if i in val_pos:
                val_preds[val_pos[i]] = {"image_id": im.image_id, "boxes": d["boxes"], "scores": d["scores"],
                                         "labels": d["labels"]}
        writer.close()
    region_s = time.perf_counter() - t0
    val_gts = [{"image_id": images[i].image_id} | {k: v.numpy() for k, v in t.items()}
               for i, t in zip(splits["val"], val_ds.targets)]
    scores, per_class = detection_map(val_preds, val_gts, len(classes))
    empty, _ = detection_map([], val_gts, len(classes))
    metrics = {f"val/{k}": v for k, v in scores.items()}
    baselines = {f"val/{k}_predict_nothing": v for k, v in empty.items() if k in ("map", "map50")}
    (ctx.outputs / "per_class_ap.json").write_text(json.dumps(
        {classes[c - 1]: ap for c, ap in sorted(per_class.items())}, indent=2))

    ctx.tracker.log_metrics(metrics | {"train/steps_per_s_mean": res.steps_per_s}, step=res.step)
    save_model(model.cpu(), cfg.model, backbone_cfg, pretrained, classes, ctx.outputs / "model", attributes)
    rows = len(images) * cfg.regions.k
    return ctx.result(outputs={"model": "outputs/model", "regions": "outputs/regions"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds,
                            "train_images_per_s": res.steps_per_s * cfg.train.batch_size,
                            "backbone": source, "classes": len(classes), "attributes": len(attributes),
                            "split": split_how, "train_images": len(train_ds), "val_images": len(val_ds),
                            "region_images": len(images), "regions_per_image_mean": float(np.mean(n_regions)),
                            "regions_per_image_min": int(min(n_regions)),
                            "region_pass_seconds": region_s, "region_rows_per_s": rows / max(region_s, 1e-9)})
