"""Stage kinds. Each kind is one module exposing ``Config`` (a StageConfig subclass) and
``run(ctx) -> StageResult``. Adding a kind = one module + one line here + one block in a config.

``CONFIGS`` names, for the kinds whose module imports torch, a torch-free module holding the same
``Config`` (``stages.config``): recipe validation uses it, so ``baton`` commands that only read a
recipe start in a fraction of a second instead of importing torch, torchvision and transformers."""
from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "world": "stages.world",
    "cnn": "stages.cnn",
    "detector": "stages.detector",
    "bert": "stages.bert",
    "vl": "stages.vl",
    "caption": "stages.caption",
    "vqa": "stages.vqa",
}

CONFIGS: dict[str, str] = {kind: f"stages.config.{kind}" for kind in KINDS}


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(KINDS[kind])


def kind_config(kind: str) -> type:
    """The kind's ``Config`` model, without importing its (torch) code where ``CONFIGS`` allows."""
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(CONFIGS.get(kind, KINDS[kind])).Config
