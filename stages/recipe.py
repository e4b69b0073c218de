"""Recipes: one YAML file -> validated stage configs in dependency order.

    recipe: vlp-tiny            # experiment name in MLflow
    seed: 0                     # default seed of every stage
    runtime: {device: auto}     # default runtime block, merged under each stage's own
    python_path: [src]          # folders holding the user's own stage kinds (kind: my_project.stages.x)
    stages:
      world: {kind: world, ...}
      cnn:   {kind: cnn, needs: [world], train: {lr: 2e-3}}

Relative paths: every path a recipe names (``python_path`` and every external input of every stage,
:meth:`StageConfig.external_inputs`) is resolved against the recipe file's folder, once, here; the
configs, the fingerprints, the snapshot handed to stage processes and the params MLflow logs all hold
the absolute path. A field that may also be a weights name (``cnn.model.init``, ``bert.model.pretrained``)
is a path when it exists under the recipe's folder or starts with ``.`` or ``~``, a name otherwise.

Every error names the file and the dotted key path (``stages.cnn.train.lr``). Command-line
overrides use the same paths: ``stages.cnn.train.lr=3e-4`` (values parsed as YAML).
Pure python + pydantic: no Prefect, no MLflow, so ``python -m stages`` and GPU machines can use it.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from stages import KINDS, UnknownKind, kind_config, use_python_path
from stages.contract import ExternalInput, Runtime, StageConfig, Strict


class RecipeError(Exception):
    """A recipe that cannot run: the message names the file and the key."""


STAGE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a plain identifier: a path segment that stays put, a dotted-key segment


class RecipeSettings(Strict):
    recipe: str = Field(..., pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="default seed of every stage (torch.manual_seed's range)")
    runtime: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int = Field(2, ge=1, description="stages that may run at once")
    retries: int = Field(0, ge=0, description="Prefect task retries for transient (non-config, non-data) errors")
    python_path: list[str] = Field(default_factory=list, description="folders put on sys.path (relative to the "
                                   "recipe file) so `kind: my_project.stages.x` imports")
    stages: dict[str, dict[str, Any]]


@dataclass
class Recipe:
    path: Path
    name: str
    seed: int
    max_concurrency: int
    retries: int
    stages: dict[str, StageConfig]  # in topological order
    python_path: list[str] = field(default_factory=list)  # absolute
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def downstream(self, name: str) -> list[str]:
        out, frontier = [], {name}
        for s, cfg in self.stages.items():
            if frontier & set(cfg.needs):
                out.append(s)
                frontier.add(s)
        return out


def _fmt_loc(prefix: str, loc: tuple) -> str:
    return ".".join([prefix, *(str(p) for p in loc)]) if prefix else ".".join(str(p) for p in loc)


def _fields_at(model: type | None, loc: tuple) -> list[str]:
    """The field names of the pydantic model found at ``loc`` under ``model`` ([] where it is not one)."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    return list(getattr(model, "model_fields", {}))


def _raise_validation(path: Path, prefix: str, e: ValidationError, model: type | None = None) -> None:
    lines = []
    for err in e.errors():
        key = _fmt_loc(prefix, err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(err["loc"][-1], _fields_at(model, err["loc"][:-1]))
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        lines.append(f"{path}: {key}: {msg}")
    raise RecipeError("\n".join(lines))


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_override(raw: dict[str, Any], override: str) -> None:
    """``a.b.c=value`` -> raw['a']['b']['c'] = yaml(value)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected dotted.key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r}: empty key segment")
    stages = raw.get("stages")
    if parts[0] == "stages" and len(parts) > 2 and parts[2] != "kind" and isinstance(stages, dict) \
            and parts[1] not in stages:  # a new stage names its kind; anything else is a misspelt stage
        raise RecipeError(f"override {override!r}: no stage {parts[1]!r} in the recipe{_did_you_mean(parts[1], stages)}"
                          f" (stages: {', '.join(map(str, stages))})")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"override {override!r}: value is not valid YAML: {e}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice anywhere in the document (plain PyYAML keeps
    the last one silently), naming the line and the dotted key."""

    def compose_document(self):
        node = super().compose_document()
        _check_unique_keys(node, "", set())
        return node


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, line: int, key: str, first: int):
        super().__init__(f"line {line}: {key}: duplicate key (first at line {first}); each key may appear once")


def _check_unique_keys(node: yaml.Node | None, prefix: str, seen_nodes: set[int]) -> None:
    if node is None or id(node) in seen_nodes:  # an alias points at a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix}[{i}]", seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            line = key_node.start_mark.line + 1
            if key in first and key != "<<":
                raise DuplicateKeyError(line, dotted, first[key])
            first.setdefault(key, line)
            _check_unique_keys(value_node, dotted, seen_nodes)


def load_raw(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line}): "
                          "save the recipe as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # UniqueKeyLoader is a SafeLoader
    except DuplicateKeyError as e:
        raise RecipeError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys recipe, stages (got {type(raw).__name__})")
    return raw


