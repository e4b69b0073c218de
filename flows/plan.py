"""The plan of a run before anything runs (``baton run --dry-run``): per stage, cached or will run, and why.

A stale stage is explained by diffing the payload its fingerprint is made of (flows.fingerprint) against
the payload of the newest complete directory of the same stage name in the store (newest by result.json
mtime; the payload is in that directory's config.json): which config key (dotted, old -> new), which code
module, which upstream stage (its fingerprint changed) or which external data input differs.
:func:`payload_changes` is that diff, a pure function of two payloads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.fingerprint import StagePlan
from flows.store import StageDir, stage_paths
from stages.fsio import is_temp_name
from stages.recipe import Recipe, RecipeError

ABSENT = "<absent>"


@dataclass(frozen=True)
class Change:
    """One difference between two fingerprint payloads. ``what``: config, code, upstream, data, kind or
    store_format; ``key``: the dotted config key, module name, upstream stage name or data input key."""

    what: str
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        if self.what == "config":
            return f"config {self.key}: {_show(self.old)} -> {_show(self.new)}"
        if self.what == "code":
            return f"code {self.key} " + ("added" if self.old == ABSENT else "removed" if self.new == ABSENT else "changed")
        if self.what == "upstream":
            return f"upstream {self.key} changed (fingerprint {_short(self.old)} -> {_short(self.new)})"
        if self.what == "data":
            return f"data input {self.key} changed"
        return f"{self.what}: {_show(self.old)} -> {_show(self.new)}"

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "key": self.key, "old": self.old, "new": self.new, "text": str(self)}


def _show(v: Any) -> str:
    return v if v == ABSENT else json.dumps(v, default=str)


def _short(v: Any) -> str:
    return v[:16] if isinstance(v, str) and v != ABSENT else str(v)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(what: str, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    return [Change(what, k, old.get(k, ABSENT), new.get(k, ABSENT))
            for k in sorted(set(old) | set(new)) if old.get(k, ABSENT) != new.get(k, ABSENT)]


def payload_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """What differs between two fingerprint payloads (flows.fingerprint.fingerprint_payload), old -> new:
    kind, config keys (dotted), code modules, data inputs, upstream fingerprints, store format.

    >>> [str(c) for c in payload_changes({"config": {"train": {"lr": 1}}}, {"config": {"train": {"lr": 2}}})]
    ['config train.lr: 1 -> 2']
    """
    changes = _diff("kind", {"": old.get("kind")}, {"": new.get("kind")})
    changes += _diff("config", _flatten(old.get("config", {})), _flatten(new.get("config", {})))
    for what in ("code", "data", "upstream"):  # the stage's own changes first, then what it inherits
        changes += _diff(what, dict(old.get(what) or {}), dict(new.get(what) or {}))
    changes += _diff("store_format", {"": old.get("store_format")}, {"": new.get("store_format")})
    return changes


# ------------------------------------------------------------------------------------- the plan of a recipe


@dataclass(frozen=True)
class StageVerdict:
    """One stage of the plan. ``state``: cached, forced, partial (resumes from ``step``), stale (``changes``
    against the complete directory ``previous``) or never run."""

    name: str
    fingerprint: str
    state: str
    changes: tuple[Change, ...] = ()
    previous: str | None = None
    step: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def runs(self) -> bool:
        return self.state != "cached"

    def reasons(self) -> list[str]:
        if self.state == "partial":
            return [f"partial at step {self.step} (resumes)"]
        if self.state == "forced":
            return ["--force"]
        if self.state == "never run":
            return ["never run"]
        return [str(c) for c in self.changes] + list(self.notes)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "will_run": self.runs, "state": self.state,
                "reasons": self.reasons(), "changes": [c.to_json() for c in self.changes],
                "previous_dir": self.previous, "step": self.step}


def last_complete(artifacts: Path, stage: str, exclude: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(directory, fingerprint payload) of the newest complete directory of ``stage`` (by result.json mtime)."""
    best: tuple[float, Path] | None = None
    for d in stage_paths(artifacts).get(stage, []):
        f = d / "result.json"
        if d != exclude and not is_temp_name(d.name) and f.is_file() and (d / "config.json").is_file():
            t = f.stat().st_mtime
            best = max(best, (t, d)) if best else (t, d)
    if best is None:
        return None
    cfg = json.loads((best[1] / "config.json").read_text())
    return best[1], cfg.get("fingerprint_inputs", {})


def check_stage_names(recipe: Recipe, options: dict[str, list[str] | None]) -> None:
    """Refuse an option (``--only``, ``--force``) that names a stage the recipe does not have."""
    for opt, names in options.items():
        for name in names or []:
            if name not in recipe.stages:
                raise RecipeError(f"{opt} {name}: no such stage in {recipe.path} ({', '.join(recipe.stages)})")


def needed_stages(recipe: Recipe, only: list[str] | None) -> set[str]:
    """The stages to run: all of them, or the ``only`` ones and everything they need."""
    if not only:
        return set(recipe.stages)
    wanted: set[str] = set()
    stack = list(only)
    while stack:
        s = stack.pop()
        if s not in wanted:
            wanted.add(s)
            stack.extend(recipe.stages[s].needs)
    return wanted


def downstream_of(recipe: Recipe, stages: list[str] | set[str]) -> set[str]:
    """``stages`` and every stage that needs one of them, directly or not."""
    out = set(stages)
    for n, c in recipe.stages.items():  # topological order: an upstream is seen before its downstream
        if out.intersection(c.needs):
            out.add(n)
    return out


def stage_verdict(plan: StagePlan, artifacts: Path, forced: bool = False) -> StageVerdict:
    sd = StageDir(artifacts, plan.name, plan.fingerprint)
    state, step = sd.state()
    if state == "complete":
        return StageVerdict(plan.name, plan.fingerprint, "forced" if forced else "cached")
    if state == "partial":
        return StageVerdict(plan.name, plan.fingerprint, "partial", step=step)
    prev = last_complete(artifacts, plan.name, exclude=sd.path)
    if prev is None:
        return StageVerdict(plan.name, plan.fingerprint, "never run")
    changes = tuple(payload_changes(prev[1], plan.payload))
    notes = () if changes else (f"same inputs as {prev[0].name}, yet not complete here",)
    return StageVerdict(plan.name, plan.fingerprint, "stale", changes, prev[0].name, notes=notes)


def dry_run(recipe: Recipe, artifacts: Path, plans: dict[str, StagePlan], wanted: set[str],
            force: list[str] | None = None) -> list[StageVerdict]:
    """The plan of ``baton run`` for the ``wanted`` stages, in recipe order; nothing is run or written."""
    forced = downstream_of(recipe, force or [])
    return [stage_verdict(plans[n], Path(artifacts), n in forced) for n in recipe.stages if n in wanted]


def render(verdicts: list[StageVerdict]) -> str:
    width = max((len(v.name) for v in verdicts), default=0)
    lines = []
    for v in verdicts:
        head = f"  {v.name:<{width}}  {v.fingerprint[:16]}  {'will run' if v.runs else 'cached'}"
        reasons = v.reasons()
        lines.append(head + (f": {reasons[0]}" if len(reasons) == 1 else ""))
        lines += [f"  {'':<{width}}    - {r}" for r in reasons] if len(reasons) > 1 else []
    n = sum(v.runs for v in verdicts)
    lines.append(f"{n} of {len(verdicts)} stages will run")
    return "\n".join(lines)
