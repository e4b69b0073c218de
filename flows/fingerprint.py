"""Stage fingerprints (DESIGN.md "Fingerprints and the artifact store").

fingerprint = sha256(canonical JSON of {kind, config minus runtime, code digest, upstream
fingerprints by name, external data digests, store format version}). The code digest covers the
stage kind's module and every project module it imports, transitively, AST-normalised: comments,
docstrings and formatting do not count; a changed line of code does.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from flows.inputs import _HashCache, cache_file, inputs_digest
from stages import UnknownKind, kind_module_name
from stages.contract import ExternalInput, StageConfig

STORE_FORMAT = 1
PROJECT_PACKAGES = ("stages",)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _module_file(name: str) -> Path | None:
    """Source file of project module ``name``, found on disk: importing ``stages.cnn`` just to hash it
    would import torch into a process that never trains. None when ``name`` is not a module (``X`` of
    ``from stages.contract import X``)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    for base in (spec.submodule_search_locations or []) if spec else []:
        p = Path(base).joinpath(*rest)
        for candidate in ([p.with_suffix(".py")] if rest else []) + [p / "__init__.py"]:
            if candidate.is_file():
                return candidate
    return None


def _project_imports(tree: ast.AST, module: str, packages: tuple[str, ...]) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in packages and _module_file(n) is not None:
                out.add(n)
    out.discard(module)
    return out


def source_digest(source: str) -> str:
    """Digest of Python source that ignores comments, docstrings and formatting."""
    return hashlib.sha256(ast.dump(_strip_docstrings(ast.parse(source)), annotate_fields=False).encode()).hexdigest()


@lru_cache(maxsize=None)
def _module_digest(name: str, packages: tuple[str, ...]) -> tuple[str, frozenset[str]]:
    """(digest, project imports) of one module, cached across processes by the file's stamp (flows.inputs):
    parsing and normalising ~40 modules is most of ``baton status``."""
    def compute(f: Path) -> list:
        source = f.read_text()
        return [source_digest(source), sorted(_project_imports(ast.parse(source), name, packages))]

    digest, deps = _code_cache().get(_module_file(name), compute, tag=f"|{name}|{','.join(packages)}")
    return digest, frozenset(deps)


@lru_cache(maxsize=None)
def _code_cache() -> _HashCache:
    return _HashCache(cache_file("code.json"))


def code_digest(kind: str) -> dict[str, str]:
    """{module: digest} for the kind's module and the project modules it imports (transitively). The
    project is baton's ``stages`` plus, for a kind from the user's package (``my_project.stages.x``), that
    package: its modules are followed like baton's own."""
    root = kind_module_name(kind)
    packages = tuple(dict.fromkeys((*PROJECT_PACKAGES, root.split(".")[0])))
    todo, seen = [root], {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        if _module_file(m) is None:
            raise UnknownKind(f"stage kind {kind!r}: module {m!r} not found (install the package, or name its "
                              "folder in the recipe's python_path)")
        digest, deps = _module_digest(m, packages)
        seen[m] = digest
        todo.extend(deps)
    _code_cache().save()
    return dict(sorted(seen.items()))


def data_digest(path: str | Path, kind: str = "dataset") -> Any:
    """Digest of one external input at ``path`` (flows.inputs: weights by content, dataset trees by
    name, size, mtime and ctime). A missing path digests as 'missing'."""
    return inputs_digest({"": ExternalInput(str(path), kind)})[""]


def fingerprint_payload(name: str, cfg: StageConfig, upstream: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": cfg.kind,
        "config": cfg.fingerprint_payload(),
        "code": code_digest(cfg.kind),
        "upstream": dict(sorted(upstream.items())),
        "data": inputs_digest(cfg.external_inputs()),
        "store_format": STORE_FORMAT,
    }


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


@dataclass(frozen=True)
class StagePlan:
    """What the flow knows about one stage before anything runs: its fingerprint (the store directory it
    owns) and the payload the fingerprint was computed from (written into the stage's config.json)."""

    name: str
    kind: str
    fingerprint: str
    payload: dict[str, Any]
    needs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint, "payload": self.payload,
                "needs": list(self.needs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StagePlan:
        return cls(d["name"], d["kind"], d["fingerprint"], d["payload"], tuple(d.get("needs", ())))


def plan_fingerprints(stages: dict[str, StageConfig]) -> dict[str, StagePlan]:
    """Fingerprints of every stage in topological order: {name: StagePlan}."""
    out: dict[str, StagePlan] = {}
    for name, cfg in stages.items():
        payload = fingerprint_payload(name, cfg, {u: out[u].fingerprint for u in cfg.needs})
        out[name] = StagePlan(name, cfg.kind, fingerprint(payload), payload, tuple(cfg.needs))
    return out
