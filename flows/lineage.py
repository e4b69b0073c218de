"""Lineage, computed once: which stage execution fed which, with fingerprints, MLflow runs and LoggedModels.

The stage dirs are the source (DESIGN.md "Fingerprints and the artifact store"): ``config.json`` holds the
fingerprint payload with the upstream fingerprints by stage name, ``result.json`` the metrics and the
LoggedModel id, ``run.json`` the MLflow run id. MLflow, when the store has one, adds run status and times.
``baton dag``, ``baton lineage`` and ``baton gc`` render or use what this module computes.

    dag = plan_dag(load_recipe("configs/vlp-micro.yaml"), Path("artifacts"))
    print(render_tree(dag))
    print(render_chain(lineage_chain(Path("artifacts"), "vqa")))
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.store import StageDir, describe_state, stage_paths
from stages.fsio import is_temp_name
from stages.recipe import Recipe, RecipeError

log = logging.getLogger("baton")


@dataclass
class RunInfo:
    """The MLflow side of a stage execution (absent when the store has no tracking)."""

    status: str
    start_ms: int | None
    end_ms: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    model_status: str | None = None


@dataclass
class Node:
    """One stage execution: a stage dir ``stages/<stage>/<fingerprint[:16]>``."""

    stage: str
    kind: str
    fingerprint: str
    path: Path
    state: str  # complete | partial | started | not started (StageDir.state) | missing (the dir is gone)
    step: int | None  # the newest checkpoint's (partial) or the result's (complete)
    upstream: dict[str, str]  # {stage: fingerprint}
    run_id: str | None = None
    model_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow: RunInfo | None = None

    @property
    def described(self) -> str:
        """The state in words: complete / partial at step k / started, no checkpoint / not started / missing."""
        return describe_state(self.state, self.step)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"path": str(self.path)}


@dataclass
class Dag:
    recipe: str
    nodes: dict[str, Node]  # topological order

    def edges(self) -> list[tuple[str, str]]:
        return [(u, n.stage) for n in self.nodes.values() for u in n.upstream]

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "nodes": [n.to_json() for n in self.nodes.values()],
                "edges": [list(e) for e in self.edges()]}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_node(path: Path) -> Node:
    """The node of a stage dir, from its files alone (no MLflow). A dir that is not there is 'missing'."""
    path = Path(path)
    cfg = _read_json(path / "config.json") or {}
    inputs = cfg.get("fingerprint_inputs", {})
    stage, fp = cfg.get("stage", path.parent.name), cfg.get("fingerprint", path.name)
    sd = StageDir(path.parents[2], stage, fp)
    state, step = sd.state() if path.is_dir() else ("missing", None)
    res = _read_json(path / "result.json") or {}
    run = _read_json(path / "run.json") or {}
    return Node(stage=stage, kind=inputs.get("kind", cfg.get("resolved", {}).get("kind", "?")), fingerprint=fp,
                path=path, state=state, step=step, upstream=dict(inputs.get("upstream", {})),
                run_id=run.get("mlflow_run_id") or res.get("info", {}).get("mlflow_run_id"),
                model_id=res.get("info", {}).get("mlflow_model_id"), metrics=res.get("metrics", {}))


def stage_path(artifacts: Path, stage: str, fingerprint: str) -> Path:
    return StageDir(artifacts, stage, fingerprint).path


def scan_store(artifacts: Path) -> list[Node]:
    """Every stage dir under ``artifacts/stages`` (temp names of interrupted renames left out)."""
    return [read_node(d) for dirs in stage_paths(artifacts).values() for d in dirs if not is_temp_name(d.name)]


def plan_dag(recipe: Recipe, artifacts: Path) -> Dag:
    """The recipe's DAG as planned now: every stage with its fingerprint and its state in ``artifacts``."""
    from flows.fingerprint import plan_fingerprints

    nodes = {}
    for name, plan in plan_fingerprints(recipe.stages).items():
        fp = plan.fingerprint
        node = read_node(stage_path(artifacts, name, fp))
        if node.state == "missing":
            node.state = "not started"
        # the plan knows kind and upstream even when the dir (or its config.json) is not there yet
        node.stage, node.kind, node.fingerprint, node.upstream = name, plan.kind, fp, dict(plan.payload["upstream"])
        nodes[name] = node
    return Dag(recipe=recipe.name, nodes=nodes)


def _client(artifacts: Path):
    if not (Path(artifacts) / "mlflow.db").exists():
        return None
    import fcntl

    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    with open(Path(artifacts) / ".mlflow-init.lock", "w") as lock:  # not while a run migrates the db (Tracking)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=tracking_uri(artifacts))


def attach_mlflow(nodes: list[Node], artifacts: Path, client=None) -> None:
    """Fill ``node.mlflow`` from the store's MLflow runs and LoggedModels (no-op without mlflow.db)."""
    client = client or _client(artifacts)
    if client is None:
        return
    for n in nodes:
        if not n.run_id:
            continue
        try:
            run = client.get_run(n.run_id)
        except Exception:  # noqa: BLE001 - MlflowException: deleted, or another store
            n.mlflow = RunInfo(status="gone", start_ms=None, end_ms=None)
            continue
        n.mlflow = RunInfo(status=run.info.status, start_ms=run.info.start_time, end_ms=run.info.end_time,
                           metrics=dict(run.data.metrics))
        if n.model_id:
            try:
                n.mlflow.model_status = str(client.get_logged_model(n.model_id).status)
            except Exception:  # noqa: BLE001
                n.mlflow.model_status = "gone"


