"""Executing one stage: lock, cached?, tracker, run, LoggedModel, result.json.

``execute_stage`` runs inside the stage process (flows.worker). Under the stage directory's lock it
  - returns the stage's ``result.json`` if it is already complete (the truth: nothing trains), or
  - runs the stage kind's ``run(ctx)`` (which resumes from its newest checkpoint if an earlier run was
    killed), logs metrics, the LoggedModel and lineage to MLflow, and writes ``result.json`` last.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from flows.fingerprint import StagePlan, plan_fingerprints
from flows.store import StageDir
from stages import kind_module
from stages.contract import NullTracker, StageConfig, StageContext, StageError, StageResult, Tracker, seed_stage
from stages.fsio import remove_path, replace_dir, temp_path
from stages.recipe import Recipe

log = logging.getLogger("baton")
WEIGHTS_OUTPUTS = ("model", "tokenizer")  # upstream outputs that are weights (model inputs), not data


def stage_dirs(recipe: Recipe, artifacts: Path, plans: dict[str, StagePlan] | None = None) -> dict[str, StageDir]:
    """{stage: its store directory} for every stage of the recipe."""
    plans = plans if plans is not None else plan_fingerprints(recipe.stages)
    return {n: StageDir(Path(artifacts), n, p.fingerprint) for n, p in plans.items()}


def incomplete_kinds(recipe: Recipe, artifacts: Path, plans: dict[str, StagePlan] | None = None) -> list[str]:
    """The kinds of the stages that have no result.json yet (the ones that will need a process)."""
    dirs = stage_dirs(recipe, artifacts, plans)
    return sorted({c.kind for n, c in recipe.stages.items() if dirs[n].result() is None})


def cached_result(name: str, sd: StageDir, tracking, parent_id: str) -> StageResult | None:
    """The stage's result if it is complete (result.json is the truth): a child run of the parent run tagged
    ``baton.cached``, with the result's metrics and a link to the run that made it."""
    done = sd.result()
    if done is not None:
        log.info("[%s] cached: %s", name, sd.path)
        if tracking is not None:
            tracking.link_model(parent_id, done.info.get("mlflow_model_id"))
            tracking.finish_if_running(done.info.get("mlflow_run_id"), sd.path)
            try:
                run = tracking.log_cached_stage(parent_id, done, upstream_info(sd))
            except Exception as e:  # noqa: BLE001 - the stage's result stands; only its record in MLflow is lost
                log.warning("[%s] cached: could not record it in MLflow: %s", name, e)
                run = None
            tracking.client.set_tag(parent_id, f"stage.{name}",
                                    f"cached run={done.info.get('mlflow_run_id')}" + (f" as={run}" if run else ""))
    return done


def upstream_info(sd: StageDir) -> dict[str, dict]:
    """{upstream stage: fingerprint, MLflow run and LoggedModel} of a stage dir, from its config.json and the
    upstream result.json files (for run descriptions)."""
    from flows.lineage import read_node

    out = {}
    for u, fp in read_node(sd.path).upstream.items():
        res = StageDir(sd.path.parents[2], u, fp).result()
        info = res.info if res is not None else {}
        out[u] = {"fingerprint": fp, "mlflow_run_id": info.get("mlflow_run_id"),
                  "mlflow_model_id": info.get("mlflow_model_id")}
    return out


def _upstream(name: str, cfg: StageConfig, plans: dict[str, StagePlan], artifacts: Path
              ) -> tuple[dict[str, StageDir], dict[str, StageResult]]:
    dirs = {u: StageDir(artifacts, u, plans[u].fingerprint) for u in cfg.needs}
    results = {}
    for u, d in dirs.items():
        r = d.result()
        if r is None:
            raise StageError(f"stage {name!r}: upstream {u!r} is not complete in {d.path}")
        results[u] = r
    return dirs, results


def _open_tracker(name: str, sd: StageDir, resolved: dict, tracking, parent_id: str,
                  up_dirs: dict[str, StageDir], up_results: dict[str, StageResult]) -> tuple[Tracker, str | None]:
    """(tracker, MLflow run id): the stage's own run, continued if a killed run left its id in run.json."""
    if tracking is None:
        return NullTracker(), None
    from flows.tracking import MlflowTracker

    run_id = sd.run_id()
    if run_id is None or not tracking.reopen(run_id, parent_id):
        run_id = tracking.start_stage_run(parent_id, name, sd.fingerprint, resolved)
        sd.save_run_id(run_id)
        tracking.log_lineage(run_id, {u: r.info.get("mlflow_model_id") for u, r in up_results.items()}, {})
        tracking.describe_stage_run(run_id, name, sd.fingerprint, {
            u: {"fingerprint": r.fingerprint, "mlflow_run_id": r.info.get("mlflow_run_id"),
                "mlflow_model_id": r.info.get("mlflow_model_id")} for u, r in up_results.items()})
    tracking.client.set_tag(parent_id, f"stage.{name}", f"ran run={run_id}")
    return MlflowTracker(tracking.client, run_id), run_id


