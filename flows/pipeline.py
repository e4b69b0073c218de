"""The Prefect flow: one task per stage, wired by the recipe's DAG.

The flow reads like the recipe: validate, fingerprint every stage up front (fingerprints depend
only on configs, code and upstream fingerprints), then submit each stage as a task that waits for
its ``needs``. A task takes the stage directory's lock and then either
  - finds ``result.json`` (the truth) and returns a ``Cached`` state with it: nothing trains, or
  - runs the stage (resuming from its newest checkpoint if an earlier run was killed), logs the
    LoggedModel and lineage, and writes ``result.json`` last.
Independent stages run concurrently on a thread pool (``max_concurrency`` in the recipe).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flows.fingerprint import plan_fingerprints
from flows.store import StageDir
from stages import kind_module
from stages.base import StageContext, StageError, StageResult
from stages.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger("baton")

# Quiet, fast embedded Prefect: no analytics, no UI build, no background services a single local
# run does not need (they poll SQLite and cause "database is locked" noise).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "baton",
    "PREFECT_LOGGING_LOG_PRINTS": "false",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
}


def configure_prefect(artifacts: Path) -> None:
    """Set before Prefect is imported; anything the user set (e.g. PREFECT_API_URL) wins."""
    os.environ.setdefault("PREFECT_HOME", str((Path(artifacts) / "prefect").resolve()))
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def stage_dirs(recipe: Recipe, artifacts: Path) -> dict[str, StageDir]:
    fps = plan_fingerprints(recipe.stages)
    return {n: StageDir(artifacts, n, fp) for n, (fp, _) in fps.items()}


def _is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: config and data errors are final, anything else may be retried."""
    try:
        state.result()
    except (StageError, RecipeError, ValueError, KeyError, TypeError):
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


def execute_stage(name: str, recipe: Recipe, fps: dict, artifacts: Path, tracking, parent_id: str):
    """Body of a stage's Prefect task. Returns the StageResult (as a dict) or a Cached state."""
    from prefect.states import Completed

    cfg = recipe.stages[name]
    fp, payload = fps[name]
    sd = StageDir(artifacts, name, fp)
    with sd.lock():
        done = sd.result()
        if done is not None:
            log.info("[%s] cached: %s", name, sd.path)
            if tracking is not None:
                tracking.client.set_tag(parent_id, f"stage.{name}", f"cached run={done.info.get('mlflow_run_id')}")
            return Completed(name="Cached", data=done.model_dump(mode="json"),
                             message=f"result.json present in {sd.path}")
        upstream = {u: StageDir(artifacts, u, fps[u][0]) for u in cfg.needs}
        up_results = {}
        for u, d in upstream.items():
            r = d.result()
            if r is None:
                raise StageError(f"stage {name!r}: upstream {u!r} is not complete in {d.path}")
            up_results[u] = r
        resolved = cfg.model_dump(mode="json")
        sd.write_config(payload, resolved)

        run_id = sd.run_id()
        if tracking is not None:
            if run_id is None or not tracking.reopen(run_id, parent_id):
                run_id = tracking.start_stage_run(parent_id, name, fp, resolved)
                sd.save_run_id(run_id)
                tracking.log_lineage(
                    run_id,
                    {u: r.info.get("mlflow_model_id") for u, r in up_results.items()},
                    {f"{u}/{k}": (str(upstream[u].path / v), r.fingerprint) for u, r in up_results.items()
                     if "mlflow_model_id" not in r.info for k, v in r.outputs.items()})
            from flows.tracking import MlflowTracker

            tracker = MlflowTracker(tracking.client, run_id)
            tracking.client.set_tag(parent_id, f"stage.{name}", f"ran run={run_id}")
        else:
            from stages.base import NullTracker

            tracker = NullTracker()
        ctx = StageContext(name=name, config=cfg, stage_dir=sd.path, upstream=up_results,
                           upstream_dirs={u: d.path for u, d in upstream.items()}, fingerprint=fp, tracker=tracker)
        t0 = time.perf_counter()
        try:
            res: StageResult = kind_module(cfg.kind).run(ctx)
            tracker.flush()
        except BaseException:
            if tracking is not None:
                tracker.flush()
                tracking.end_run(run_id, "FAILED")
            raise
        res.info["seconds"] = round(time.perf_counter() - t0, 2)
        if tracking is not None:
            res.info["mlflow_run_id"] = run_id
            step = int(res.info.get("steps", 0))
            tracker.log_metrics({**res.metrics, **{f"baseline/{k}": v for k, v in res.baselines.items()}}, step=step)
            tracker.flush()
            if "model" in res.outputs:
                res.info["mlflow_model_id"] = tracking.log_model(run_id, name, fp, sd.path / res.outputs["model"],
                                                                 step, res.metrics)
        sd.write_result(res)
        if tracking is not None:
            tracking.client.log_artifact(run_id, str(sd.path / "result.json"))
            tracking.client.log_artifact(run_id, str(sd.path / "config.json"))
            tracking.end_run(run_id, "FINISHED")
        log.info("[%s] done in %.1fs: %s", name, res.info["seconds"],
                 ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()))
        return res.model_dump(mode="json")


