"""The Prefect flow: one task per stage, wired by the recipe's DAG.

The flow reads like the recipe: validate, fingerprint every stage up front (fingerprints depend
only on configs, code and upstream fingerprints), open the MLflow parent run, then submit each stage
as a task once the stages it ``needs`` are done. A task finds the stage complete (``result.json``, the
truth: a ``Cached`` state) or runs it in its own process (flows.worker, which calls flows.execute).
Independent stages run concurrently, at most ``max_concurrency`` at a time.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows import interrupt
from flows.cluster import on_cluster, refuse_before_connecting
from flows.execute import cached_result, incomplete_kinds
from flows.fingerprint import StagePlan, plan_fingerprints
from flows.invocation import publish
from flows.plan import check_stage_names, downstream_of, needed_stages
from flows.progress import live_bars
from flows.prefect_env import configure_prefect, hold_flow_run_lock
from flows.store import StageDir
from flows.worker import prewarm_workers, run_stage_process, write_snapshot
from stages.contract import StageError
from stages.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger("baton")


def _is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: config and data errors are final, anything else may be retried."""
    try:
        state.result()
    except (StageError, RecipeError, ValueError, KeyError, TypeError):
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


def _threads_per_stage(recipe: Recipe, wanted: set[str]) -> dict[str, int]:
    """CPU threads for each stage's process: a stage that may overlap another (neither needs the
    other) gets cores / max_concurrency, so concurrent stages do not oversubscribe the cores."""
    ancestors: dict[str, set[str]] = {}
    for n, c in recipe.stages.items():
        ancestors[n] = set(c.needs).union(*(ancestors[u] for u in c.needs)) if c.needs else set()
    cores = os.cpu_count() or 1
    out = {}
    for n in wanted:
        overlaps = any(m != n and m not in ancestors[n] and n not in ancestors[m] for m in wanted)
        out[n] = max(1, cores // recipe.max_concurrency) if overlaps and recipe.max_concurrency > 1 else cores
    return out


def _kinds_to_run(recipe: Recipe, art: Path, plans: dict[str, StagePlan] | None, force: list[str] | None
                  ) -> list[str]:
    """The kinds of the stages that will need a process: the incomplete ones and the forced ones."""
    forced = {recipe.stages[n].kind for n in downstream_of(recipe, force or [])}
    return sorted(set(incomplete_kinds(recipe, art, plans)) | forced)


def start_tracking(recipe: Recipe, recipe_path: str, art: Path, plans: dict[str, StagePlan], flow_run_id: str):
    """(Tracking, parent run id): the MLflow parent run of this invocation, with the recipe attached."""
    import yaml

    from flows.tracking import Tracking

    tracking = Tracking(art, recipe.name)
    parent_id = tracking.start_parent(f"{recipe.name}@{time.strftime('%Y%m%d-%H%M%S')}", {
        "baton.recipe": str(recipe_path), "baton.prefect_flow_run_id": flow_run_id,
        **{f"fingerprint.{n}": p.fingerprint for n, p in plans.items()}})
    tracking.client.log_text(parent_id, yaml.safe_dump(recipe.raw, sort_keys=False), "recipe.yaml")
    return tracking, parent_id


class StageTask:
    """The body of one stage's Prefect task: Cached if complete, else the stage in its own process.
    (The recipe, tracking client etc. stay out of Prefect's task parameters.)"""

    def __init__(self, art: Path, plans: dict[str, StagePlan], tracking, parent_id: str, snapshot: Path,
                 threads: dict[str, int], max_concurrency: int, forced: set[str] = frozenset()):
        self.art, self.plans, self.tracking, self.parent_id = art, plans, tracking, parent_id
        self.forced = forced
        self.snapshot, self.threads = snapshot, threads
        self.slots = threading.Semaphore(max_concurrency)
        self.launchers: dict[str, Callable[..., bool]] = {}  # stage -> its launch, if not run_stage_process
        self.outcome: dict[str, str] = {}  # stage -> ran | cached | failed (for flows.invocation)
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> Any:
        t0 = time.perf_counter()
        try:
            out = self._stage(stage)
        except BaseException:
            self.outcome[stage] = "failed"
            raise
        finally:
            self.seconds[stage] = time.perf_counter() - t0
        state_name = getattr(out, "name", None)
        self.outcome[stage] = {"Cached": "cached", "Cancelled": "not run", None: "ran"}.get(state_name, "failed")
        return out

    def _stage(self, stage: str) -> Any:
        from prefect.states import Cancelled, Completed

        sd = StageDir(self.art, stage, self.plans[stage].fingerprint)
        done = None
        if stage not in self.forced:  # a forced stage's process reruns it (flows.execute._force)
            with sd.lock():
                sd.remove_stale_temps()
                done = cached_result(stage, sd, self.tracking, self.parent_id)
        if done is None:
            try:
                with self.slots:
                    if interrupt.requested():
                        return Cancelled(message=f"stage {stage!r} not started: interrupted")
                    launch = self.launchers.get(stage, run_stage_process)
                    was_complete = launch(stage, self.snapshot, self.art, self.parent_id, self.threads[stage])
            except interrupt.Interrupted as e:  # Ctrl-C: the stage stopped where it was (not a failure, no retry)
                interrupt.stage_stopped(str(e))
                return Cancelled(message=str(e))
            done = sd.result()
            if done is None:
                raise RuntimeError(f"stage {stage!r}: worker finished but {sd.path}/result.json is missing")
            if not was_complete:
                return done.model_dump(mode="json")
        return Completed(name="Cached", data={**done.model_dump(mode="json"), "cached": True},
                         message=f"result.json present in {sd.path}")


def run_in_order(recipe: Recipe, wanted: set[str], submit: Callable[[str, list], Any]
                 ) -> tuple[dict[str, Any], tuple[str, BaseException] | None]:
    """:func:`run_graph` over the recipe's wanted stages. Returns ({stage: result}, the first failure or None)."""
    pending = [n for n in recipe.stages if n in wanted]
    return run_graph(pending, {n: [u for u in recipe.stages[n].needs if u in wanted] for n in pending}, submit)


def run_graph(order: list, needs: dict[Any, list], submit: Callable[[Any, list], Any]
              ) -> tuple[dict[Any, Any], tuple[Any, BaseException] | None]:
    """Submit every node at once, in topological ``order``, each waiting for the futures of the nodes it
    ``needs`` (``wait_for``): the Prefect UI shows the whole graph from the start, nodes not yet started as
    Pending (a task thread waiting on its upstream costs nothing: stage processes do the work; the task
    runner has a thread per node). A failed node's downstream nodes are not run (Prefect leaves them
    NotReady). Returns ({node: result}, the first failure or None)."""
    futures: dict[Any, Any] = {}
    pending = list(order)
    results: dict[Any, Any] = {}
    failed, skipped = None, set()
    while True:
        if interrupt.requested():  # Ctrl-C: nothing new starts
            skipped.update(pending)
            pending.clear()
        for name in list(pending):
            if any(u in skipped for u in needs[name]):
                pending.remove(name)
                skipped.add(name)
                log.warning("[%s] not run: an upstream stage failed", name)
            elif all(u in futures for u in needs[name]):
                pending.remove(name)
                futures[name] = submit(name, [futures[u] for u in needs[name]])
        open_ = [n for n in futures if n not in results and n not in skipped]
        running = [n for n in open_ if not _done(futures[n])]
        finished = [n for n in open_ if n not in running]
        for name in finished:
            if any(u in skipped for u in needs[name]):  # Prefect did not run it (NotReady)
                skipped.add(name)
                log.warning("[%s] not run: an upstream stage failed", name)
                continue
            try:
                results[name] = futures[name].result()
            except BaseException as e:  # noqa: BLE001 - re-raised by the flow
                failed = failed or (name, e)
                skipped.add(name)
        if not running and not finished and not any(all(u in futures for u in needs[n]) for n in pending):
            return results, failed
        if running and not finished:
            futures[running[0]].wait(timeout=0.2)


def _done(future) -> bool:
    """Whether a Prefect future's work has finished: a thread's concurrent future, or a Ray task's ObjectRef
    (prefect-ray)."""
    wrapped = future.wrapped_future
    if hasattr(wrapped, "done"):
        return wrapped.done()
    import ray

    return bool(ray.wait([wrapped], timeout=0, fetch_local=False)[0])


def _stage_task(recipe: Recipe, art: Path, plans: dict[str, StagePlan], tracking, parent_id: str, snapshot: Path,
                wanted: set[str], forced: set[str], cluster: str | None):
    """The body of every stage task: in threads of this process, or on Ray nodes (flows.cluster)."""
    if not cluster:
        return StageTask(art, plans, tracking, parent_id, snapshot, _threads_per_stage(recipe, wanted),
                         recipe.max_concurrency, forced)
    from flows.cluster import RayStageTask, multi_node_launchers, threads_per_stage

    task = StageTask(art, plans, tracking, parent_id, snapshot, threads_per_stage(recipe, wanted),
                     len(recipe.stages), forced)
    task.launchers = multi_node_launchers(recipe, wanted)
    return RayStageTask(task, recipe.name)


def _submitter(recipe: Recipe, run_stage, cluster: str | None) -> Callable[[str, list], Any]:
    """submit(stage, upstream futures): the stage's Prefect task, on Ray with the stage's resources if
    ``cluster``."""
    from prefect import task

    def submit(name: str, upstream: list) -> Any:
        t = task(run_stage, name=f"stage-{recipe.stages[name].kind}", task_run_name=name,
                 retries=recipe.retries, retry_delay_seconds=5, retry_condition_fn=_is_transient,
                 cache_policy=None, persist_result=False)
        if not cluster:
            return t.submit(name, wait_for=upstream)
        from prefect_ray.context import remote_options

        from flows.cluster import remote_options as stage_options

        with remote_options(**stage_options(recipe.stages[name])):
            return t.submit(name, wait_for=upstream)
    return submit


def resolve_recipe(recipe_path: str, recipe_snapshot: dict | None, overrides: list[str] | None) -> Recipe:
    """The recipe this flow run runs: its recorded snapshot, else ``recipe_path`` with ``overrides`` applied,
    recorded as the flow run's ``recipe_snapshot`` parameter (a run of a per-recipe deployment: a retry of this
    flow run then runs exactly this recipe, even if the file changed meanwhile)."""
    if recipe_snapshot is not None:
        return load_recipe(recipe_path, raw=recipe_snapshot)
    recipe = load_recipe(recipe_path, overrides or ())
    from prefect.runtime import flow_run

    if flow_run.id:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, parameters={**flow_run.parameters, "recipe_snapshot": recipe.raw})
    return recipe


