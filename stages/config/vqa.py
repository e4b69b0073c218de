"""Config of stage kind `vqa` (:mod:`stages.vqa`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.base import StageConfig
from stages.config.bert import BertSizes
from stages.config.train import TrainConfig
from stages.config.vl import check_init_fields, init_refs


class Config(StageConfig):
    kind: Literal["vqa"] = "vqa"
    data: str = Field("world", description="stage providing the `vqa` output")
    regions: str = Field("detector", description="stage providing the `regions` output")
    init: str | None = Field("vl", description="stage whose model + tokenizer initialise the encoder; null = random "
                                               "weights (the no-pretraining control)")
    tokenizer_from: str | None = Field(None, description="init: null only: stage whose `tokenizer` output to use")
    model: BertSizes = Field(default_factory=BertSizes, description="init: null only: the encoder sizes")
    max_question_len: int = Field(16, ge=1, description="question WordPieces kept (+ [SEP])")
    num_answers: int = Field(0, ge=0, description="answer vocabulary: the K most frequent training answers; 0 = all")
    head_hidden: int = Field(0, ge=0, description="classifier MLP width; 0 = 2 x hidden_size")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_steps=30))
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check(self):
        check_init_fields(self)
        return self

    def upstream_refs(self) -> dict[str, str]:
        return init_refs(self)

    def ref_outputs(self) -> dict[str, str]:
        return {"regions": "regions"}
