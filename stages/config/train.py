"""Configs of the shared training loop (:mod:`stages.train`) and the transfer strategies (:mod:`stages.train.transfer`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.contract import Strict


class Transfer(Strict):
    strategy: Literal["finetune", "linear_probe", "partial", "lp_ft"] = "finetune"
    backbone_lr_mult: float = Field(1.0, ge=0.0, description="backbone LR = lr * backbone_lr_mult")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="block i LR *= layer_decay**(n_blocks-i)")
    freeze_blocks: int = Field(0, ge=0, description="partial: number of input-side blocks kept frozen")
    lp_steps: int = Field(0, ge=0, description="lp_ft: steps of linear probing before full fine-tuning")
    ft_lr_mult: float = Field(0.1, gt=0.0, description="lp_ft: LR multiplier for the fine-tune phase")

    @model_validator(mode="after")
    def _check(self):
        if self.strategy == "lp_ft" and self.lp_steps == 0:
            raise ValueError("transfer.lp_steps must be > 0 when transfer.strategy is 'lp_ft'")
        if self.strategy == "partial" and self.freeze_blocks == 0:
            raise ValueError("transfer.freeze_blocks must be > 0 when transfer.strategy is 'partial'")
        return self


class TrainConfig(Strict):
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="effective batch size (examples per optimizer step)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step; micro-batch = batch_size / grad_accum")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd momentum")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    transfer: Transfer = Field(default_factory=Transfer)
    eval_every: int | None = Field(None, ge=1, description="steps between validation passes during training "
                                                           "(val/* metrics at those steps); None = only at the end")
    keep_best: bool = Field(False, description="keep the checkpoint with the best validation metric (besides the "
                                               "newest keep_checkpoints) and make its weights the stage's output; "
                                               "needs eval_every")

    @model_validator(mode="after")
    def _check_best(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
        if self.keep_best and self.eval_every is None:
            raise ValueError("train.keep_best needs train.eval_every (steps between the validation passes that "
                             "pick the best checkpoint)")
        return self
