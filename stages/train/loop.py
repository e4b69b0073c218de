"""The shared training loop: step-based, resumable, tracked.

A stage reads top to bottom: build data and model, then ``fit(...)``, then evaluate and save. ``fit`` reads
as one step: ``train_step(step)`` (step.py: optimizer + LR schedule from the transfer plan, autocast, the
fp16 scaler, gradient accumulation, the OOM retry, non-finite bookkeeping), then the components that each
decide whether this step is theirs: the log window (progress.py), the validator with keep-best
(validate.py) and the checkpointer (below: full-state checkpoints every ``runtime.checkpoint_every`` steps,
and resume from the newest valid one: weights, :class:`TrainState`, the data position, so an epoch is never
replayed). A non-finite loss stops the stage at the first of them that looks, before any checkpoint after it.

Under DDP (``runtime.nproc_per_node`` > 1, stages.train.distributed) every rank runs ``fit``: each trains on
its slice of every global batch, rank 0 alone validates (the others wait for its values), writes the
checkpoints (with every rank's RNG states; all ranks pass a barrier after each) and logs; when the last step
is checkpointed the other ranks leave (:class:`~stages.train.distributed.RankDone`) and rank 0 returns
alone, out of the process group, to the stage's final evaluation and outputs."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from stages.config.train import TrainConfig
from stages.contract import StageContext, StageError, StageInterrupted
from stages.train import distributed
from stages.train.checkpoint import CheckpointManager
from stages.train.compile import train_module
from stages.train.device import cudnn_autotune
from stages.train.progress import LogWindow
from stages.train.state import TrainState, rng_state, set_rng_state
from stages.train.step import LossFn, TrainStep, build_optimizer
from stages.train.validate import Evaluate, Validator

log = logging.getLogger("baton")


@dataclass
class FitResult:
    step: int  # the step whose weights ``model`` holds: the last, or the best one under keep_best
    resumed_from: int
    train_loss: float
    seconds: float
    steps_per_s: float
    best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the kept best checkpoint (keep_best)


class Checkpointer:
    """Writes the full training state every ``runtime.checkpoint_every`` steps, at the last step and at each
    new best (keep_best), and resumes from the newest intact checkpoint: the one owner of what goes into a
    checkpoint and comes back out of it."""

    def __init__(self, ctx: StageContext, model: torch.nn.Module, cfg: TrainConfig, train_step: TrainStep,
                 window: LogWindow, validator: Validator):
        self.ctx, self.model, self.cfg = ctx, model, cfg
        self.train_step, self.window, self.validator = train_step, window, validator

    def resume(self) -> int:
        """Load the newest intact checkpoint into the model and the components; the step to start at (0: none)."""
        ckpt = self.ctx.checkpoints.latest()
        if ckpt is None:
            return 0
        weights, raw = ckpt.load()
        state = TrainState.from_dict(raw, self.cfg)
        if state.world_size != distributed.world():
            raise StageError(f"stage {self.ctx.name!r}: checkpoint {ckpt.path} was written by {state.world_size} "
                             f"rank(s) and runtime.nproc_per_node asks for {distributed.world()}: resume it with "
                             f"runtime.nproc_per_node: {state.world_size} (the per-rank RNG states are saved for "
                             "that many ranks)")
        state.say_disagreements(self.ctx.name, ckpt.path, self.cfg, self.ctx.config.runtime.precision)
        self.model.load_state_dict(weights)
        self.train_step.load(state, ckpt.path)
        set_rng_state(state.rank_rng[distributed.rank()] if state.rank_rng else state.rng)
        self.validator.best = state.best
        self.window.load(state.log_window)
        log.info("[%s] resumed from checkpoint at step %d/%d (%s)", self.ctx.name, state.step, self.cfg.steps,
                 ckpt.path)
        return state.step

    def maybe_save(self, done: int, force: bool = False) -> None:
        """After step ``done`` (1-based): a checkpoint if it is a checkpoint step or ``force`` (a new best)."""
        if done % self.ctx.config.runtime.checkpoint_every and done != self.cfg.steps and not force:
            return
        self.train_step.non_finite.check(done)
        # metrics first: a kill between the two then leaves the history ahead of the newest checkpoint
        # (the resumed tracker drops the re-computed overlap), never a gap behind it
        self.ctx.tracker.flush()
        rngs = distributed.all_gather_objects(rng_state())  # every rank's streams; only rank 0 writes
        window = self.window.state()
        if distributed.is_main():
            state = TrainState(step=done, rng=rngs[0], log_window=window, best=self.validator.best,
                               world_size=len(rngs), rank_rng=rngs if len(rngs) > 1 else None,
                               **self.train_step.state())
            self.ctx.checkpoints.save(done, self.model.state_dict(), state.to_dict())
        distributed.barrier()  # no rank runs ahead of a checkpoint


def _check_options(ctx: StageContext, cfg: TrainConfig, evaluate: Evaluate | None,
                   best_metric: tuple[str, str] | None) -> None:
    if cfg.eval_every is not None and evaluate is None:
        raise StageError(f"stage {ctx.name!r}: train.eval_every is set but this stage kind has no validation "
                         "pass during training")
    if cfg.keep_best and best_metric is None:
        raise StageError(f"stage {ctx.name!r}: train.keep_best is set but this stage kind names no metric to "
                         "select the best checkpoint by")


def _leave_ranks(ctx: StageContext, model: torch.nn.Module) -> None:
    """DDP: after the last checkpoint the ranks compare their weights (a digest each: ranks that drifted
    apart fail the stage), then the ranks other than 0 leave (RankDone); rank 0 goes on alone, out of the
    process group, so no rank waits in a collective during the stage's final evaluation."""
    if not distributed.active():
        return
    digests = distributed.all_gather_objects(distributed.weights_digest(model))
    distributed.last_digests[:] = digests
    if len(set(digests)) > 1:
        raise StageError(f"stage {ctx.name!r}: the ranks hold different weights at the end of training "
                         f"(sha256 per rank: {[d[:12] for d in digests]})")
    r = distributed.rank()
    distributed.leave()
    if r:
        log.info("[%s] rank %d: training done, leaving", ctx.name, r)
        raise distributed.RankDone()