def publish_recipe(recipe: Recipe) -> None:
    """The resolved recipe as a Markdown artifact of this flow run (its Artifacts tab in the Prefect UI)."""
    import re

    import yaml
    from prefect.artifacts import create_markdown_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"recipe-{recipe.name}".lower())
    create_markdown_artifact(f"```yaml\n{yaml.safe_dump(recipe.raw, sort_keys=False)}```", key=key,
                             description=f"the resolved recipe this flow run ran ({recipe.path})")


def build_flow():
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    # threads only wait on stage processes; StageTask's slots cap how many run (run_pipeline sets the same)
    @flow(name="baton", log_prints=False, validate_parameters=False, task_runner=ThreadPoolTaskRunner(max_workers=32))
    def baton_pipeline(recipe_path: str, recipe_snapshot: dict | None = None, artifacts: str | None = None,
                       only: list[str] | None = None, track: bool = True, force: list[str] | None = None,
                       overrides: list[str] | None = None, cluster: str | None = None) -> dict[str, Any]:
        """Run (or resume) every stage of a recipe; complete stages are Cached, except the ``force``d ones
        and their downstream stages, which run again.

        Args:
            recipe_path: the recipe YAML
            recipe_snapshot: the resolved recipe (overrides applied); when absent, read from recipe_path with
                overrides applied and recorded here on the flow run, so that a retry runs exactly the same
            artifacts: the artifact root (default: $BATON_ARTIFACTS, else ./artifacts)
            only: run only these stages and what they need (empty: every stage)
            track: track the run in MLflow
            force: rerun these stages and their downstream stages even if complete
            overrides: dotted key=value overrides of the recipe, e.g. stages.vqa.train.lr=3e-4
            cluster: run the stages on this Ray cluster (the flow's task runner is then prefect-ray's,
                flows.cluster)
        """
        from prefect.runtime import flow_run
        from prefect.states import Cancelled

        recipe = resolve_recipe(recipe_path, recipe_snapshot, overrides)
        check_stage_names(recipe, {"only": only, "force": force})
        publish_recipe(recipe)
        art = Path(artifacts or os.environ.get("BATON_ARTIFACTS", "artifacts")).resolve()
        alive = hold_flow_run_lock(art, str(flow_run.id or ""))  # released when this process ends, or below
        plans = plan_fingerprints(recipe.stages)
        wanted = needed_stages(recipe, only)
        cluster = cluster or None  # the Run form's empty field
        refuse_before_connecting(recipe, wanted, cluster, set(force or ()))  # deployment runs, too
        # a deployment run (baton submit --cluster, the Run form) connects to Ray here, checked first
        with on_cluster(cluster, recipe, wanted):
            if not cluster:
                prewarm_workers(_kinds_to_run(recipe, art, plans, force))  # no-op if run_pipeline already started it
            tracking, parent_id = start_tracking(recipe, recipe_path, art, plans, str(flow_run.id or "")) \
                if track else (None, "")
            forced = downstream_of(recipe, force or []) & wanted
            snapshot = write_snapshot(art, recipe, plans, forced)
            run_stage = _stage_task(recipe, art, plans, tracking, parent_id, snapshot, wanted, forced, cluster)
            submit = _submitter(recipe, run_stage, cluster)

            status, results = "FAILED", {}
            try:
                results, failed = run_in_order(recipe, wanted, submit)
                status = "KILLED" if interrupt.requested() else "FAILED" if failed else "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                snapshot.unlink(missing_ok=True)
                if status != "KILLED":
                    # on Ray the stage tasks ran in other processes: the driver knows which finished, not how
                    outcome = getattr(run_stage, "outcome", None) or {n: "ran" for n in results}
                    publish(recipe, art, outcome, getattr(run_stage, "seconds", {}), {}, tracking, parent_id)
                if tracking is not None:
                    tracking.end_run(parent_id, status)
                alive.close()
            if status == "KILLED":
                return Cancelled(message=interrupt.summary())
            if failed:
                raise failed[1]
            return {"results": results, "parent_run_id": parent_id}

    return baton_pipeline


