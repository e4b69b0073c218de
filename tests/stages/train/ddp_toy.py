"""A toy stage kind for the DDP failure tests (kind: tests.stages.train.ddp_toy): linear regression through
the shared loop, with switches that make rank 1 fail in the ways a real rank fails."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from stages.config.train import TrainConfig
from stages.contract import StageConfig, StageContext, StageResult
from stages.train.checkpoint import save_weights
from stages.train.loop import fit


class Config(StageConfig):
    kind: Literal["tests.stages.train.ddp_toy"] = "tests.stages.train.ddp_toy"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=12, batch_size=8, lr=0.05))
    oom_at: int | None = None  # rank 1 runs out of memory at this step
    die_at: int | None = None  # rank 1 SIGKILLs itself at this step, once (until ``marker`` exists)
    marker: str | None = None


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(ctx.seed)
    model = torch.nn.Linear(4, 1)
    rank1 = os.environ.get("RANK") == "1"

    def loss_fn(m, batch, step: int):
        if rank1 and step == cfg.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if rank1 and step == cfg.die_at and not Path(cfg.marker).exists():
            Path(cfg.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        xb, yb = batch
        return torch.nn.functional.mse_loss(m(xb), yb), {}

    res = fit(ctx, model, torch.utils.data.TensorDataset(x, y), None, loss_fn, cfg.train)
    save_weights(model.state_dict(), ctx.outputs / "model.safetensors")
    return ctx.result(outputs={"model": "outputs/model.safetensors"}, metrics={"train/loss": res.train_loss},
                      info={"resumed_from": res.resumed_from})