def build_flow():
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @flow(name="baton", log_prints=False, validate_parameters=False)
    def baton_pipeline(recipe_path: str, recipe_snapshot: dict, artifacts: str, only: list[str] | None = None,
                       track: bool = True) -> dict[str, Any]:
        """Run (or resume) every stage of a recipe; complete stages are Cached."""
        from prefect.runtime import flow_run

        recipe = load_recipe(recipe_path, raw=recipe_snapshot)
        art = Path(artifacts)
        fps = plan_fingerprints(recipe.stages)
        tracking, parent_id = None, ""
        if track:
            from flows.tracking import Tracking

            tracking = Tracking(art, recipe.name)
            parent_id = tracking.start_parent(f"{recipe.name}@{time.strftime('%Y%m%d-%H%M%S')}", {
                "baton.recipe": str(recipe_path), "baton.prefect_flow_run_id": str(flow_run.id or ""),
                **{f"fingerprint.{n}": fp for n, (fp, _) in fps.items()}})
            import yaml
            tracking.client.log_text(parent_id, yaml.safe_dump(recipe_snapshot, sort_keys=False), "recipe.yaml")
        wanted = set(recipe.stages)
        if only:
            wanted = set()
            for n in only:  # a stage and everything it needs
                stack = [n]
                while stack:
                    s = stack.pop()
                    if s not in wanted:
                        wanted.add(s)
                        stack.extend(recipe.stages[s].needs)
        futures = {}
        for name, cfg in recipe.stages.items():
            if name not in wanted:
                continue

            def run_one(stage: str) -> Any:  # the recipe, tracking client etc. stay out of Prefect's parameters
                return execute_stage(stage, recipe, fps, art, tracking, parent_id)

            t = task(run_one, name=f"stage-{cfg.kind}", task_run_name=name, retries=recipe.retries,
                     retry_delay_seconds=5, retry_condition_fn=_is_transient, cache_policy=None,
                     persist_result=False)
            futures[name] = t.submit(name, wait_for=[futures[u] for u in cfg.needs if u in futures])
        results, failed = {}, None
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except BaseException as e:  # noqa: BLE001
                failed = failed or (name, e)
        if tracking is not None:
            tracking.end_run(parent_id, "FAILED" if failed else "FINISHED")
        if failed:
            raise failed[1]
        return {"results": results, "parent_run_id": parent_id}

    return baton_pipeline


def run_pipeline(recipe: Recipe, artifacts: Path, only: list[str] | None = None, track: bool = True) -> dict[str, Any]:
    configure_prefect(artifacts)
    from prefect.task_runners import ThreadPoolTaskRunner

    flow = build_flow().with_options(task_runner=ThreadPoolTaskRunner(max_workers=recipe.max_concurrency),
                                     flow_run_name=f"{recipe.name}")
    return flow(str(recipe.path), recipe.raw, str(Path(artifacts).resolve()), only, track)