def run_pipeline(recipe: Recipe, artifacts: Path, only: list[str] | None = None, track: bool = True,
                 server: str | None = None, force: list[str] | None = None, cluster: str | None = None
                 ) -> dict[str, Any]:
    """Run the flow against a Prefect server that answers (``server``, PREFECT_API_URL, or the artifacts dir's
    background server, started if none answers: flows.server). Ctrl-C stops it cleanly (flows.interrupt) and
    raises ``interrupt.Interrupted`` saying which stages stopped at which step. ``cluster``: a Ray address
    (flows.cluster): every stage runs as a Ray task on a node that has its resources."""
    refuse_before_connecting(recipe, needed_stages(recipe, only), cluster, set(force or ()))
    with interrupt.handling():
        try:
            return _run_pipeline(recipe, artifacts, only, track, server, force, cluster)
        except BaseException:
            if interrupt.requested():
                raise interrupt.Interrupted(interrupt.summary()) from None
            raise


def _task_runner(recipe: Recipe, cluster: str | None):
    """Threads that wait on this machine's stage processes (every stage can have one; StageTask's slots cap
    how many run at once: recipe.max_concurrency), or prefect-ray's runner on the Ray cluster that
    flows.cluster.connect_checked connected to."""
    if not cluster:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=len(recipe.stages))
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=cluster)  # reuses that connection (ray.is_initialized)


