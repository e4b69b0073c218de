"""Config of stage kind `detector` (:mod:`stages.detector`)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from stages.config.cnn import ModelConfig as BackboneConfig
from stages.config.train import TrainConfig
from stages.contract import StageConfig, StageError, Strict

# torchvision's _resnet_fpn_extractor semantics: trainable_layers=n unfreezes the last n of these
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
RESNET_ARCHS = ("narrow_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")
# single-feature-map Faster R-CNN (no FPN) on the classifier's conv `features`; trainable_layers=n
# unfreezes the last n of 5 stages: VGG16 conv blocks conv1_x..conv5_x, AlexNet conv1..conv5
SINGLE_MAP_ARCHS = ("vgg16", "alexnet")


class AttributesConfig(Strict):
    enabled: bool = Field(False, description="multi-label attribute classifier on the box-head features")
    num_attributes_k: int = Field(400, ge=0, description="the K most frequent train attributes (0 = every one)")
    loss_weight: float = Field(0.1, ge=0.0, description="weight of the attribute BCE in the detector loss (vlp-tiny: "
                                                        "0.1 costs ~2 points of mAP@0.5, 0.25 ~10)")


class ModelConfig(Strict):
    num_classes_k: int = Field(0, ge=0, description="0 = every object name is a class; else the K most frequent names")
    trainable_layers: int = Field(5, ge=0, le=5, description="backbone stages that train, counted from the top "
                                                                  "(ResNet: layer4..layer1, stem; VGG16: conv5_x.."
                                                                  "conv1_x; AlexNet: conv5..conv1; 0 = body frozen, "
                                                                  "5 = all)")
    backbone: BackboneConfig | None = Field(None, description="backbone architecture when backbone_from is null "
                                                              "(null = the cnn stage's default narrow_resnet)")
    returned_layers: list[Annotated[int, Field(ge=1, le=4)]] = Field(default_factory=lambda: [2, 3, 4],
                                       description="ResNet stages feeding the FPN (+ a max-pooled extra level); "
                                                   "unused by vgg16/alexnet")
    fpn_channels: int = Field(64, ge=1, description="FPN width (ResNet); unused by vgg16/alexnet")
    anchor_sizes: list[PositiveInt] = Field(default_factory=lambda: [8, 16, 32, 64],
                                    description="anchor side in pixels: one per FPN level (returned_layers + pool) "
                                                "for ResNets; all on the one feature map for vgg16/alexnet")
    aspect_ratios: list[PositiveFloat] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1,
                                               description="anchor height / width")
    min_size: int = Field(64, ge=1, description="GeneralizedRCNNTransform resize: shorter side")
    max_size: int = Field(64, ge=1, description="GeneralizedRCNNTransform resize: longer side cap")
    representation_size: int = Field(128, ge=1, description="box-head (TwoMLPHead) width = region feature dim")
    rpn_pre_nms_top_n: int = Field(300, ge=1, description="RPN proposals per level before NMS (train and test)")
    rpn_post_nms_top_n: int = Field(100, ge=1, description="RPN proposals per image after NMS (train and test)")
    rpn_batch_size_per_image: int = Field(64, ge=1)
    box_batch_size_per_image: int = Field(64, ge=1)
    box_detections_per_img: int = Field(100, ge=1, description="detections kept per image (COCO maxDets = 100)")
    box_score_thresh: float = Field(0.0, ge=0.0, lt=1.0, description="class scores at or below this never become "
                                    "detections (torchvision box_score_thresh; mAP and regions see the rest)")
    attributes: AttributesConfig = Field(default_factory=AttributesConfig)

    @model_validator(mode="after")
    def _check(self):
        if not self.returned_layers or sorted(set(self.returned_layers)) != self.returned_layers \
                or min(self.returned_layers) < 1 or max(self.returned_layers) > 4:
            raise ValueError(f"model.returned_layers={self.returned_layers} must be increasing ResNet stages in 1..4")
        if not self.anchor_sizes:
            raise ValueError("model.anchor_sizes is empty")
        if self.max_size < self.min_size:
            raise ValueError(f"model.max_size={self.max_size} is smaller than model.min_size={self.min_size}")
        return self


class RegionsConfig(Strict):
    k: int = Field(10, ge=1, description="at most this many boxes per image (rows zero-padded when fewer)")
    min_k: int | None = Field(None, ge=0, description="at least this many (the best by score, even below "
                                                      "score_thresh, as far as there are detections); null = k")
    score_thresh: float = Field(0.0, ge=0.0, lt=1.0, description="keep detections scoring >= this (between min_k "
                                                                 "and k); bottom-up attention: 10..100 at 0.2")
    nms: float | None = Field(0.5, gt=0.0, le=1.0, description="class-agnostic NMS IoU over the detections before "
                                                             "the top k, so each object is one region (a proposal "
                                                             "yields a box per class); null = per-class NMS only")

    @model_validator(mode="after")
    def _check(self):
        if self.min_k is not None and self.min_k > self.k:
            raise ValueError(f"regions.min_k={self.min_k} exceeds regions.k={self.k}")
        return self

    @property
    def lower(self) -> int:
        return self.k if self.min_k is None else self.min_k


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
    bad_boxes: Literal["error", "drop"] = Field(
        "error", description="a VG box with no area inside its image (entirely outside it, or zero size): an error "
                             "naming the record, or dropped and counted (data/dropped_degenerate); boxes that only "
                             "cross the border are clipped either way")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="val share of a seeded split (used only when "
                                                                   "the vg folder has no train/val id lists)")

    @model_validator(mode="after")
    def _check(self):
        arch = (self.model.backbone or BackboneConfig()).arch if self.backbone_from is None else None
        if arch in RESNET_ARCHS:  # known now; with backbone_from, build_detector checks it when the stage starts
            try:
                check_anchors(self.model, arch)
            except StageError as e:
                raise ValueError(str(e)) from None
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

    def declared_outputs(self) -> set[str]:
        return {"model", "regions"}


def check_anchors(cfg: ModelConfig, arch: str) -> None:
    """A ResNet's FPN needs one anchor size per level (returned_layers + the max-pooled one)."""
    if arch in RESNET_ARCHS and len(cfg.anchor_sizes) != len(cfg.returned_layers) + 1:
        raise StageError(f"model.anchor_sizes has {len(cfg.anchor_sizes)} entries but the FPN of {arch} has "
                         f"{len(cfg.returned_layers) + 1} levels (model.returned_layers + pool): one size per level")
