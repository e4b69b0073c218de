"""The ``world`` stage's config (torch-free)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.contract import StageConfig, Strict, external_path


class ClassificationCfg(Strict):
    train: int = Field(2000, ge=1)
    val: int = Field(400, ge=1)
    image_size: int = Field(32, ge=16, le=1024)


class ScenesCfg(Strict):
    train: int = Field(600, ge=1)
    val: int = Field(150, ge=1)
    image_size: int = Field(64, ge=32, le=1024)
    min_objects: int = Field(1, ge=1, le=12)
    max_objects: int = Field(4, ge=1, le=12)

    @model_validator(mode="after")
    def _check(self) -> "ScenesCfg":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        return self


class CorpusCfg(Strict):
    documents: int = Field(2000, ge=1, description="train documents; val gets max(1, documents // 10)")


class PathsCfg(Strict):
    imagenet: str | None = external_path("dataset")
    vg: str | None = external_path("dataset")
    corpus: str | None = external_path("dataset")
    coco: str | None = external_path("dataset")
    vqa: str | None = external_path("dataset")
    regions: str | None = external_path("dataset", description="a region-feature store directory (stages.data.regions; e.g. imported "
                                                   "from bottom-up-attention TSV): vl/caption/vqa read it with "
                                                   "`regions: <this stage>`, no detector stage needed")
    karpathy: str | None = external_path("dataset", description="Karpathy split JSON (dataset_coco.json): converted to the "
                                                   "`coco` output (COCO captions JSON per split)")
    karpathy_images: str | None = external_path("dataset", description="folder holding <filepath>/<filename> of the Karpathy "
                                                          "images (default: the JSON's folder)")
    cc_train: str | None = external_path("dataset", description="Conceptual-Captions-style TSV (caption, image path/url), train; "
                                                   "with cc_val, converted to the `coco` output")
    cc_val: str | None = external_path("dataset", description="Conceptual-Captions-style TSV, val")


CAPTION_SOURCES = ("karpathy", "cc_train", "cc_val")  # converted into outputs/coco, not passed on


class Config(StageConfig):
    kind: Literal["world"] = "world"
    source: Literal["synthetic", "real"] = "synthetic"
    classification: ClassificationCfg = Field(default_factory=ClassificationCfg)
    scenes: ScenesCfg = Field(default_factory=ScenesCfg)
    corpus: CorpusCfg = Field(default_factory=CorpusCfg)
    captions_per_image: int = Field(5, ge=1, le=50)
    questions_per_image: int = Field(4, ge=1, le=100)
    paths: PathsCfg = Field(default_factory=PathsCfg)
    karpathy_restval: Literal["train", "drop"] = Field("train", description="paths.karpathy: the 'restval' images "
                                                       "join train (the usual practice) or are left out")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        given = [k for k, v in self.paths.model_dump().items() if v is not None]
        if self.source == "synthetic" and given:
            raise ValueError(f"paths.{given[0]} is set but source is 'synthetic' (paths are used with source: real)")
        if self.source == "real" and not given:
            raise ValueError("source 'real' needs at least one of paths." + "/".join(PathsCfg.model_fields))
        p = self.paths
        sources = [k for k, v in (("coco", p.coco), ("karpathy", p.karpathy),
                                  ("cc_train/cc_val", p.cc_train or p.cc_val)) if v]
        if len(sources) > 1:
            raise ValueError(f"paths.{sources[0]} and paths.{sources[1]} both provide the `coco` captions output: "
                             "set one")
        if bool(p.cc_train) != bool(p.cc_val):
            raise ValueError("paths.cc_train and paths.cc_val go together (train and val captions)")
        if p.karpathy_images and not p.karpathy:
            raise ValueError("paths.karpathy_images is set without paths.karpathy")
        return self

    def declared_outputs(self) -> set[str]:
        if self.source == "synthetic":
            return set(OUTPUTS)
        given = {k for k, v in self.paths.model_dump().items() if v is not None}
        coco = {"coco"} if given & {"coco", *CAPTION_SOURCES} else set()
        return (given - {*CAPTION_SOURCES, "karpathy_images"}) | coco


OUTPUTS = {"imagenet": "outputs/imagenet", "vg": "outputs/vg", "corpus": "outputs/corpus", "coco": "outputs/coco",
           "vqa": "outputs/vqa"}
