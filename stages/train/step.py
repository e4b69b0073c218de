"""One optimizer step and what it owns: the optimizer and LR schedule from the transfer plan, the fp16 loss
scaler, gradient accumulation over the resumable batch stream, the CUDA out-of-memory retry, the
bookkeeping of the first non-finite loss, and under DDP (stages.train.distributed) the
DistributedDataParallel wrapper: re-made whenever the set of trainable parameters changes (a transfer plan's
phase switch, or a resume into either phase), since DDP registers only the parameters that need gradients
when it wraps the model."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.config.train import TrainConfig
from stages.contract import StageContext, StageError
from stages.train import distributed
from stages.train.device import autocast, grad_scaler, to_device
from stages.train.prefetch import read_ahead
from stages.train.sampler import ResumableBatchSampler
from stages.train.state import TrainState
from stages.train.transfer import TransferPlan, build_plan

log = logging.getLogger("baton")

LossFn = Callable[[torch.nn.Module, Any, int], "tuple[torch.Tensor, dict[str, torch.Tensor | float]]"]


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) if cfg.schedule == "cosine" else max(0.0, 1 - t)
    return f


def build_optimizer(ctx: StageContext, model: torch.nn.Module, cfg: TrainConfig,
                    blocks: list[list[torch.nn.Parameter]] | None, head: list[torch.nn.Parameter] | None):
    """The transfer plan (without ``blocks`` every parameter is one 'head' group), one optimizer param group
    per plan group, and the LR schedule times the plan's per-group factor. Returns (optimizer, scheduler, plan)."""
    if blocks is None:
        blocks, head = [], [p for p in model.parameters()]
    plan: TransferPlan = build_plan(blocks, head or [], cfg.transfer, cfg.weight_decay, model)
    groups = [{k: v for k, v in g.items()} | {"lr": cfg.lr * g["lr_mult"]} for g in plan.groups]
    if cfg.optimizer == "adamw":
        fused = ctx.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched_fn = _schedule(cfg)
    lambdas = [(lambda s, g=g: sched_fn(s) * plan.lr_factor(g, s)) for g in plan.groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas), plan


