"""Sweeps: variants of one recipe run as one Prefect flow whose tasks are the variants' unique stages.

    baton sweep configs/vlp-micro.yaml --variant lp_ft='stages.vqa.train.transfer.strategy=lp_ft
          stages.vqa.train.transfer.lp_steps=3' --variant ft='' --grid stages.vqa.train.lr=1e-3,3e-3 --seeds 0,1
    baton sweep configs/sweeps/backbone-transfer.yaml          # the same, written down (a sweep file)

A sweep file (``sweep:`` marks it; paths relative to the file)::

    sweep: backbone-transfer            # its name: artifacts/sweeps/<name>.json, the MLflow sweep run
    recipe: ../vlp-tiny.yaml
    overrides: [stages.detector.train.steps=120]   # every variant: the study's sizes
    add_stages: {detector_ft: {kind: detector, needs: [world, cnn], ...}}   # new stages, merged in
    variants: {cnn0: "stages.cnn.train.steps=0", cnn300: ["stages.cnn.train.steps=300"], ...}
    grid: {stages.detector.train.lr: [0.001, 0.003]}
    seeds: [0, 1, 2]
    seeds_from: null                    # default: the swept stages (those a variant changes)
    only: [detector]                    # run these stages and what they need (default: all)
    report: {...}                       # flows.report

Members: every variant x grid point x seed. Each is one recipe (the variant's overrides, then
``stages.<s>.seed=<seed>`` for every seeded stage); all are validated before anything runs, and a bad one
is refused naming the variant and the key. The *swept* stages are those whose config some variant changes;
the *seeded* ones are the swept stages, ``seeds_from`` and everything downstream of them; upstream stages
keep their seed, so their fingerprint (and directory) is the same in every member: one node, trained once.

The flow reuses the recipe flow's parts (flows.pipeline.StageTask, run_graph, the stage processes): a node
(stage, fingerprint) is one task run named ``<stage>[<member>]`` or ``<stage>[shared xN]``. In MLflow, one
sweep run; per member a child run named after it (tags ``baton.variant``, ``baton.seed``); a stage only one
member uses is a child of that member's run, a shared one a child of the sweep run, tagged
``baton.variants`` with every member using it. The record ``artifacts/sweeps/<name>.json`` lists the
members, their fingerprints and the runs, for ``baton report``, ``baton status`` and ``baton gc``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from flows.fingerprint import StagePlan, canonical, plan_fingerprints
from flows.plan import downstream_of, needed_stages
from stages.contract import Strict
from stages.fsio import write_json_atomic
from stages.recipe import Recipe, RecipeError, _deep_merge, _raise_validation, load_raw, load_recipe

log = logging.getLogger("baton")
SWEEP_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"


class SweepSpec(Strict):
    """A sweep file (or the ``baton sweep`` options), validated; ``recipe`` is an absolute path once loaded."""

    sweep: str = Field(..., pattern=SWEEP_NAME, description="the sweep's name")
    recipe: str = Field(..., description="the recipe YAML, relative to the sweep file")
    description: str = ""
    overrides: list[str] = Field(default_factory=list, description="applied to every variant first")
    add_stages: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stages merged into the recipe")
    variants: dict[str, str | list[str] | dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=list)
    seeds_from: str | None = None
    only: list[str] = Field(default_factory=list)
    max_concurrency: int | None = Field(None, ge=1)
    report: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Member:
    """One recipe of the sweep: a variant at one grid point and one seed."""

    name: str
    variant: str
    seed: int | None
    overrides: list[str]
    recipe: Recipe | None = None
    plans: dict[str, StagePlan] = field(default_factory=dict)
    wanted: list[str] = field(default_factory=list)  # recipe order

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "variant": self.variant, "seed": self.seed, "overrides": self.overrides,
                "stages": self.wanted, "fingerprints": {n: self.plans[n].fingerprint for n in self.wanted}}


@dataclass
class Node:
    """A unique stage of the sweep: (stage, fingerprint), with the members that use it."""

    stage: str
    fingerprint: str
    members: list[str]
    needs: list[tuple[str, str]]

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.fingerprint)

    def task_name(self) -> str:
        return f"{self.stage}[{self.members[0]}]" if len(self.members) == 1 else \
            f"{self.stage}[shared x{len(self.members)}]"


@dataclass
class Sweep:
    spec: SweepSpec
    path: Path | None  # the sweep file, if any
    base: Recipe
    members: list[Member]
    swept: list[str]
    seeded: list[str]
    nodes: dict[tuple[str, str], Node]

    @property
    def max_concurrency(self) -> int:
        return self.spec.max_concurrency or self.base.max_concurrency

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def record(self) -> dict[str, Any]:
        return {"sweep": self.spec.sweep, "file": str(self.path) if self.path else None, "recipe": self.spec.recipe,
                "recipe_name": self.base.name, "spec": self.spec.model_dump(mode="json"),
                "swept_stages": self.swept, "seeded_stages": self.seeded,
                "members": [m.to_json() for m in self.members],
                "nodes": [{"stage": n.stage, "fingerprint": n.fingerprint, "members": n.members}
                          for n in self.nodes.values()]}


# ------------------------------------------------------------------------------------------ reading a sweep


def is_sweep_file(path: Path) -> bool:
    """A YAML mapping with a ``sweep:`` key (recipes have ``recipe:`` and ``stages:``, never ``sweep:``)."""
    try:
        return isinstance(raw := load_raw(Path(path)), dict) and "sweep" in raw
    except RecipeError:
        return False


def load_spec(path: Path) -> SweepSpec:
    raw = load_raw(Path(path))
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        _raise_validation(Path(path), "", e, SweepSpec)
    recipe = (Path(path).resolve().parent / spec.recipe).resolve()
    return spec.model_copy(update={"recipe": str(recipe)})


def spec_from_options(recipe: Path, variants: list[str], grid: list[str], seeds: str | None,
                      seeds_from: str | None, only: list[str], name: str | None) -> SweepSpec:
    """The ``baton sweep RECIPE --variant NAME='k=v ...' --grid key=v1,v2 --seeds 0,1,2`` options as a spec."""
    import yaml

    out: dict[str, Any] = {"recipe": str(Path(recipe).resolve()), "variants": {}, "grid": {}, "only": only or []}
    for v in variants:
        vname, sep, body = v.partition("=")
        if not sep or not re.match(SWEEP_NAME, vname):
            raise RecipeError(f"--variant {v!r}: expected NAME='dotted.key=value ...' (NAME: letters, digits, ._-)")
        out["variants"][vname] = body
    for g in grid:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise RecipeError(f"--grid {g!r}: expected dotted.key=v1,v2")
        out["grid"][key] = [yaml.safe_load(x) for x in values.split(",")]
    if seeds:
        try:
            out["seeds"] = [int(s) for s in seeds.split(",")]
        except ValueError:
            raise RecipeError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    out["seeds_from"] = seeds_from
    digest = hashlib.sha256(canonical(out).encode()).hexdigest()[:8]
    out["sweep"] = name or f"{Path(recipe).stem}-{digest}"
    try:
        return SweepSpec.model_validate(out)
    except ValidationError as e:
        _raise_validation(Path(recipe), "sweep", e, SweepSpec)
        raise  # unreachable


def _variant_overrides(spec: SweepSpec, name: str) -> list[str]:
    import shlex

    body = spec.variants[name]
    if isinstance(body, dict):
        return [f"{k}={json.dumps(v)}" for k, v in body.items()]
    if isinstance(body, list):
        return [str(o) for o in body]
    return shlex.split(body)


def _slug(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}={value}"


def _members(spec: SweepSpec) -> list[Member]:
    """Every variant x grid point x seed, named ``variant[+key=value...][@s<seed>]``."""
    import itertools

    variants = [(n, _variant_overrides(spec, n)) for n in spec.variants] or [("base", [])]
    points = [list(zip(spec.grid, vals)) for vals in itertools.product(*spec.grid.values())] if spec.grid else [[]]
    out = []
    for (vname, vover), point in itertools.product(variants, points):
        name = "+".join([vname] * (bool(spec.variants) or not point) + [_slug(k, v) for k, v in point])
        over = list(vover) + [f"{k}={json.dumps(v)}" for k, v in point]
        for seed in spec.seeds or [None]:
            out.append(Member(f"{name}@s{seed}" if seed is not None else name, name, seed, over))
    names = [m.name for m in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"sweep {spec.sweep}: two members are named {dup!r}: give the variants distinct names")
    return out


def _base_raw(spec: SweepSpec) -> dict[str, Any]:
    raw = load_raw(Path(spec.recipe))
    if spec.add_stages:
        raw["stages"] = _deep_merge(raw.get("stages") or {}, copy.deepcopy(spec.add_stages))
    return raw


def _load(spec: SweepSpec, raw: dict, overrides: list[str], who: str) -> Recipe:
    try:
        return load_recipe(spec.recipe, list(spec.overrides) + overrides, raw=raw)
    except RecipeError as e:
        raise RecipeError(f"sweep {spec.sweep}: {who}: {e}") from None


def expand(spec: SweepSpec, path: Path | None = None) -> Sweep:
    """Validate every member (nothing runs before all are valid) and plan the sweep's nodes."""
    raw = _base_raw(spec)
    base = _load(spec, raw, [], "the recipe with the sweep's overrides")
    for opt, names in (("only", spec.only), ("seeds_from", [spec.seeds_from] if spec.seeds_from else [])):
        for n in names:
            if n not in base.stages:
                raise RecipeError(f"sweep {spec.sweep}: {opt}: no stage {n!r} in {spec.recipe} "
                                  f"({', '.join(base.stages)})")
    members = _members(spec)
    for m in members:
        m.recipe = _load(spec, raw, m.overrides, f"variant {m.variant!r}")
    swept = [n for n, c in base.stages.items()
             if any(m.recipe.stages[n].fingerprint_payload() != c.fingerprint_payload() for m in members)]
    seeded: list[str] = []
    if spec.seeds:
        roots = swept + ([spec.seeds_from] if spec.seeds_from else [])
        if not roots:
            raise RecipeError(f"sweep {spec.sweep}: seeds: no variant changes any stage, so no stage is swept: "
                              "name the first seeded stage with seeds_from (--seeds-from STAGE)")
        seeded = [n for n in base.stages if n in downstream_of(base, roots)]
        for m in members:
            m.recipe = _load(spec, raw, m.overrides + [f"stages.{s}.seed={m.seed}" for s in seeded],
                             f"variant {m.variant!r} seed {m.seed}")
    nodes: dict[tuple[str, str], Node] = {}
    for m in members:
        m.plans = plan_fingerprints(m.recipe.stages)
        want = needed_stages(m.recipe, spec.only or None)
        m.wanted = [n for n in m.recipe.stages if n in want]
        for n in m.wanted:
            key = (n, m.plans[n].fingerprint)
            node = nodes.setdefault(key, Node(n, key[1], [], [(u, m.plans[u].fingerprint)
                                                            for u in m.recipe.stages[n].needs]))
            node.members.append(m.name)
    used = {n for n, _ in nodes}
    return Sweep(spec, path, base, members, [n for n in swept if n in used], [n for n in seeded if n in used], nodes)