def load_recipe(path: Path | str, overrides: list[str] | tuple[str, ...] = (), raw: dict | None = None) -> Recipe:
    """Read, override, validate. ``raw`` (an already-parsed snapshot) skips reading ``path``."""
    path = Path(path)
    raw = copy.deepcopy(raw) if raw is not None else load_raw(path)
    for o in overrides:
        apply_override(raw, o)
    try:
        settings = RecipeSettings.model_validate(raw)
    except ValidationError as e:
        _raise_validation(path, "", e, RecipeSettings)
    try:
        Runtime.model_validate(settings.runtime)
    except ValidationError as e:
        _raise_validation(path, "runtime", e, Runtime)

    base = path.parent.resolve()
    python_path = [str((base / Path(p).expanduser()).resolve()) for p in settings.python_path]
    if python_path:
        raw["python_path"] = python_path
    use_python_path(python_path)
    configs: dict[str, StageConfig] = {}
    for name, block in settings.stages.items():
        prefix = f"stages.{name}"
        if not re.match(STAGE_NAME, str(name)):
            raise RecipeError(f"{path}: {prefix}: a stage name is a plain identifier (letters, digits, _; not starting "
                              f"with a digit), got {name!r}: it names the stage's directory and its override keys")
        if not isinstance(block, dict):
            raise RecipeError(f"{path}: {prefix}: a stage is a mapping (got {type(block).__name__})")
        block = dict(block)
        kind = block.setdefault("kind", name if name in KINDS else None)
        if not isinstance(kind, str):
            raise RecipeError(f"{path}: {prefix}.kind: unknown stage kind: missing{_did_you_mean(name, KINDS)} "
                              f"(built-in kinds: {', '.join(KINDS)}; or a module path such as my_project.stages.segmenter)")
        block.setdefault("seed", settings.seed)
        block["runtime"] = {**settings.runtime, **(block.get("runtime") or {})}
        try:
            model = kind_config(kind)
        except UnknownKind as e:
            raise RecipeError(f"{path}: {prefix}.kind: {e}") from None
        # A partial `train` block keeps the stage kind's tuned defaults for the keys it leaves out
        # (pydantic alone would fall back to TrainConfig's generic defaults).
        if isinstance(block.get("train"), dict) and "train" in model.model_fields:
            default = model.model_fields["train"].get_default(call_default_factory=True)
            if default is not None:
                block["train"] = _deep_merge(default.model_dump(), block["train"])
        try:
            cfg = model.model_validate(block)
            resolved = resolve_paths(cfg.external_inputs(), base)
            for key, value in resolved.items():  # into the snapshot too: stage processes read absolute paths
                _set_dotted(block, key, value)
                _set_dotted(raw["stages"][name], key, value)
            configs[name] = model.model_validate(block) if resolved else cfg
        except ValidationError as e:
            _raise_validation(path, prefix, e, model)

    order = _toposort(path, configs)
    return Recipe(path=path, name=settings.recipe, seed=settings.seed, max_concurrency=settings.max_concurrency,
                  retries=settings.retries, stages={n: configs[n] for n in order}, python_path=python_path, raw=raw)


def resolve_paths(inputs: dict[str, ExternalInput], base: Path) -> dict[str, str]:
    """{config key: absolute path} for the relative paths among ``inputs``, resolved against ``base`` (the
    recipe file's folder). A relative value of an input that may be a name, with no such file under ``base``
    and not starting with ``.`` or ``~``, is a name (a torchvision weights name, a hub id) and stays."""
    out = {}
    for key, inp in inputs.items():
        p = Path(inp.value).expanduser()
        if inp.names and not p.is_absolute() and not inp.value.startswith((".", "~")) and not (base / p).exists():
            continue
        resolved = str((base / p).resolve())  # symlinks too: the stage (world) logs resolved paths as params
        if resolved != inp.value:
            out[key] = resolved
    return out


def _set_dotted(node: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toposort(path: Path, configs: dict[str, StageConfig]) -> list[str]:
    for name, cfg in configs.items():
        for i, dep in enumerate(cfg.needs):
            if dep not in configs:
                raise RecipeError(f"{path}: stages.{name}.needs[{i}]: unknown stage {dep!r} (stages: {', '.join(configs)})")
        for key, ref in cfg.upstream_refs().items():
            if ref not in cfg.needs:
                raise RecipeError(f"{path}: stages.{name}.{key}: refers to stage {ref!r}, which is not in "
                                  f"stages.{name}.needs {cfg.needs}")
            want, have = cfg.ref_outputs().get(key), configs[ref].declared_outputs()
            if want and have is not None and want not in have:
                hint = f"; set stages.{ref}.paths.{want} (source: real)" if configs[ref].kind == "world" else ""
                raise RecipeError(f"{path}: stages.{name}.{key}: stage {ref!r} has no {want!r} output "
                                  f"(it has {', '.join(sorted(have)) or 'none'}{hint})")
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on stack, 2 = done

    def visit(n: str, stack: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = stack[stack.index(n):] + [n]
            raise RecipeError(f"{path}: stages.{n}.needs: dependency cycle {' -> '.join(cycle)}")
        state[n] = 1
        for dep in configs[n].needs:
            visit(dep, stack + [n])
        state[n] = 2
        order.append(n)

    for n in configs:
        visit(n, [])
    return order
