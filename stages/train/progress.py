"""The loss curve: progress lines and the train/* metrics, every ``runtime.log_every`` steps and at the last."""
from __future__ import annotations

import logging
import time

import torch

from stages.config.train import TrainConfig
from stages.contract import StageContext
from stages.train import distributed
from stages.train.step import TrainStep

log = logging.getLogger("baton")


class LogWindow:
    """Each line logs the loss averaged over the steps since the previous line (the window). The window's
    running sum (still on the device) and step count are part of every checkpoint, so that the first line
    after a resume averages the same steps, and logs the same value, as an unbroken run. Under DDP the lines
    and metrics are the global batch's (the mean over ranks), written by rank 0."""

    def __init__(self, ctx: StageContext, cfg: TrainConfig, train_step: TrainStep):
        self.ctx, self.cfg, self.train_step = ctx, cfg, train_step
        self.loss: float | torch.Tensor = 0.0
        self.n = 0
        self.average = float("nan")  # the last line's loss
        self.last_t, self.last_step = time.perf_counter(), 0

    def state(self) -> tuple[float, int]:
        return float(distributed.mean_over_ranks(self.loss)), self.n

    def load(self, window: tuple[float, int]) -> None:
        self.loss, self.n = window

    def start(self, step: int) -> None:
        """The clock for the rate of the first line starts now, at step ``step``."""
        self.last_t, self.last_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor) -> None:
        self.loss = self.loss + loss
        self.n += 1

    def maybe_log(self, done: int, logs: dict[str, torch.Tensor | float]) -> None:
        """After step ``done`` (1-based): a line if it is a log step (syncs: a non-finite loss stops here)."""
        if done % self.ctx.config.runtime.log_every and done != self.cfg.steps:
            return
        self.train_step.non_finite.check(done)
        now = time.perf_counter()
        rate = (done - self.last_step) / max(now - self.last_t, 1e-9)
        self.average = float(distributed.mean_over_ranks(self.loss)) / self.n
        logs = {k: distributed.mean_over_ranks(v) for k, v in logs.items()}
        if not distributed.is_main():
            self.loss, self.n, self.last_t, self.last_step = 0.0, 0, now, done
            return
        eta = (self.cfg.steps - done) / max(rate, 1e-9)
        lr0 = self.train_step.opt.param_groups[-1]["lr"]
        scaler = self.train_step.scaler
        log.info("[%s] step %d/%d loss %.4f lr %.2e %.2f it/s ETA %s", self.ctx.name, done, self.cfg.steps,
                 self.average, lr0, rate, time.strftime("%M:%S", time.gmtime(eta)))
        self.ctx.tracker.log_metrics({"train/loss": self.average, "train/lr": lr0, "train/steps_per_s": rate}
                                     | ({"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})
                                     | {f"train/{k}": float(v) for k, v in logs.items()}, step=done)
        self.loss, self.n, self.last_t, self.last_step = 0.0, 0, now, done