def load_sweep(config: Path, variants: list[str] | None = None, grid: list[str] | None = None,
               seeds: str | None = None, seeds_from: str | None = None, only: list[str] | None = None,
               name: str | None = None) -> Sweep:
    """A sweep file (options add to / replace its fields) or a recipe plus the options."""
    config = Path(config)
    if is_sweep_file(config):
        spec = load_spec(config)
        extra = spec_from_options(Path(spec.recipe), variants or [], grid or [], seeds, seeds_from, only or [], name)
        upd: dict[str, Any] = {"variants": {**spec.variants, **extra.variants}, "grid": {**spec.grid, **extra.grid}}
        upd |= {"seeds": extra.seeds} if seeds else {}
        upd |= {"seeds_from": seeds_from} if seeds_from else {}
        upd |= {"only": only} if only else {}
        upd |= {"sweep": name} if name else {}
        return expand(spec.model_copy(update=upd), config)
    return expand(spec_from_options(config, variants or [], grid or [], seeds, seeds_from, only or [], name))


# ---------------------------------------------------------------------------------------------- the record


def record_path(artifacts: Path, name: str) -> Path:
    return Path(artifacts) / "sweeps" / f"{name}.json"


def save_record(artifacts: Path, sweep: Sweep, **extra: Any) -> Path:
    """Write (atomically) the sweep's record, keeping what an earlier invocation added (its runs)."""
    path = record_path(artifacts, sweep.spec.sweep)
    old = read_record(path) or {}
    doc = {**old, **sweep.record(), **extra, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def all_records(artifacts: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((Path(artifacts) / "sweeps").glob("*.json")) if (r := read_record(p))]


def find_record(artifacts: Path, ref: str) -> dict[str, Any]:
    """A sweep's record by its name, its sweep file, or its MLflow sweep run id."""
    ref_path = Path(ref)
    if ref_path.suffix in (".yaml", ".yml") and ref_path.is_file() and is_sweep_file(ref_path):
        ref = load_spec(ref_path).sweep
    if re.match(SWEEP_NAME, ref) and (r := read_record(record_path(artifacts, ref))):
        return r
    for r in all_records(artifacts):
        if ref in (r.get("mlflow_run_ids") or []) or ref == r.get("mlflow_run_id"):
            return r
    known = ", ".join(r["sweep"] for r in all_records(artifacts)) or "none"
    raise RecipeError(f"no sweep {ref!r} in {Path(artifacts) / 'sweeps'} (sweeps there: {known})")


def referenced_by_sweeps(artifacts: Path) -> set[tuple[str, str]]:
    """{(stage, fingerprint[:16])} of every recorded sweep member: ``baton gc`` keeps them."""
    return {(s, fp[:16]) for r in all_records(artifacts) for m in r.get("members", [])
            for s, fp in m.get("fingerprints", {}).items()}


def status_rows(sweep: Sweep, artifacts: Path) -> list[dict[str, Any]]:
    """Per member and stage: fingerprint and state (``baton status SWEEP_FILE``)."""
    from flows.store import StageDir

    rows = []
    for m in sweep.members:
        for n in m.wanted:
            fp = m.plans[n].fingerprint
            state, step = StageDir(artifacts, n, fp).state()
            rows.append({"member": m.name, "name": n, "fingerprint": fp, "state": state, "step": step,
                         "shared": len(sweep.nodes[(n, fp)].members)})
    return rows


def threads_per_stage(max_concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // max_concurrency)
