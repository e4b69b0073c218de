"""Validation during training (every ``train.eval_every`` steps) and keep-best."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from stages.config.train import TrainConfig
from stages.contract import StageContext, StageError
from stages.train import distributed
from stages.train.checkpoint import load_weights
from stages.train.state import rng_state, set_rng_state
from stages.train.step import NonFinite

log = logging.getLogger("baton")

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


class Validator:
    """Runs the stage's ``evaluate(model) -> {metric: value}`` every ``cfg.eval_every`` steps and at the last;
    with ``cfg.keep_best`` it tracks the best pass by ``best_metric`` (name, "max" | "min") and, at the end,
    loads that checkpoint's weights into the model (they are the stage's output)."""

    def __init__(self, ctx: StageContext, model: torch.nn.Module, cfg: TrainConfig, evaluate: Evaluate | None,
                 best_metric: tuple[str, Literal["max", "min"]] | None, non_finite: NonFinite):
        self.ctx, self.model, self.cfg, self.evaluate, self.best_metric = ctx, model, cfg, evaluate, best_metric
        self.non_finite = non_finite
        self.best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the best pass so far

    @property
    def kept(self) -> dict[str, Any] | None:
        """The best checkpoint whose weights are the output (keep_best), else None."""
        return self.best if self.cfg.keep_best else None

    def maybe_validate(self, done: int) -> bool:
        """After step ``done`` (1-based): a validation pass if it is an eval step. True if it is a new best."""
        if self.cfg.eval_every is None or (done % self.cfg.eval_every and done != self.cfg.steps):
            return False
        self.non_finite.check(done)
        # DDP: rank 0 validates, the others wait for its values (so every rank keeps the same best)
        vals = _validate(self.ctx, self.model, self.evaluate, done) if distributed.is_main() else None
        vals = distributed.broadcast_object(vals)
        if not self.cfg.keep_best:
            return False
        name, mode = self.best_metric
        if name not in vals:
            raise StageError(f"stage {self.ctx.name!r}: the validation pass returned {sorted(vals)}, "
                             f"not {name!r} (the best-checkpoint metric)")
        v = vals[name]
        if self.best is None or (v > self.best["value"] if mode == "max" else v < self.best["value"]):
            self.best = {"step": done, "metric": name, "value": v}
            return True
        return False

    def restore_best(self) -> None:
        """keep_best: load the kept best checkpoint's weights into the model."""
        best = self.kept
        if best is None:
            return
        path = self.ctx.checkpoints.path_of(int(best["step"]))
        problem = self.ctx.checkpoints.verify(path)
        if problem is not None:
            raise StageError(f"stage {self.ctx.name!r}: the best checkpoint {path} ({best['metric']} "
                             f"{best['value']:.4g}) is unusable: {problem}")
        self.model.load_state_dict(load_weights(path / "model.safetensors"))
        log.info("[%s] output weights: best checkpoint, step %d (%s %.4g)", self.ctx.name, best["step"],
                 best["metric"], best["value"])
        self.ctx.tracker.log_metrics({"best/step": float(best["step"]), f"best/{best['metric']}": float(best["value"])},
                                     step=int(best["step"]))