def _datasets_read(ctx: StageContext) -> dict[str, tuple[str, str]]:
    """{upstream/key: (path, digest)} of the upstream outputs the stage read (``ctx.input``), weights excepted:
    its dataset inputs. The digest is the upstream stage's fingerprint (its outputs are a function of it)."""
    return {f"{u}/{k}": (str(ctx.input(u, k)), ctx.upstream[u].fingerprint) for u, k in sorted(ctx.reads)
            if k not in WEIGHTS_OUTPUTS}


def _run(cfg: StageConfig, ctx: StageContext, tracking, run_id: str | None, nodes: dict | None = None) -> StageResult:
    """The stage's ``run(ctx)`` here, or with ``runtime.nproc_per_node`` > 1 on that many ranks launched from
    this process (stages.train.launch; rank 0 logs into the same MLflow run: one run per stage). ``nodes``
    (node 0 of a stage across several nodes, flows.cluster): this node's ranks join the others' at the
    rendezvous; global rank 0, on whichever node, tracks and leaves the result in the stage directory."""
    t0 = time.perf_counter()
    try:
        if cfg.runtime.ranks > 1 or nodes:
            from flows.tracking import rank_tracker
            from stages.train.launch import nodes_result_file, run_ranks

            tracker = partial(rank_tracker, tracking.uri, run_id) if tracking is not None else None
            if nodes:
                remove_path(nodes_result_file(ctx.stage_dir))
            res = run_ranks(ctx, tracker, **(nodes or {}))
            if nodes:  # global rank 0 may have been on another node
                res = _nodes_result(ctx, res)
        else:
            seed_stage(cfg)
            res = kind_module(cfg.kind).run(ctx)
        ctx.tracker.flush()
    except BaseException as e:
        if tracking is not None:
            ctx.tracker.flush()
            tracking.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    res.info["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _nodes_result(ctx: StageContext, res: StageResult | None) -> StageResult:
    """This node's result if it held global rank 0, else the one rank 0 left in the stage dir (removed)."""
    from stages.train.launch import nodes_result_file

    f = nodes_result_file(ctx.stage_dir)
    if res is None and not f.exists():
        raise RuntimeError(f"stage {ctx.name!r}: the ranks finished but global rank 0 (on another node) left no "
                           f"result in {f}; rerun to resume from the newest checkpoint")
    if res is None:
        res = StageResult.model_validate_json(f.read_text())
    remove_path(f)
    return res


def join_stage(name: str, cfg: StageConfig, plans: dict[str, StagePlan], artifacts: Path, tracking_uri: str | None,
               nodes: dict) -> None:
    """A node other than node 0 of a stage across several nodes (flows.cluster): start this node's ranks of the
    stage into the same stage directory, to meet node 0's at the rendezvous. Node 0's process holds the lock,
    the MLflow run (whose id it wrote to run.json before its ranks started: global rank 0, wherever it is,
    reads it from there) and writes result.json; nothing here writes besides the ranks."""
    from stages.train.launch import run_ranks

    sd = StageDir(artifacts, name, plans[name].fingerprint)
    up_dirs, up_results = _upstream(name, cfg, plans, artifacts)
    ctx = StageContext(name=name, config=cfg, stage_dir=sd.path, upstream=up_results,
                       upstream_dirs={u: d.path for u, d in up_dirs.items()}, fingerprint=sd.fingerprint,
                       tracker=NullTracker())
    from flows.tracking import stage_dir_tracker

    run_ranks(ctx, partial(stage_dir_tracker, tracking_uri, str(sd.path)) if tracking_uri else None, **nodes)


def _log_result(name: str, sd: StageDir, res: StageResult, ctx: StageContext, tracking, run_id: str) -> None:
    """The datasets it read, its final metrics and baselines once at its last step, and the weights as a
    LoggedModel carrying them (its id goes into result.json)."""
    tracker = ctx.tracker
    res.info["mlflow_run_id"] = run_id
    step = int(res.info.setdefault("steps", tracker.final_step()))
    datasets = _datasets_read(ctx)
    if datasets:
        tracking.log_lineage(run_id, {}, datasets)
    final = {**res.metrics, **{f"baseline/{k}": v for k, v in res.baselines.items()}}
    if "model" in res.outputs:
        res.info["mlflow_model_id"] = tracking.log_model(run_id, name, sd.fingerprint, sd.path / res.outputs["model"],
                                                         step, final, ctx.config.model_dump(mode="json",
                                                                                            exclude={"runtime"}),
                                                         tracker=tracker)
    else:
        tracker.log_final(final, step)


def _execute(name: str, cfg: StageConfig, plans: dict[str, StagePlan], artifacts: Path, tracking, parent_id: str,
             sd: StageDir, nodes: dict | None = None) -> StageResult:
    """Run the stage into ``sd`` (its directory, or a forced rerun's temp directory) and write result.json."""
    up_dirs, up_results = _upstream(name, cfg, plans, artifacts)
    resolved = cfg.model_dump(mode="json")
    sd.write_config(plans[name].payload, resolved)
    tracker, run_id = _open_tracker(name, sd, resolved, tracking, parent_id, up_dirs, up_results)
    ctx = StageContext(name=name, config=cfg, stage_dir=sd.path, upstream=up_results,
                       upstream_dirs={u: d.path for u, d in up_dirs.items()}, fingerprint=sd.fingerprint,
                       tracker=tracker)
    with tracking.system_metrics(run_id) if tracking is not None else nullcontext():
        res = _run(cfg, ctx, tracking, run_id, nodes)
    if tracking is not None:
        _log_result(name, sd, res, ctx, tracking, run_id)
        tracking.link_model(parent_id, res.info.get("mlflow_model_id"))
    sd.write_result(res)
    if tracking is not None:
        tracking.client.log_artifact(run_id, str(sd.path / "result.json"))
        tracking.client.log_artifact(run_id, str(sd.path / "config.json"))
        tracking.end_run(run_id, "FINISHED")
    log.info("[%s] done in %.1fs: %s", name, res.info["seconds"],
             ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()))
    return res


