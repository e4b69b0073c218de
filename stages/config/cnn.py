"""Config of stage kind `cnn` (:mod:`stages.cnn`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from stages.config.train import TrainConfig
from stages.contract import StageConfig, Strict, external_path

TORCHVISION_ARCHS = ("alexnet", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")

MIN_IMAGE_SIZE = {"alexnet": 63, "vgg16": 32}  # smallest input whose feature map survives the last max-pool


class ModelConfig(Strict):
    arch: Literal["narrow_resnet", "alexnet", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101",
                  "resnext50_32x4d"] = "narrow_resnet"
    widths: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=4, max_length=4,
                                      description="narrow_resnet channels per stage (4 stages)")
    blocks: list[PositiveInt] = Field(default_factory=lambda: [1, 1, 1, 1], min_length=4, max_length=4,
                                      description="narrow_resnet BasicBlocks per stage (4 stages)")
    stem: Literal["imagenet", "small"] = Field("small", description="small = 3x3 stride-1 stem, no max-pool (tiny images)")
    init: str | None = external_path("weights", "torchvision", description="local state-dict file (.safetensors/.pt) or torchvision weights name")
    sync_batchnorm: bool = Field(False, description="cnn stage under DDP (runtime.nproc_per_node > 1): BatchNorm "
                                                    "statistics over every rank's examples (torch.nn.SyncBatchNorm; "
                                                    "CUDA only), so N ranks train like one; no effect on one rank")


class Config(StageConfig):
    kind: Literal["cnn"] = "cnn"
    data: str = Field("world", description="stage providing the ImageNet-layout folder (output `data_output`)")
    data_output: str = Field("imagenet", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="which output of `data` is the ImageNet root (e.g. a `targets` stage's "
                                         "similar_small)")
    init_from: str | None = Field(None, description="stage whose `model` output (a cnn) initialises this one: its "
                                                    "architecture and weights, the class head re-initialised; "
                                                    "null = model.init or random")
    model: ModelConfig = Field(default_factory=ModelConfig)
    image_size: int = Field(32, ge=8, le=4096, description="side of the square training image (alexnet needs "
                                                           ">= 63, vgg16 >= 32)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=2e-3))
    eval_batch_size: int = Field(256, ge=1)
    skip_bad_images: bool = Field(False, description="leave unreadable images out (counted in metric "
                                                     "data/skipped_bad_images) instead of stopping on the first")

    @model_validator(mode="after")
    def _check(self):
        if self.model.sync_batchnorm and self.runtime.ranks > 1 and self.runtime.device == "cpu":
            raise ValueError("model.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU path) but "
                             "runtime.device is 'cpu' with runtime.nproc_per_node > 1")
        need = MIN_IMAGE_SIZE.get(self.model.arch, 8)
        if self.image_size < need:
            raise ValueError(f"image_size={self.image_size} is too small for model.arch={self.model.arch!r} "
                             f"(its pooling needs >= {need})")
        if self.init_from is not None and self.model.init is not None:
            raise ValueError(f"init_from={self.init_from!r} and model.init={self.model.init!r} both initialise "
                             "the model: set one")
        return self

    def upstream_refs(self) -> dict[str, str]:
        return {"data": self.data} | ({"init_from": self.init_from} if self.init_from else {})

    def ref_outputs(self) -> dict[str, str]:
        # the default `imagenet` is checked when the stage starts, as before data_output existed (recipes whose
        # real-data world lacks it still plan and fingerprint)
        data = {"data": self.data_output} if self.data_output != "imagenet" else {}
        return data | ({"init_from": "model"} if self.init_from else {})

    def declared_outputs(self) -> set[str]:
        return {"model", "classes"}
