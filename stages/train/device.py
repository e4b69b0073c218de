"""Device placement and mixed precision: one place for autocast and the fp16 loss scaler."""
from __future__ import annotations

from typing import Any

import torch

from stages.config.train import TrainConfig  # noqa: F401 - its config, re-exported
from stages.contract import StageContext


def to_device(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 and x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, channels_last) for v in x)
    return x


def autocast(ctx: StageContext):
    prec = ctx.config.runtime.precision
    enabled = prec in ("bf16", "fp16") and ctx.device.type == "cuda"
    return torch.autocast(ctx.device.type, dtype=torch.float16 if prec == "fp16" else torch.bfloat16, enabled=enabled)


def grad_scaler(ctx: StageContext) -> torch.amp.GradScaler:
    """fp16: dynamic loss scaling (a step whose gradients overflow is skipped and the scale halves).
    On CPU the math stays fp32 (no autocast) but the scaler still runs, so its state is checkpointed
    and resumed the same way everywhere."""
    return torch.amp.GradScaler(ctx.device.type, enabled=ctx.config.runtime.precision == "fp16")


def cudnn_autotune(ctx: StageContext) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    (``cudnn.benchmark``), unless ``runtime.deterministic`` asks for reproducible kernels."""
    if ctx.device.type == "cuda" and not ctx.config.runtime.deterministic:
        torch.backends.cudnn.benchmark = True
