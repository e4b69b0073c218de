"""Config of stage kind `caption` (:mod:`stages.caption`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.base import StageConfig, Strict
from stages.config.bert import BertSizes
from stages.config.train import TrainConfig
from stages.config.vl import check_init_fields, init_refs


class DecodeConfig(Strict):
    beam_size: int = Field(1, ge=1, description="1 = greedy")
    max_len: int = Field(20, ge=1, description="most WordPieces generated per caption")
    length_penalty: float = Field(1.0, ge=0.0, description="beam: score = log p / length**length_penalty")
    batch_size: int = Field(128, ge=1, description="images decoded together")


class Config(StageConfig):
    kind: Literal["caption"] = "caption"
    data: str = Field("world", description="stage providing the `coco` output")
    regions: str = Field("detector", description="stage providing the `regions` output")
    init: str | None = Field("vl", description="stage whose model + tokenizer initialise the model; null = random "
                                               "weights (the no-pretraining control)")
    tokenizer_from: str | None = Field(None, description="init: null only: stage whose `tokenizer` output to use")
    model: BertSizes = Field(default_factory=BertSizes, description="init: null only: the encoder sizes")
    max_caption_len: int = Field(20, ge=1, description="caption WordPieces kept in training (+ [SEP])")
    mask_prob: float = Field(0.3, gt=0.0, lt=1.0, description="share of caption tokens masked per example "
                                                              "(more than pretraining's 0.15: more generation signal per step)")
    max_pred: int = Field(6, ge=1, description="at most this many masked tokens per caption")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=800, batch_size=64, lr=3e-3, warmup_steps=30))
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    eval_batch_size: int = Field(256, ge=1)
    num_samples: int = Field(10, ge=0, description="val images written to outputs/samples.json")
    sample_images: int = Field(8, ge=0, description="val images drawn with their generated and first reference "
                                                    "caption to outputs/samples/*.png (images not on disk are "
                                                    "skipped and counted)")

    @model_validator(mode="after")
    def _check(self):
        check_init_fields(self)
        return self

    def upstream_refs(self) -> dict[str, str]:
        return init_refs(self)

    def ref_outputs(self) -> dict[str, str]:
        return {"regions": "regions"}
