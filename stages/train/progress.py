"""The loss curve: progress lines/events (stages.progress) and the train/* metrics, every ``runtime.log_every``
steps and at the last; between them, under the flow, a time-gated event keeps the bar live."""
from __future__ import annotations

import logging
import math
import time

import torch

from stages.config.train import TrainConfig
from stages.contract import StageContext
from stages.progress import RateMeter, event_interval, events_on, fmt_duration, report
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
        self.meter, self.last_event = RateMeter(), 0.0

    def state(self) -> tuple[float, int]:
        return float(distributed.mean_over_ranks(self.loss)), self.n

    def load(self, window: tuple[float, int]) -> None:
        self.loss, self.n = window

    def start(self, step: int) -> None:
        """The clock for the rate of the first line starts now, at step ``step``."""
        self.last_t, self.last_step = time.perf_counter(), step
        self.meter.start(step)

    def add(self, loss: torch.Tensor) -> None:
        self.loss = self.loss + loss
        self.n += 1

    def maybe_log(self, done: int, logs: dict[str, torch.Tensor | float]) -> None:
        """After step ``done`` (1-based): a line if it is a log step (syncs: a non-finite loss stops here); between
        them, under the flow, an event at most every ``event_interval()`` s (no sync: the last line's loss)."""
        if done % self.ctx.config.runtime.log_every and done != self.cfg.steps:
            if events_on() and distributed.is_main() and time.perf_counter() - self.last_event >= event_interval():
                self.last_event = time.perf_counter()
                self.meter.update(done)
                report(self.ctx.name, "train", done, self.cfg.steps, "steps", self.meter,
                       **({"loss": self.average} if math.isfinite(self.average) else {}))
            return
        self.train_step.non_finite.check(done)
        now = time.perf_counter()
        rate = (done - self.last_step) / max(now - self.last_t, 1e-9)
        self.average = float(distributed.mean_over_ranks(self.loss)) / self.n
        logs = {k: distributed.mean_over_ranks(v) for k, v in logs.items()}
        if not distributed.is_main():
            self.loss, self.n, self.last_t, self.last_step = 0.0, 0, now, done
            return
        smoothed = self.meter.update(done)
        eta = self.meter.eta(self.cfg.steps - done)
        lr0 = self.train_step.opt.param_groups[-1]["lr"]
        scaler = self.train_step.scaler
        self.last_event = now
        report(self.ctx.name, "train", done, self.cfg.steps, "steps", self.meter,
               f"[{self.ctx.name}] step {done}/{self.cfg.steps} loss {self.average:.4f} lr {lr0:.2e} "
               f"{smoothed:.2f} it/s ETA {fmt_duration(eta)}", loss=self.average)
        self.ctx.tracker.log_metrics({"train/loss": self.average, "train/lr": lr0, "train/steps_per_s": rate}
                                     | ({"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})
                                     | {f"train/{k}": float(v) for k, v in logs.items()}, step=done)
        self.loss, self.n, self.last_t, self.last_step = 0.0, 0, now, done
