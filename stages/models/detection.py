"""Faster R-CNN over a classification backbone (FPN for ResNets, one stride-16 map for VGG16/AlexNet), with
an optional attribute head (bottom-up attention), and its transfer blocks."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

from stages.config.cnn import ModelConfig as BackboneConfig
from stages.config.detector import (
    RESNET_ARCHS,
    SINGLE_MAP_ARCHS,
    TRAINABLE_ORDER,
    ModelConfig,
    check_anchors,
)
from stages.contract import StageError
from stages.models.resnet import build_classifier
from stages.train.checkpoint import load_into, load_weights, save_weights
from stages.train.distributed import global_token_mean
from stages.train.transfer import TransferBlocks


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
        n = int(use.sum())
        # under DDP the mean over every rank's boxes (one rank: this mean)
        losses["loss_attributes"] = self.attribute_loss_weight * global_token_mean(loss / max(n, 1), n)
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
        backbone, anchors, roi_pool, box_head = _single_map_parts(cfg, body, arch)
    else:
        backbone, anchors, roi_pool, box_head = _fpn_parts(cfg, body, arch, pretrained)
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


def _single_map_parts(cfg: ModelConfig, body: nn.Module, arch: str) -> tuple:
    """VGG16 / AlexNet classifier -> (SingleMapBackbone with its first 5 - trainable_layers stages frozen,
    one-level anchors, RoI pool on map "0", box head)."""
    if not isinstance(getattr(body, "features", None), nn.Sequential):
        raise StageError(f"backbone arch {arch!r} needs a classifier with conv `features`; got {type(body).__name__}")
    backbone = SingleMapBackbone(body.features, arch)
    for i, stage in enumerate(backbone.body):
        stage.requires_grad_(i >= 5 - cfg.trainable_layers)
    anchors = AnchorGenerator(sizes=(tuple(cfg.anchor_sizes),), aspect_ratios=(tuple(cfg.aspect_ratios),))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return backbone, anchors, roi_pool, TwoMLPHead(backbone.out_channels * 7 * 7, cfg.representation_size)


def _fpn_parts(cfg: ModelConfig, body: nn.Module, arch: str, pretrained: bool) -> tuple:
    """ResNet-family classifier -> (BackboneWithFPN over ``cfg.returned_layers``, trainable_layers applied,
    FrozenBatchNorm2d when ``pretrained``; one anchor size per level; RoI pool over the levels; box head)."""
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
    return backbone, anchors, roi_pool, TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)


def transfer_blocks(model: FasterRCNN) -> TransferBlocks:
    """A detector from :func:`build_detector` -> blocks: the backbone body's stem, layer1..layer4 (VGG16 /
    AlexNet: its 5 stages), each only its ``trainable_layers``-unfrozen tensors, so a transfer plan never
    unfreezes what trainable_layers froze. Head: FPN (ResNets) + RPN + RoI heads (incl. the attribute head)."""
    body = model.backbone.body  # IntermediateLayerGetter: layers past the last returned one are gone

    def live(*modules: nn.Module) -> list[nn.Parameter]:
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    head = [*model.rpn.parameters(), *model.roi_heads.parameters()]
    if isinstance(model.backbone, SingleMapBackbone):
        return TransferBlocks([live(stage) for stage in body], head)
    blocks = [live(body.conv1, body.bn1)]
    blocks += [live(getattr(body, f"layer{i}")) if hasattr(body, f"layer{i}") else [] for i in range(1, 5)]
    return TransferBlocks(blocks, [*model.backbone.fpn.parameters(), *head])


def save_model(model: FasterRCNN, cfg: ModelConfig, backbone: BackboneConfig, pretrained: bool, classes: list[str],
               out: Path, attributes: list[str] | None = None) -> None:
    """``out/model.safetensors`` + ``out/config.json`` (detector and backbone configs, whether the body's
    BatchNorm is frozen, class names 1..C, attribute names): what :func:`load_model` rebuilds from."""
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
           score_thresh: float = 0.0, nms: float | None = None) -> list[dict[str, torch.Tensor]]:
    """Eval-mode Faster R-CNN on float images (3, H, W) in [0, 1]. Per image: "boxes" (n, 4) in image
    pixels, "scores" (n,), "labels" (n,) in 1..C, sorted by score (n <= box_detections_per_img; what mAP
    is measured on), "region_index" (m,): the detections that become regions, and for those m boxes
    (:func:`num_regions` of k, min_k (None = k), score_thresh) "features"
    (m, representation_size) = box head on the RoI-pooled backbone features of the final box, "probs"
    (m, C+1) = softmax of the box predictor's class logits, and with an attribute head
    "attribute_probs" (m, A) = its sigmoid.

    With ``nms`` (IoU), regions skip every detection that overlaps a better-scoring one of *any* label
    by more than that: Faster R-CNN regresses one box per class from each proposal and suppresses per class, so one
    object comes back under several labels (a star also as a low-scoring "cross" at the same place), and
    re-pooled, each copy looks like the star. Regions are meant to be one per object (bottom-up attention
    keeps one box per proposal); without this a K=10 set holds each object two or three times."""
    original_sizes = [tuple(x.shape[-2:]) for x in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)  # {level: (b, channels, h_l, w_l)}
    proposals, _ = model.rpn(batch, features)
    dets, _ = model.roi_heads(features, proposals, batch.image_sizes)  # boxes in resized-image pixels
    lower = k if min_k is None else min_k
    for d in dets:  # the regions: detections by score, with nms one per object, then the top by num_regions
        order = box_ops.nms(d["boxes"].float(), d["scores"].float(), nms) if nms is not None else \
            torch.arange(len(d["scores"]), device=d["scores"].device)
        d["region_index"] = order[:num_regions(d["scores"][order], k, lower, score_thresh)]
    top = [d["boxes"][d["region_index"]] for d in dets]
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
