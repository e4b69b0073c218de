"""Config of stage kind `vqa` (:mod:`stages.vqa`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.train import TrainConfig
from stages.config.vl import EncoderStageConfig


class Config(EncoderStageConfig):
    kind: Literal["vqa"] = "vqa"
    data: str = Field("world", description="stage providing the `vqa` output")
    max_question_len: int = Field(16, ge=1, description="question WordPieces kept (+ [SEP])")
    num_answers: int = Field(0, ge=0, description="answer vocabulary: the K most frequent training answers; 0 = all")
    head_hidden: int = Field(0, ge=0, description="classifier MLP width; 0 = 2 x hidden_size")
    counters: int = Field(8, ge=0, description="soft counters beside [CLS] in the answer head (sums over regions of "
                                               "a learned gate: what 'how many' needs); 0 = the [CLS] MLP alone")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_steps=30))
    eval_batch_size: int = Field(256, ge=1)

    def declared_outputs(self) -> set[str]:
        return {"model", "tokenizer", "results"}
