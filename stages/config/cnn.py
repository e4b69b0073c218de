"""Config of stage kind `cnn` (:mod:`stages.cnn`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.train import TrainConfig
from stages.contract import StageConfig, Strict, external_path

TORCHVISION_ARCHS = ("alexnet", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")


class ModelConfig(Strict):
    arch: Literal["narrow_resnet", "alexnet", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101",
                  "resnext50_32x4d"] = "narrow_resnet"
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], description="narrow_resnet channels per stage")
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1, 1], description="narrow_resnet BasicBlocks per stage")
    stem: Literal["imagenet", "small"] = Field("small", description="small = 3x3 stride-1 stem, no max-pool (tiny images)")
    init: str | None = external_path("weights", "torchvision", description="local state-dict file (.safetensors/.pt) or torchvision weights name")


class Config(StageConfig):
    kind: Literal["cnn"] = "cnn"
    data: str = Field("world", description="stage providing the `imagenet` output")
    model: ModelConfig = Field(default_factory=ModelConfig)
    image_size: int = 32
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=2e-3))
    eval_batch_size: int = 256
    skip_bad_images: bool = Field(False, description="leave unreadable images out (counted in metric "
                                                     "data/skipped_bad_images) instead of stopping on the first")

    def upstream_refs(self) -> dict[str, str]:
        return {"data": self.data}