def _run_pipeline(recipe: Recipe, artifacts: Path, only: list[str] | None, track: bool,
                  server: str | None, force: list[str] | None, cluster: str | None = None) -> dict[str, Any]:
    def prepare() -> None:
        if cluster:  # connected, and every stage checked against the nodes, while the Prefect server starts
            from flows.cluster import connect_checked

            connect_checked(cluster, recipe, needed_stages(recipe, only))
        else:
            prewarm_workers(_kinds_to_run(recipe, artifacts, None, force))

    def call() -> dict[str, Any]:
        flow = build_flow().with_options(task_runner=_task_runner(recipe, cluster), flow_run_name=f"{recipe.name}")
        with live_bars(sys.stderr.isatty() and os.environ.get("BATON_BARS", "1") != "0"):
            return flow(str(recipe.path), recipe.raw, str(Path(artifacts).resolve()), only, track, force,
                        cluster=cluster)

    try:
        return with_prefect_server(artifacts, server, prepare, track, call)
    finally:
        if cluster:
            from flows.cluster import disconnect

            disconnect()


def with_prefect_server(artifacts: Path, server: str | None, prepare: Callable[[], None], track: bool,
                        call: Callable[[], Any]) -> Any:
    """``call()`` (which runs a flow) once a Prefect server answers (flows.server; a team server joined,
    flows.team), ``prepare()`` has run (the fork server importing the stage kinds that will run, or the Ray
    cluster connected and checked) and this thread has imported MLflow (if ``track``)."""
    from flows.server import ensure_server
    from flows.team import client_auth_env, join_team, team_server

    configure_prefect(artifacts)
    client_auth_env()  # a team server's credentials (flows.team), before Prefect is imported
    if not server and not os.environ.get("PREFECT_API_URL"):
        server = team_server(artifacts)  # a store served by `baton serve --db`: its server, never a private one
    found: list = []

    def find() -> None:
        try:
            found.append(ensure_server(artifacts, server))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            found.append(e)

    # at once: finding (or starting) the server, the fork server importing the stages' libraries (its own
    # process), this thread importing MLflow. A server named by --server or PREFECT_API_URL is only checked
    # (one request): done first, so a wrong URL fails before anything starts. Prefect is imported only after
    # PREFECT_API_URL is set: its settings are read when it is imported
    finder = threading.Thread(target=find, name="baton-prefect-server", daemon=True)
    finder.start()
    if server or os.environ.get("PREFECT_API_URL"):
        finder.join()
    if not (found and isinstance(found[0], BaseException)):
        prepare()
        if track:
            __import__("mlflow")
    finder.join()
    if isinstance(found[0], BaseException):
        raise found[0]
    users = found[0]  # the background server's users lock: it stays up while this run lasts
    try:
        join_team(os.environ["PREFECT_API_URL"], artifacts)  # team mode if the server is a team server
        return call()
    finally:
        if users is not None:
            users.close()
