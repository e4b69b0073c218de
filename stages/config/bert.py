"""Config of stage kind `bert` (:mod:`stages.bert`); :class:`BertSizes` is shared with vl, caption and vqa."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config.train import TrainConfig
from stages.contract import StageConfig, Strict, external_path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class BertSizes(Strict):
    """The numbers of one BERT; :func:`build_bert_config` turns them into a ``BertConfig``."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_position: int = Field(64, ge=8, description="position embeddings = longest input sequence")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="hidden and attention dropout (BERT: 0.1; the tiny "
                                                            "synthetic recipe learns faster without)")

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        return self


class ModelConfig(BertSizes):
    pretrained: str | None = external_path("weights", "hf_hub", description="local save_pretrained dir or hub name to start from "
                                                     "(its own sizes are used; leave the size fields unset)")


class TokenizerConfig(Strict):
    vocab_size: int = Field(200, ge=len(SPECIAL_TOKENS) + 1, description="WordPiece vocabulary to train (upper bound)")
    path: str | None = external_path("weights", description="local HF tokenizer dir to load instead of training one")
    lowercase: bool = True
    initial_alphabet: str = Field("abcdefghijklmnopqrstuvwxyz?", description="characters kept even when the corpus "
                                  "lacks them, so e.g. VQA question words are spelled out, not [UNK]")


class Config(StageConfig):
    kind: Literal["bert"] = "bert"
    data: str = Field("world", description="stage providing the `corpus` output")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    seq_len: int = Field(32, ge=4, description="packed sequence length incl. [CLS] and [SEP]")
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    whole_word: bool = Field(False, description="mask all WordPieces of a word together")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, batch_size=32, lr=2e-3, warmup_steps=50))
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check(self):
        sizes = self.model.model_fields_set - {"pretrained"}
        if self.model.pretrained and sizes:
            raise ValueError(f"model.pretrained={self.model.pretrained!r} fixes the model sizes; "
                             f"remove model.{', model.'.join(sorted(sizes))}")
        if not self.model.pretrained and self.seq_len > self.model.max_position:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_position={self.model.max_position}")
        return self

    def upstream_refs(self) -> dict[str, str]:
        return {"data": self.data}

    def declared_outputs(self) -> set[str]:
        return {"model", "tokenizer"}
