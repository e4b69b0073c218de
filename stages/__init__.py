"""Stage kinds. Each kind is one module exposing ``Config`` (a StageConfig subclass) and
``run(ctx) -> StageResult``. Adding a kind = one module + one line here + one block in a config."""
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


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(KINDS[kind])