def fit(ctx: StageContext, model: torch.nn.Module, dataset, collate: Callable | None, loss_fn: LossFn,
        cfg: TrainConfig, blocks: list[list[torch.nn.Parameter]] | None = None,
        head: list[torch.nn.Parameter] | None = None, evaluate: Evaluate | None = None,
        best_metric: tuple[str, Literal["max", "min"]] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps on ``dataset``.

    ``loss_fn(model, batch, step) -> (loss, logs)`` computes one micro-batch's loss. ``blocks`` and
    ``head`` (see stages.train.transfer) define the transfer strategy; without them every parameter is
    one 'head' group. ``evaluate(model) -> {metric: value}`` is the stage's validation pass, run every
    ``cfg.eval_every`` steps; with ``cfg.keep_best`` the checkpoint with the best ``best_metric``
    (name, "max" | "min") is kept and its weights are in ``model`` on return. Otherwise returns when the
    last step is done and checkpointed, with the trained weights in ``model``."""
    _check_options(ctx, cfg, evaluate, best_metric)
    rt = ctx.config.runtime
    if ctx.checkpoints is None:
        ctx.checkpoints = CheckpointManager(ctx.stage_dir / "checkpoints", keep=rt.keep_checkpoints)
    model.to(ctx.device)
    cudnn_autotune(ctx)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    opt, sched, plan = build_optimizer(ctx, model, cfg, blocks, head)
    train_step = TrainStep(ctx, train_module(model, rt), dataset, collate, loss_fn, cfg, opt, sched, plan)
    ctx.tracker.log_params({f"train.{k}": v for k, v in cfg.model_dump().items() if k != "transfer"} | plan.describe())
    validator = Validator(ctx, model, cfg, evaluate, best_metric, train_step.non_finite)
    window = LogWindow(ctx, cfg, train_step)
    checkpointer = Checkpointer(ctx, model, cfg, train_step, window, validator)

    distributed.seed_rank(ctx.seed)  # ranks > 0: their own dropout streams (a resume restores them)
    start = checkpointer.resume()
    if start >= cfg.steps:  # done before (e.g. killed during its final evaluation)
        _leave_ranks(ctx, model)
        validator.restore_best()
        kept = validator.kept
        return FitResult(kept["step"] if kept else start, start, float("nan"), 0.0, 0.0, kept)
    train_step.start(start)
    model.train()
    t0 = time.perf_counter()
    window.start(start)
    done = start
    try:
        for step in range(start, cfg.steps):
            out = train_step(step)
            window.add(out.loss)
            done = step + 1
            window.maybe_log(done, out.logs)
            new_best = validator.maybe_validate(done)
            checkpointer.maybe_save(done, force=new_best)
    except KeyboardInterrupt:  # Ctrl-C: say where we were and what a rerun resumes from
        saved = ctx.checkpoints.steps()
        raise StageInterrupted(ctx.name, done, cfg.steps, saved[-1] if saved else None) from None
    finally:
        train_step.close()  # the read-ahead thread stops (a failed step, a non-finite loss, the end)
    plan.apply(cfg.steps)
    secs = time.perf_counter() - t0
    _leave_ranks(ctx, model)
    validator.restore_best()
    kept = validator.kept
    # final val metrics logged at res.step then sit on the selected checkpoint's step, not on the last
    # pass's (which scored other weights)
    return FitResult(kept["step"] if kept else cfg.steps, start, window.average, secs,
                     (cfg.steps - start) / max(secs, 1e-9), kept)
