"""``runtime.compile``: the module the training step calls, ``torch.compile``'d when asked.

Only the training forward goes through the compiled wrapper. It shares its parameters with the plain
model, which stays the one that checkpoints, validation, evaluation and outputs use: a checkpoint holds the
uncompiled state dict (no ``_orig_mod.`` prefix), so a run written with compile on resumes with it off and
the other way round. Under DDP, compile the DDP-wrapped module (``torch.compile(DDP(model))``, the order
PyTorch recommends) by passing it here. Off by default: the warm-up (tens of seconds, more on a CPU) pays
off only on long GPU runs."""
from __future__ import annotations

import logging

import torch

from stages.contract import Runtime

log = logging.getLogger("baton")


def train_module(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``torch.compile(module)`` with ``runtime.compile``, else ``module`` itself. Compilation is lazy: it
    happens at the first training step (and again where a guard fails, e.g. when the transfer plan changes
    which parameters train)."""
    if not runtime.compile:
        return module
    log.info("runtime.compile: torch.compile of %s (compiled at the first step)", type(module).__name__)
    return torch.compile(module)
