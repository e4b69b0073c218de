"""Config of stage kind `vl` (:mod:`stages.vl`); the init/tokenizer_from/model rules shared with caption and vqa."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config.bert import BertSizes
from stages.config.train import TrainConfig
from stages.contract import StageConfig


class EncoderStageConfig(StageConfig):
    """What vl, caption and vqa share: the stages giving the data and the regions, where the encoder's
    weights and tokenizer come from (``init``), and its sizes when they come from nowhere."""

    data: str = Field("world", description="stage providing the data output")
    regions: str = Field("detector", description="stage providing the `regions` output (a RegionStore)")
    init: str | None = Field("vl", description="stage whose model + tokenizer initialise the encoder; null = random "
                                               "weights (the no-pretraining control)")
    tokenizer_from: str | None = Field(None, description="init: null only: stage whose `tokenizer` output to use")
    model: BertSizes = Field(default_factory=BertSizes, description="init: null only: the encoder sizes")

    @model_validator(mode="after")
    def _check_init(self):
        check_init_fields(self)
        return self

    def upstream_refs(self) -> dict[str, str]:
        return init_refs(self)

    def ref_outputs(self) -> dict[str, str]:
        return {"regions": "regions"}


class Config(EncoderStageConfig):
    kind: Literal["vl"] = "vl"
    data: str = Field("world", description="stage providing the `coco` output (captions_{train,val}*.json)")
    init: str | None = Field("bert", description="stage whose model + tokenizer initialise the encoder "
                                                 "(bert: BERT weights, new visual embedding; vl/caption: everything)")
    max_caption_len: int = Field(20, ge=1, description="caption WordPieces kept (the closing [SEP] is extra)")
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    max_pred: int = Field(3, ge=1, description="at most this many masked tokens per caption")
    s2s_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of examples under the seq2seq mask")
    bi_prob: float = Field(0.5, ge=0.0, le=1.0, description="share under the bidirectional mask (sums to 1 with s2s_prob)")
    itm: bool = Field(False, description="add image-text matching (binary head on [CLS], half the images swapped)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, batch_size=64, lr=2e-3, warmup_steps=50))
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check_masks(self):
        if abs(self.s2s_prob + self.bi_prob - 1.0) > 1e-6:
            raise ValueError(f"s2s_prob={self.s2s_prob} + bi_prob={self.bi_prob} must be 1 "
                             "(each example uses one of the two masks)")
        return self

    def declared_outputs(self) -> set[str]:
        return {"model", "tokenizer"}


def check_init_fields(cfg) -> None:
    """``init`` / ``tokenizer_from`` / ``model`` of the vl, caption and vqa configs: one source of truth."""
    if cfg.init is None and cfg.tokenizer_from is None:
        raise ValueError("init is null (random weights): set tokenizer_from to a stage with a `tokenizer` output "
                         "(e.g. bert) so the text is tokenised the same way")
    if cfg.init is not None and cfg.tokenizer_from is not None:
        raise ValueError(f"tokenizer_from={cfg.tokenizer_from!r} is only used when init is null; "
                         f"init={cfg.init!r} brings its own tokenizer")
    if cfg.init is not None and "model" in cfg.model_fields_set:
        raise ValueError(f"model.* sizes are only used when init is null; init={cfg.init!r} fixes the architecture")


def init_refs(cfg) -> dict[str, str]:
    refs = {"data": cfg.data, "regions": cfg.regions}
    if cfg.init is not None:
        refs["init"] = cfg.init
    if cfg.tokenizer_from is not None:
        refs["tokenizer_from"] = cfg.tokenizer_from
    return refs
