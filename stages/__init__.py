"""Stage kinds. Each kind is one module exposing ``Config`` (a StageConfig subclass) and
``run(ctx) -> StageResult``. The built-in kinds are named in ``KINDS``; any other ``kind`` is the dotted
path of a module in the user's own package (``kind: my_project.stages.segmenter``) or the name of an
entry point in group ``baton.stages`` whose value is such a module path. Adding a kind = one module +
one block in a recipe.

One import rule, in every process that reads a recipe or runs a stage (the CLI, the flow, the stage
process): the user's package is importable when it is installed, or when its folder is named in the
recipe's ``python_path`` (relative to the recipe file), which :func:`use_python_path` puts on
``sys.path`` and ``PYTHONPATH`` (so processes started from this one see it too).

``CONFIGS`` names, for the kinds whose module imports torch, a torch-free module holding the same
``Config`` (``stages.config``): recipe validation uses it, so ``baton`` commands that only read a
recipe start in a fraction of a second instead of importing torch, torchvision and transformers."""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

KINDS: dict[str, str] = {
    "world": "stages.world",
    "cnn": "stages.cnn",
    "detector": "stages.detector",
    "bert": "stages.bert",
    "vl": "stages.vl",
    "caption": "stages.caption",
    "vqa": "stages.vqa",
    "targets": "stages.targets",
}

CONFIGS: dict[str, str] = {kind: f"stages.config.{kind}" for kind in KINDS}


ENTRY_POINT_GROUP = "baton.stages"


class UnknownKind(KeyError):
    """A ``kind`` that is neither built in, nor an importable module, nor a ``baton.stages`` entry point."""

    def __str__(self) -> str:
        return str(self.args[0])


def use_python_path(paths: list[str]) -> None:
    """Make the folders of a recipe's ``python_path`` (absolute by now) importable here and in children."""
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
        if p not in env:
            env.insert(0, p)
    if env:
        os.environ["PYTHONPATH"] = os.pathsep.join(env)


def kind_module_name(kind: str) -> str:
    """The module implementing ``kind``."""
    if kind in KINDS:
        return KINDS[kind]
    if "." not in kind:
        from importlib.metadata import entry_points  # 10 ms: only for a kind that is not built in

        found = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP, name=kind)]
        if not found:
            raise UnknownKind(f"unknown stage kind {kind!r}: not one of {', '.join(KINDS)}, not an entry point in "
                              f"group {ENTRY_POINT_GROUP!r}, and not a dotted module path (my_project.stages.x)")
        return found[0].split(":")[0]
    return kind


def kind_module(kind: str) -> ModuleType:
    name = kind_module_name(kind)
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UnknownKind(f"stage kind {kind!r}: module {name!r} failed to import: {type(e).__name__}: {e} "
                          f"(install the package, or name its folder in the recipe's python_path)") from e
    missing = [a for a in ("Config", "run") if not hasattr(module, a)]
    if missing:
        raise UnknownKind(f"stage kind {kind!r}: module {name!r} has no {' and no '.join(missing)} "
                          "(a stage module exposes Config and run)")
    return module


def kind_config(kind: str) -> type:
    """The kind's ``Config`` model, without importing its (torch) code where ``CONFIGS`` allows."""
    if kind in CONFIGS:
        return importlib.import_module(CONFIGS[kind]).Config
    return kind_module(kind).Config