class NonFinite:
    """The first step whose loss was not finite (+1; 0: none) and that loss, kept on the device and looked at
    only where the loop syncs anyway (log lines, validation, checkpoints): never a checkpoint after it."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.first_bad = torch.zeros((), dtype=torch.long, device=ctx.device)
        self.bad_loss = torch.zeros((), device=ctx.device)

    def update(self, step: int, loss: torch.Tensor, finite: torch.Tensor) -> None:
        newly_bad = (self.first_bad == 0) & ~finite
        self.first_bad = torch.where(newly_bad, step + 1, self.first_bad)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)

    def check(self, at: int) -> None:
        """Stop the stage if a loss up to step ``at`` was not finite, naming that step and the last good checkpoint."""
        b = int(self.first_bad)
        if distributed.active():  # the first bad step on any rank, so that every rank stops at the same point
            bad = [x for x in distributed.all_gather_objects(b) if x]
            b = min(bad) if bad else 0
        if b:
            good = [s for s in self.ctx.checkpoints.steps() if s < b]
            raise StageError(f"stage {self.ctx.name!r}: non-finite loss ({float(self.bad_loss)}) at step {b - 1} "
                             f"(seen at step {at}); stopped, last good checkpoint: step {good[-1] if good else 'none'}")


class LossModule(torch.nn.Module):
    """The model and its loss as one module, the one DDP wraps: every use of the parameters in a micro-batch
    (a stage's loss may call heads and the model more than once) happens inside one DDP forward."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, step: int):
        return self.loss_fn(self.model, batch, step)


def _accumulate(ctx: StageContext, model, batches: Iterator, loss_fn: LossFn, step: int, accum: int,
                scaler: torch.amp.GradScaler, batch_size: int, ddp=None):
    """Forward/backward ``accum`` micro-batches (under DDP: this rank's slices of the global ones, the
    gradients all-reduced after the last only). Returns the step's mean loss, the last micro-batch's logs
    and whether every loss was finite, all as tensors on the device: nothing here waits for the GPU
    (the loop looks at them at its log / checkpoint / validation points)."""
    rt = ctx.config.runtime
    step_loss, logs, finite = None, {}, None
    micro, r, n = batch_size // accum, distributed.rank(), distributed.world()
    for i in range(accum):
        batch = to_device(next(batches), ctx.device, rt.channels_last)
        distributed.set_positions(i * micro + r * (micro // n), micro // n)
        with ddp.no_sync() if ddp is not None and i < accum - 1 else nullcontext():
            with autocast(ctx):
                loss, logs = ddp(batch, step) if ddp is not None else loss_fn(model, batch, step)
            scaler.scale(loss / accum).backward()  # a disabled scaler (fp32, bf16) returns the loss as is
        d = loss.detach().float()
        step_loss = d / accum if step_loss is None else step_loss + d / accum
        finite = torch.isfinite(d) if finite is None else finite & torch.isfinite(d)
    return step_loss, logs, finite


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's mean loss, a scalar still on the device
    logs: dict[str, torch.Tensor | float]  # the last micro-batch's logs from loss_fn


class TrainStep:
    """``train_step(step)`` runs optimizer step ``step`` on its batch, reading the data stream from
    :meth:`start`'s step on. A CUDA out-of-memory error retries the step with half the micro-batch and twice
    the accumulation: the same examples, the same effective batch."""

    def __init__(self, ctx: StageContext, model: torch.nn.Module, dataset, collate: Callable | None,
                 loss_fn: LossFn, cfg: TrainConfig, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, plan: TransferPlan):
        self.ctx, self.model, self.dataset, self.collate, self.loss_fn, self.cfg = ctx, model, dataset, collate, loss_fn, cfg
        self.opt, self.sched, self.plan = opt, sched, plan
        self.scaler = grad_scaler(ctx)
        self.accum = cfg.grad_accum
        self.non_finite = NonFinite(ctx)
        self.batches: Iterator | None = None
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self._ddp_trainable: tuple[bool, ...] | None = None

    def start(self, step: int) -> None:
        """Read the batches from step ``step`` on (the data position of a resumed run)."""
        rt = self.ctx.config.runtime
        self.close()
        sampler = ResumableBatchSampler(len(self.dataset), self.cfg.batch_size, self.ctx.seed, step, self.cfg.steps,
                                        self.accum, distributed.rank(), distributed.world())
        self.batches = read_ahead(iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=rt.num_workers,
            pin_memory=self.ctx.device.type == "cuda", persistent_workers=False,
            # own generator: creating the iterator must not draw from the global RNG, or a resumed
            # run's dropout stream would differ from an unbroken one
            generator=torch.Generator().manual_seed(self.ctx.seed))), self.dataset, rt.num_workers)

    def close(self) -> None:
        """Stop reading ahead (a prefetch thread, see stages.train.prefetch)."""
        if self.batches is not None and hasattr(self.batches, "close"):
            self.batches.close()
        self.batches = None

    def __call__(self, step: int) -> StepOutput:
        self.plan.apply(step)
        loss, logs, finite = self._forward_backward(step)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op without fp16)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None], self.cfg.grad_clip)
        self.scaler.step(self.opt)  # = opt.step(), skipped under fp16 if the gradients overflowed
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.non_finite.update(step, loss, finite)
        return StepOutput(loss, logs)

    def _wrapped(self, step: int):
        """The DDP wrapper for the parameters trainable now (None on one rank): made again when that set
        changed since the last step (all ranks switch at the same step: the plan is a function of it)."""
        if not distributed.active():
            return None
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._ddp_trainable:
            dev = self.ctx.device
            # find_unused_parameters: vqa/caption leave the MLM head out of the graph (static_graph would
            # avoid the per-step graph walk but does not support no_sync: an internal assert in torch 2.14)
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                LossModule(self.model, self.loss_fn), device_ids=[dev] if dev.type == "cuda" else None,
                find_unused_parameters=True)
            if self._ddp_trainable is not None:
                log.info("[%s] step %d: trainable parameters changed (%d -> %d): DDP wrapper re-made", self.ctx.name,
                         step, sum(self._ddp_trainable), sum(trainable))
            self._ddp_trainable = trainable
        return self.ddp

    def _forward_backward(self, step: int):
        ddp = self._wrapped(step)
        while True:
            try:
                return _accumulate(self.ctx, self.model, self.batches, self.loss_fn, step, self.accum, self.scaler,
                                   self.cfg.batch_size, ddp)
            except torch.OutOfMemoryError:
                if ddp is not None:
                    raise StageError(
                        f"stage {self.ctx.name!r}: out of memory at step {step} with a micro-batch of "
                        f"{self.cfg.batch_size // self.accum // distributed.world()} per rank "
                        f"(train.batch_size {self.cfg.batch_size} / train.grad_accum {self.accum} / "
                        f"{distributed.world()} ranks): runtime.oom_retry does not retry under DDP "
                        "(runtime.nproc_per_node > 1); raise train.grad_accum or lower train.batch_size") from None
                if not self.ctx.config.runtime.oom_retry or self.cfg.batch_size % (self.accum * 2):
                    raise
                self._halve_micro_batch(step)

    def _halve_micro_batch(self, step: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        self.accum *= 2
        log.warning("[%s] out of memory at step %d: retrying with micro-batch %d x %d accumulation",
                    self.ctx.name, step, self.cfg.batch_size // self.accum, self.accum)
        self.ctx.tracker.set_tags({"train.oom_retry": f"step {step}: grad_accum {self.accum}"})
        self.start(step)

    def state(self) -> dict[str, Any]:
        """Its part of a :class:`TrainState`."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "grad_accum": self.accum,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load(self, state: TrainState, source: Path) -> None:
        """Continue from ``state`` (read from the checkpoint at ``source``), its grad_accum included."""
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        if self.scaler.is_enabled():
            if state.scaler is None:
                raise StageError(f"stage {self.ctx.name!r}: checkpoint {source} has no fp16 loss-scaler state "
                                 "(it was written with runtime.precision other than fp16)")
            self.scaler.load_state_dict(state.scaler)
        self.accum = state.grad_accum