def _from_mlflow(artifacts: Path, ref: str, client) -> Path | None:
    """Stage dir of an MLflow stage run id or LoggedModel id, by their baton.stage / baton.fingerprint tags."""
    if client is None:
        return None
    for get in (client.get_run, client.get_logged_model):
        try:
            obj = get(ref)
        except Exception as e:  # noqa: BLE001 - not this kind of id
            log.debug("lineage %s: %s", ref, e)
            continue
        tags = obj.data.tags if hasattr(obj, "data") else obj.tags
        if "baton.stage" in tags and "baton.fingerprint" in tags:
            return stage_path(artifacts, tags["baton.stage"], tags["baton.fingerprint"])
        raise RecipeError(f"lineage {ref}: MLflow {'run' if hasattr(obj, 'data') else 'model'} {ref} is not a "
                          f"baton stage's (no baton.stage/baton.fingerprint tags; a parent run?)")
    return None


def find_node(artifacts: Path, ref: str, recipe: Recipe | None = None, client=None) -> Node:
    """The stage execution that ``ref`` names: a stage dir path, an MLflow stage run id, a LoggedModel id,
    or a stage name (with ``recipe``: its planned fingerprint; without: its newest complete dir)."""
    artifacts = Path(artifacts)
    if (Path(ref) / "config.json").is_file():
        return read_node(Path(ref))
    if recipe is not None and ref in recipe.stages:
        return plan_dag(recipe, artifacts).nodes[ref]
    nodes = scan_store(artifacts)
    hits = [n for n in nodes if ref in (n.run_id, n.model_id)]
    if hits:
        return hits[0]
    named = sorted((n for n in nodes if n.stage == ref and n.state == "complete"),
                   key=lambda n: (n.path / "result.json").stat().st_mtime)
    if named:
        return named[-1]
    path = _from_mlflow(artifacts, ref, client or _client(artifacts))
    if path is not None:
        return read_node(path)
    raise RecipeError(f"lineage {ref}: not a stage dir, a stage run id, a LoggedModel id or a stage with a "
                      f"complete dir in {artifacts / 'stages'}" + (f" or in recipe {recipe.name}" if recipe else ""))


def lineage_chain(artifacts: Path, ref: str, recipe: Recipe | None = None, mlflow: bool = True) -> list[Node]:
    """The node ``ref`` names and every stage execution upstream of it, roots first (topological order)."""
    client = _client(artifacts) if mlflow else None
    start = find_node(artifacts, ref, recipe, client)
    seen: dict[str, Node] = {}

    def visit(n: Node) -> None:
        if n.fingerprint in seen:
            return
        for stage, fp in sorted(n.upstream.items()):
            up = read_node(stage_path(artifacts, stage, fp))
            up.stage, up.fingerprint = stage, fp  # a gc'd (missing) dir still names what it was
            visit(up)
        seen[n.fingerprint] = n

    visit(start)
    chain = list(seen.values())
    if client is not None:
        attach_mlflow(chain, artifacts, client)
    return chain


def _depths(dag: Dag) -> dict[str, int]:
    depth: dict[str, int] = {}
    for name, n in dag.nodes.items():  # topological order: upstream depths are known
        depth[name] = 1 + max((depth[u] for u in n.upstream if u in depth), default=-1)
    return depth


def render_tree(dag: Dag) -> str:
    """One line per stage in run order, indented by depth: stage, kind, fingerprint[:12], state, needs."""
    depth = _depths(dag)
    width = max((2 * depth[s] + len(s) for s in dag.nodes), default=0) + 2
    kw = max((len(n.kind) for n in dag.nodes.values()), default=0) + 2
    lines = [f"recipe {dag.recipe}"]
    for name, n in dag.nodes.items():
        label = ("  " * (depth[name] - 1) + "└ " if depth[name] else "") + name
        needs = f"  <- {', '.join(n.upstream)}" if n.upstream else ""
        lines.append(f"  {label:<{width}}{n.kind:<{kw}}{n.fingerprint[:12]}  {n.described}{needs}")
    return "\n".join(lines)


def render_dot(dag: Dag) -> str:
    """Graphviz text: ``baton dag CONFIG --dot | dot -Tsvg > dag.svg``."""
    colour = {"complete": "palegreen", "not started": "white"}
    lines = [f'digraph "{dag.recipe}" {{', "  rankdir=LR;", "  node [shape=box, style=filled];"]
    for name, n in dag.nodes.items():
        fill = colour.get(n.state, "khaki")
        lines.append(f'  "{name}" [label="{name} ({n.kind})\\n{n.fingerprint[:12]}\\n{n.described}", fillcolor={fill}];')
    lines += [f'  "{u}" -> "{d}";' for u, d in dag.edges()]
    return "\n".join(lines + ["}"])


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def render_chain(chain: list[Node]) -> str:
    """The lineage of ``chain[-1]``: each upstream stage execution with its run, model and metrics."""
    lines = [f"lineage of {chain[-1].stage} {chain[-1].fingerprint[:12]} ({len(chain)} stage executions, roots first)"]
    for n in chain:
        run = n.run_id or "-"
        if n.mlflow is not None:
            run += f" ({n.mlflow.status})"
        model = (n.model_id or "-") + (f" ({n.mlflow.model_status})" if n.mlflow and n.mlflow.model_status else "")
        needs = ", ".join(f"{s}@{fp[:12]}" for s, fp in n.upstream.items()) or "-"
        lines += [f"  {n.stage} ({n.kind})  {n.fingerprint[:12]}  {n.described}",
                  f"      needs {needs}", f"      run {run}   model {model}",
                  f"      dir {n.path}"] + ([f"      metrics {_fmt_metrics(n.metrics)}"] if n.metrics else [])
    return "\n".join(lines)