def _force(name: str, cfg: StageConfig, plans: dict[str, StagePlan], artifacts: Path, tracking, parent_id: str,
           sd: StageDir, old: StageResult) -> StageResult:
    """Rerun a complete stage into a fresh temp directory next to it (the store's temp-name rule) and swap
    it in once its result.json exists: until then, and after a crash, the old complete directory stays.
    The replaced MLflow run is tagged ``baton.replaced_by=<new run id>``."""
    new = sd.at(temp_path(sd.path))  # an earlier one that died went with sd.remove_stale_temps()
    remove_path(new.path)
    log.info("[%s] forced: rerunning into %s (the complete %s stays until it is done)", name, new.path.name,
             sd.path.name)
    res = _execute(name, cfg, plans, artifacts, tracking, parent_id, new)
    replace_dir(new.path, sd.path)
    old_run, new_run = old.info.get("mlflow_run_id"), res.info.get("mlflow_run_id")
    if tracking is not None and old_run and new_run:
        try:
            tracking.client.set_tag(old_run, "baton.replaced_by", new_run)
        except Exception as e:  # noqa: BLE001 - the old run may be gone from this store
            log.warning("[%s] could not tag replaced run %s: %s", name, old_run, e)
    return res


def _lost_lease() -> None:
    """A shared store's lease on this stage was taken over (this process stalled past its timeout): another
    process now writes the stage directory, so this one stops at once (flows.lease)."""
    import os
    import sys

    print("error: this stage's lease was taken over by another process (no heartbeat within the lease timeout); "
          "stopping so that only one process writes its directory", file=sys.stderr, flush=True)
    os._exit(1)


def execute_stage(name: str, cfg: StageConfig, plans: dict[str, StagePlan], artifacts: Path, tracking,
                  parent_id: str, force: bool = False, nodes: dict | None = None) -> tuple[dict, bool]:
    """Run stage ``name`` (config ``cfg``) under its directory lock. ``plans`` holds this stage's and its
    upstream stages' fingerprints; ``tracking`` is a flows.tracking.Tracking or None (no MLflow);
    ``force``: rerun it even if it is complete (see :func:`_force`); ``nodes``: this is node 0 of a stage
    across several nodes (:func:`_run`; not with ``force``: the other nodes could not know its temp directory).
    Returns (result as a dict, whether it was already complete)."""
    sd = StageDir(artifacts, name, plans[name].fingerprint)
    with sd.lock(on_lost=_lost_lease):
        sd.remove_stale_temps()  # a killed earlier run's half-written files (we hold the lock: nobody writes)
        old = sd.result() if force else None
        if old is not None and nodes:
            raise StageError(f"stage {name!r}: a forced rerun of a stage across runtime.nnodes="
                             f"{nodes['nnodes']} nodes is not supported; remove {sd.path} to rerun it")
        if old is not None:
            return _force(name, cfg, plans, artifacts, tracking, parent_id, sd, old).model_dump(mode="json"), False
        done = cached_result(name, sd, tracking, parent_id)  # another run may have finished it while we waited
        if done is not None:
            return done.model_dump(mode="json"), True
        return _execute(name, cfg, plans, artifacts, tracking, parent_id, sd, nodes).model_dump(mode="json"), False
