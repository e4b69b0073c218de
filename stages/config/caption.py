"""Config of stage kind `caption` (:mod:`stages.caption`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.train import TrainConfig
from stages.config.vl import EncoderStageConfig
from stages.contract import Strict


class DecodeConfig(Strict):
    beam_size: int = Field(1, ge=1, description="1 = greedy")
    max_len: int = Field(20, ge=1, description="most WordPieces generated per caption")
    length_penalty: float = Field(1.0, ge=0.0, description="beam: score = log p / length**length_penalty")
    batch_size: int = Field(128, ge=1, description="images decoded together")


class Config(EncoderStageConfig):
    kind: Literal["caption"] = "caption"
    data: str = Field("world", description="stage providing the `coco` output")
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

    def declared_outputs(self) -> set[str]:
        return {"model", "tokenizer", "captions", "samples", "sample_images"}
