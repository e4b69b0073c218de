"""The shared training loop: step-based, resumable, tracked.

A stage reads top to bottom: build data and model, then ``fit(...)``, then evaluate and save.
``fit`` owns the mechanics every stage needs: optimizer + LR schedule from the transfer plan,
autocast (bf16 on CUDA), channels_last, gradient accumulation, periodic full-state checkpoints,
resume from the newest valid checkpoint (model, optimizer, scheduler, RNG states, step and the
data position, so an epoch is never replayed), a stop on a non-finite loss, metrics through the
tracker, and progress lines with rate and ETA."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch

from stages.config.train import TrainConfig  # noqa: F401 - its config, re-exported
from stages.contract import StageContext, StageError
from stages.train.checkpoint import CheckpointManager, load_weights, rng_state, set_rng_state
from stages.train.device import autocast, grad_scaler, to_device
from stages.train.sampler import ResumableBatchSampler
from stages.train.transfer import TransferPlan, build_plan

log = logging.getLogger("baton")


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) if cfg.schedule == "cosine" else max(0.0, 1 - t)
    return f


def _accumulate(ctx: StageContext, model, batches: Iterator, loss_fn, step: int, accum: int,
                scaler: torch.amp.GradScaler):
    """Forward/backward ``accum`` micro-batches. Returns the step's mean loss, the last micro-batch's logs
    and whether every loss was finite, all as tensors on the device: nothing here waits for the GPU
    (``fit`` looks at them at its log / checkpoint / validation points)."""
    rt = ctx.config.runtime
    step_loss, logs, finite = None, {}, None
    for _ in range(accum):
        batch = to_device(next(batches), ctx.device, rt.channels_last)
        with autocast(ctx):
            loss, logs = loss_fn(model, batch, step)
        scaler.scale(loss / accum).backward()  # a disabled scaler (fp32, bf16) returns the loss as is
        d = loss.detach().float()
        step_loss = d / accum if step_loss is None else step_loss + d / accum
        finite = torch.isfinite(d) if finite is None else finite & torch.isfinite(d)
    return step_loss, logs, finite


@dataclass
class FitResult:
    step: int  # the step whose weights ``model`` holds: the last, or the best one under keep_best
    resumed_from: int
    train_loss: float
    seconds: float
    steps_per_s: float
    best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the kept best checkpoint (keep_best)


Evaluate = Callable[[torch.nn.Module], "dict[str, float]"]


def _validate(ctx: StageContext, model: torch.nn.Module, evaluate: Evaluate, step: int) -> dict[str, float]:
    """One validation pass in the middle of training. The RNG streams and train mode are restored after it,
    so a run with validation passes trains exactly like one without (and resumes bitwise)."""
    st = rng_state()
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        vals = {k: float(v) for k, v in evaluate(model).items()}
    model.train()
    set_rng_state(st)
    log.info("[%s] step %d validation: %s (%.1fs)", ctx.name, step,
             " ".join(f"{k} {v:.4g}" for k, v in vals.items()), time.perf_counter() - t)
    ctx.tracker.log_metrics(vals, step=step)
    return vals


def _restore_best(ctx: StageContext, model: torch.nn.Module, best: dict[str, Any] | None) -> None:
    """Load the kept best checkpoint's weights into ``model`` (keep_best: they are the stage's output)."""
    if best is None:
        return
    path = ctx.checkpoints.path_of(int(best["step"]))
    problem = ctx.checkpoints.verify(path)
    if problem is not None:
        raise StageError(f"stage {ctx.name!r}: the best checkpoint {path} ({best['metric']} {best['value']:.4g}) "
                         f"is unusable: {problem}")
    model.load_state_dict(load_weights(path / "model.safetensors"))
    log.info("[%s] output weights: best checkpoint, step %d (%s %.4g)", ctx.name, best["step"], best["metric"],
             best["value"])
    ctx.tracker.log_metrics({"best/step": float(best["step"]), f"best/{best['metric']}": float(best["value"])},
                            step=int(best["step"]))


LossFn = Callable[[torch.nn.Module, Any, int], "tuple[torch.Tensor, dict[str, torch.Tensor | float]]"]


def fit(ctx: StageContext, model: torch.nn.Module, dataset, collate: Callable | None, loss_fn: LossFn,
        cfg: TrainConfig, blocks: list[list[torch.nn.Parameter]] | None = None,
        head: list[torch.nn.Parameter] | None = None, extra_state: dict | None = None,
        evaluate: Evaluate | None = None, best_metric: tuple[str, Literal["max", "min"]] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps on ``dataset``.

    ``loss_fn(model, batch, step) -> (loss, logs)`` computes one micro-batch's loss. ``blocks`` and
    ``head`` (see stages.train.transfer) define the transfer strategy; without them every parameter is
    one 'head' group. ``evaluate(model) -> {metric: value}`` is the stage's validation pass, run every
    ``cfg.eval_every`` steps; with ``cfg.keep_best`` the checkpoint with the best ``best_metric``
    (name, "max" | "min") is kept and its weights are in ``model`` on return. Otherwise returns when the
    last step is done and checkpointed, with the trained weights in ``model``."""
    rt = ctx.config.runtime
    if cfg.eval_every is not None and evaluate is None:
        raise StageError(f"stage {ctx.name!r}: train.eval_every is set but this stage kind has no validation "
                         "pass during training")
    if cfg.keep_best and best_metric is None:
        raise StageError(f"stage {ctx.name!r}: train.keep_best is set but this stage kind names no metric to "
                         "select the best checkpoint by")
    if cfg.batch_size % cfg.grad_accum:
        raise StageError(f"train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}")
    accum = cfg.grad_accum
    if ctx.checkpoints is None:
        ctx.checkpoints = CheckpointManager(ctx.stage_dir / "checkpoints", keep=rt.keep_checkpoints)
    model.to(ctx.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    if blocks is None:
        blocks, head = [], [p for p in model.parameters()]
    plan: TransferPlan = build_plan(blocks, head or [], cfg.transfer, cfg.weight_decay)
    groups = [{k: v for k, v in g.items()} | {"lr": cfg.lr * g["lr_mult"]} for g in plan.groups]
    if cfg.optimizer == "adamw":
        fused = ctx.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched_fn = _schedule(cfg)
    lambdas = [(lambda s, g=g: sched_fn(s) * plan.lr_factor(g, s)) for g in plan.groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    scaler = grad_scaler(ctx)
    ctx.tracker.log_params({f"train.{k}": v for k, v in cfg.model_dump().items() if k != "transfer"} | plan.describe())

    start, best = 0, None
    # the loss summed since the last log line, and its step count: checkpointed, so that the first line
    # after a resume averages the same steps (and logs the same value) as an unbroken run
    window0: tuple[float, int] = (0.0, 0)
    ckpt = ctx.checkpoints.latest()
    if ckpt is not None:
        mstate, tstate = ckpt.load()
        model.load_state_dict(mstate)
        opt.load_state_dict(tstate["optimizer"])
        sched.load_state_dict(tstate["scheduler"])
        if scaler.is_enabled():
            if not tstate.get("scaler"):
                raise StageError(f"stage {ctx.name!r}: checkpoint {ckpt.path} has no fp16 loss-scaler state "
                                 "(it was written with runtime.precision other than fp16)")
            scaler.load_state_dict(tstate["scaler"])
        set_rng_state(tstate["rng"])
        if extra_state is not None:
            extra_state.update(tstate.get("extra", {}))
        start = int(tstate["step"])
        accum = int(tstate.get("grad_accum", accum))
        best = tstate.get("best")
        window0 = tuple(tstate.get("log_window", window0))
        log.info("[%s] resumed from checkpoint at step %d/%d (%s)", ctx.name, start, cfg.steps, ckpt.path)
    if start >= cfg.steps:
        if cfg.keep_best:
            _restore_best(ctx, model, best)
        kept = best if cfg.keep_best else None
        return FitResult(kept["step"] if kept else start, start, float("nan"), 0.0, 0.0, kept)

    def loader_from(step: int, accum: int) -> Iterator:
        sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, ctx.seed, step, cfg.steps, accum)
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=rt.num_workers,
            pin_memory=ctx.device.type == "cuda", persistent_workers=False,
            # own generator: creating the iterator must not draw from the global RNG, or a resumed
            # run's dropout stream would differ from an unbroken one
            generator=torch.Generator().manual_seed(ctx.seed)))

    batches = loader_from(start, accum)

    def save(step: int) -> None:
        # metrics first: a kill between the two then leaves the history ahead of the newest checkpoint
        # (the resumed tracker drops the re-computed overlap), never a gap behind it
        ctx.tracker.flush()
        ctx.checkpoints.save(step, model.state_dict(), {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
            "grad_accum": accum, "extra": extra_state or {}, "log_window": [float(window_loss), window_n]}
            | ({"best": best} if best else {})
            | ({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}))

    # the first step whose loss was not finite (+1; 0: none) and that loss, kept on the device and looked
    # at only where the loop syncs anyway (log lines, checkpoints, validation): never a checkpoint after it
    first_bad = torch.zeros((), dtype=torch.long, device=ctx.device)
    bad_loss = torch.zeros((), device=ctx.device)

    def stop_if_not_finite(at: int) -> None:
        b = int(first_bad)
        if b:
            good = [s for s in ctx.checkpoints.steps() if s < b]
            raise StageError(f"stage {ctx.name!r}: non-finite loss ({float(bad_loss)}) at step {b - 1} (seen at "
                             f"step {at}); stopped, last good checkpoint: step {good[-1] if good else 'none'}")

    model.train()
    t0 = time.perf_counter()
    (window_loss, window_n), last_t, last_step = window0, t0, start
    loss_avg = float("nan")
    for step in range(start, cfg.steps):
        plan.apply(step)
        while True:
            try:
                step_loss, logs, finite = _accumulate(ctx, model, batches, loss_fn, step, accum, scaler)
                break
            except torch.OutOfMemoryError:
                # same effective batch: half the micro-batch, twice the accumulation, same examples
                if not rt.oom_retry or cfg.batch_size % (accum * 2):
                    raise
                opt.zero_grad(set_to_none=True)
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                accum *= 2
                log.warning("[%s] out of memory at step %d: retrying with micro-batch %d x %d accumulation",
                            ctx.name, step, cfg.batch_size // accum, accum)
                ctx.tracker.set_tags({"train.oom_retry": f"step {step}: grad_accum {accum}"})
                batches = loader_from(step, accum)
        if cfg.grad_clip:
            scaler.unscale_(opt)  # clip the true gradients (a no-op without fp16)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None],
                                           cfg.grad_clip)
        scaler.step(opt)  # = opt.step(), skipped under fp16 if the gradients overflowed
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        newly_bad = (first_bad == 0) & ~finite
        first_bad = torch.where(newly_bad, step + 1, first_bad)
        bad_loss = torch.where(newly_bad, step_loss, bad_loss)
        window_loss = window_loss + step_loss
        window_n += 1
        done = step + 1
        if done % rt.log_every == 0 or done == cfg.steps:
            stop_if_not_finite(done)
            now = time.perf_counter()
            rate = (done - last_step) / max(now - last_t, 1e-9)
            loss_avg = float(window_loss) / window_n
            eta = (cfg.steps - done) / max(rate, 1e-9)
            lr0 = opt.param_groups[-1]["lr"]
            log.info("[%s] step %d/%d loss %.4f lr %.2e %.2f it/s ETA %s", ctx.name, done, cfg.steps, loss_avg,
                     lr0, rate, time.strftime("%M:%S", time.gmtime(eta)))
            ctx.tracker.log_metrics({"train/loss": loss_avg, "train/lr": lr0, "train/steps_per_s": rate}
                                    | ({"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})
                                    | {f"train/{k}": float(v) for k, v in logs.items()}, step=done)
            window_loss, window_n, last_t, last_step = 0.0, 0, now, done
        new_best = False
        if cfg.eval_every is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            stop_if_not_finite(done)
            vals = _validate(ctx, model, evaluate, done)
            if cfg.keep_best:
                name, mode = best_metric
                if name not in vals:
                    raise StageError(f"stage {ctx.name!r}: the validation pass returned {sorted(vals)}, "
                                     f"not {name!r} (the best-checkpoint metric)")
                v = vals[name]
                if best is None or (v > best["value"] if mode == "max" else v < best["value"]):
                    best, new_best = {"step": done, "metric": name, "value": v}, True
        if done % rt.checkpoint_every == 0 or done == cfg.steps or new_best:
            stop_if_not_finite(done)
            save(done)
    plan.apply(cfg.steps)
    secs = time.perf_counter() - t0
    if cfg.keep_best:
        _restore_best(ctx, model, best)
    kept = best if cfg.keep_best else None
    # final val metrics logged at res.step then sit on the selected checkpoint's step, not on the last
    # pass's (which scored other weights)
    return FitResult(kept["step"] if kept else cfg.steps, start, loss_avg, secs,
                     (cfg.steps - start) / max(secs, 1e-9), kept)
