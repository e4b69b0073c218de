"""What a checkpoint holds besides the weights: :class:`TrainState`, written as ``state.pt``.

``state.pt`` is a plain dict of tensors and containers (it loads with ``torch.load(weights_only=True)``):
  optimizer, scheduler   their ``state_dict()``
  rng                    python / numpy / torch (/ cuda) RNG states, see :func:`rng_state`
  grad_accum             micro-batches per step when it was written (an OOM retry may have raised it)
  log_window             [loss summed since the last log line, its step count]
  best                   (keep_best) {"step", "metric", "value"} of the best checkpoint so far
  scaler                 (runtime.precision fp16) the GradScaler's ``state_dict()``
  world_size, rank_rng   (DDP, runtime.nproc_per_node > 1) the number of ranks and every rank's RNG states
                         (``rng`` is rank 0's); absent from a 1-rank checkpoint
  step                   added by :meth:`CheckpointManager.save`
Checkpoints written before this class read the same way; their ``extra`` key (always empty) is ignored, and
keys that older versions did not write take the defaults below."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.config.train import TrainConfig

log = logging.getLogger("baton")


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "gauss": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class TrainState:
    """The full training state at the end of optimizer step ``step`` (weights apart)."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    grad_accum: int
    log_window: tuple[float, int] = (0.0, 0)
    best: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    world_size: int = 1
    rank_rng: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``state.pt`` dict, without ``step`` (the checkpoint manager adds it)."""
        return ({"optimizer": self.optimizer, "scheduler": self.scheduler, "rng": self.rng,
                 "grad_accum": self.grad_accum, "log_window": [float(self.log_window[0]), int(self.log_window[1])]}
                | ({"best": self.best} if self.best else {})
                | ({"scaler": self.scaler} if self.scaler is not None else {})
                | ({"world_size": self.world_size, "rank_rng": self.rank_rng} if self.world_size > 1 else {}))

    @classmethod
    def from_dict(cls, d: dict[str, Any], cfg: TrainConfig) -> TrainState:
        """Read a ``state.pt`` dict; ``grad_accum`` missing (the oldest checkpoints) means the config's."""
        window = d.get("log_window", (0.0, 0))
        return cls(step=int(d["step"]), optimizer=d["optimizer"], scheduler=d["scheduler"], rng=d["rng"],
                   grad_accum=int(d.get("grad_accum", cfg.grad_accum)), log_window=(window[0], window[1]),
                   best=d.get("best"), scaler=d.get("scaler") or None, world_size=int(d.get("world_size", 1)),
                   rank_rng=d.get("rank_rng"))

    def disagreements(self, cfg: TrainConfig, precision: str) -> list[str]:
        """Where this state and the config of the run resuming it differ: each names the key and both values."""
        out = []
        if self.grad_accum != cfg.grad_accum:
            out.append(f"grad_accum is {self.grad_accum} there, train.grad_accum is {cfg.grad_accum} in the "
                       f"config: continuing with {self.grad_accum} (an out-of-memory retry raised it; the "
                       "effective batch is the same)")
        if self.scaler is not None and precision != "fp16":
            out.append(f"it holds fp16 loss-scaler state, runtime.precision is {precision!r} in the config: "
                       "the scaler state is not used")
        return out

    def say_disagreements(self, name: str, path: Path, cfg: TrainConfig, precision: str) -> None:
        for d in self.disagreements(cfg, precision):
            log.warning("[%s] resuming from checkpoint %s: %s", name, path, d)
