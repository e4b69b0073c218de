"""What one invocation leaves for a person to look at, once its stages are done (or failed):

- on the MLflow parent run: each stage's final metrics as ``<stage>/<metric>`` (so invocations compare in
  the chart view), a description with a row per stage linking its run, and ``lineage.svg`` (flows.picture)
  with ``lineage.json`` (flows.lineage's DAG) at its artifact root;
- on the Prefect flow run: a table artifact, a row per stage (Ran/Cached, fingerprint, seconds, key metrics,
  its MLflow run's address).

Both are best effort: a failure here is logged, the invocation's result stands.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from flows.lineage import Dag, plan_dag
from flows.picture import draw_lineage, key_metric
from flows.tracking import ML_LAYOUT
from stages.recipe import Recipe

log = logging.getLogger("baton")


def mlflow_ui_url() -> str:
    """Where `baton ui` serves MLflow (``BATON_MLFLOW_UI_URL``, default its default address)."""
    return os.environ.get("BATON_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def stage_rows(dag: Dag, outcome: dict[str, str], seconds: dict[str, float], runs: dict[str, str],
               experiment_id: str | None) -> list[dict[str, Any]]:
    """A row per stage of the invocation, in recipe order."""
    rows = []
    for name, n in dag.nodes.items():
        if name not in outcome:
            continue
        run = runs.get(name) or n.run_id
        link = f"#/experiments/{experiment_id}/runs/{run}{ML_LAYOUT}"
        km = key_metric({k: v for k, v in n.metrics.items() if k.startswith("val/")} or n.metrics)
        rows.append({"stage": name, "state": outcome[name].capitalize(), "fingerprint": n.fingerprint[:16],
                     "seconds": round(seconds[name], 1) if name in seconds else "",
                     "key metrics": ", ".join(f"{k}={v:.4g}" for k, v in list(n.metrics.items())[:4]),
                     "headline": f"{km[0]}={km[1]:.4g}" if km else "",
                     "mlflow run": f"{mlflow_ui_url()}/{link}" if run and experiment_id else ""})
    return rows


def publish(recipe: Recipe, art: Path, outcome: dict[str, str], seconds: dict[str, float], runs: dict[str, str],
            tracking, parent_id: str) -> None:
    """The parent run's metrics, description and lineage picture; the flow run's table artifact."""
    try:
        dag = plan_dag(recipe, art)
    except Exception as e:  # noqa: BLE001
        log.warning("lineage of this invocation: %s", e)
        return
    rows = stage_rows(dag, outcome, seconds, runs, tracking.experiment_id if tracking else None)
    if tracking is not None:
        try:
            _to_parent_run(dag, rows, outcome, seconds, tracking, parent_id)
        except Exception as e:  # noqa: BLE001 - MLflow down: the stages' results stand
            log.warning("MLflow parent run %s: could not log the invocation's summary: %s", parent_id, e)
    try:
        _to_flow_run(recipe, rows)
    except Exception as e:  # noqa: BLE001
        log.warning("Prefect: could not create the stages table artifact: %s", e)


def _to_parent_run(dag: Dag, rows: list[dict], outcome: dict[str, str], seconds: dict[str, float], tracking,
                   parent_id: str) -> None:
    from flows.tracking import MlflowTracker

    MlflowTracker(tracking.client, parent_id).log_final(
        {f"{n}/{k}": v for n, node in dag.nodes.items() if n in outcome for k, v in node.metrics.items()}, 0)
    note = ["| stage | state | fingerprint | seconds | headline | run |", "|---|---|---|---|---|---|"]
    note += [f"| {r['stage']} | {r['state']} | `{r['fingerprint'][:12]}` | {r['seconds']} | {r['headline']} | "
             + (f"[{r['mlflow run'].rsplit('/', 1)[-1][:8]}]({r['mlflow run'].split('/', 3)[-1]})" if r["mlflow run"]
                else "-") + " |" for r in rows]  # the link relative to the UI: "#/experiments/..."
    tracking.client.set_tag(parent_id, "mlflow.note.content", "\n".join(note + ["", "Lineage: `lineage.svg`"]))
    with tempfile.TemporaryDirectory(prefix="baton-lineage-") as tmp:
        svg = draw_lineage(dag, outcome, seconds, Path(tmp) / "lineage.svg")
        tracking.client.log_artifact(parent_id, str(svg))
    tracking.client.log_dict(parent_id, dag.to_json(), "lineage.json")


def _to_flow_run(recipe: Recipe, rows: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    key = "stages-" + re.sub(r"[^a-z0-9-]+", "-", recipe.name.lower()).strip("-")
    create_table_artifact(rows, key=key, description=f"recipe **{recipe.name}**: every stage of this flow run "
                                                     f"(Ran / Cached), its fingerprint, seconds, metrics, MLflow run")
