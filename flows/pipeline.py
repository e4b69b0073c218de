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

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from flows.fingerprint import plan_fingerprints
from flows.store import StageDir
from stages import kind_module
from stages.contract import StageContext, StageError, StageResult, seed_stage
from stages.recipe import Recipe, RecipeError, load_recipe

EXIT_BAD_INPUT, EXIT_CACHED = 2, 3

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
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from research clusters


def start_embedded_server() -> None:
    """Start the embedded Prefect server now, holding a file lock in PREFECT_HOME: it creates and migrates
    PREFECT_HOME's SQLite database on startup, and two ``baton run`` on one artifacts dir must not do
    that at the same time (the loser's server fails its startup). The flow then reuses this server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".server-start.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        SubprocessASGIServer().start()


def flow_run_lock_path(artifacts: Path, flow_run_id: str) -> Path:
    return Path(artifacts) / "tmp" / f"flow-run-{flow_run_id}.lock"


def hold_flow_run_lock(artifacts: Path, flow_run_id: str):
    """An exclusive flock held while this process executes the flow run: a flow run that Prefect still
    shows as Running but whose lock is free was killed (``baton retry`` then marks it Crashed)."""
    path = flow_run_lock_path(artifacts, flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def flow_run_is_alive(artifacts: Path, flow_run_id: str) -> bool:
    path = flow_run_lock_path(artifacts, flow_run_id)
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


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


def cached_result(name: str, sd: StageDir, tracking, parent_id: str) -> StageResult | None:
    """The stage's result if it is complete (result.json is the truth), tagged on the parent run."""
    done = sd.result()
    if done is not None:
        log.info("[%s] cached: %s", name, sd.path)
        if tracking is not None:
            tracking.client.set_tag(parent_id, f"stage.{name}", f"cached run={done.info.get('mlflow_run_id')}")
            tracking.finish_if_running(done.info.get("mlflow_run_id"), sd.path)
    return done


def execute_stage(name: str, recipe: Recipe, fps: dict, artifacts: Path, tracking, parent_id: str) -> tuple[dict, bool]:
    """Run one stage under its directory lock (in the worker process, flows.worker).
    Returns (result as a dict, whether it was already complete)."""
    cfg = recipe.stages[name]
    fp, payload = fps[name]
    sd = StageDir(artifacts, name, fp)
    with sd.lock():
        sd.remove_stale_temps()  # a killed earlier run's half-written files (we hold the lock: nobody writes)
        done = cached_result(name, sd, tracking, parent_id)  # another run may have finished it while we waited
        if done is not None:
            return done.model_dump(mode="json"), True
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
            from stages.contract import NullTracker

            tracker = NullTracker()
        ctx = StageContext(name=name, config=cfg, stage_dir=sd.path, upstream=up_results,
                           upstream_dirs={u: d.path for u, d in upstream.items()}, fingerprint=fp, tracker=tracker)
        t0 = time.perf_counter()
        try:
            seed_stage(cfg)
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
        return res.model_dump(mode="json"), False


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


def _worker_start_method() -> str:
    m = os.environ.get("BATON_WORKER_START", "forkserver")
    if m not in ("forkserver", "spawn"):
        raise RecipeError(f"BATON_WORKER_START={m!r}: expected 'forkserver' or 'spawn'")
    return m


def incomplete_kinds(recipe: Recipe, artifacts: Path, fps: dict | None = None) -> list[str]:
    """The kinds of the stages that have no result.json yet (the ones that will need a process)."""
    fps = fps if fps is not None else plan_fingerprints(recipe.stages)
    return sorted({c.kind for n, c in recipe.stages.items()
                   if StageDir(Path(artifacts), n, fps[n][0]).result() is None})


_prewarmed: dict[str, Any] = {}  # what the running fork server imported, and the code it imported
_active_workers = 0
_workers_lock = threading.Lock()


def _code_signature() -> tuple:
    """mtimes of baton's own modules: a long-lived process (a notebook, pytest) that edits stage code
    must not keep forking the old code."""
    root = Path(__file__).resolve().parents[1]
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for d in ("flows", "stages") for p in (root / d).glob("*.py")))


def prewarm_workers(kinds: list[str]) -> None:
    """Start the stage-process fork server now, importing torch, transformers, MLflow and the recipe's
    stage kinds once, in the background, while the flow starts Prefect and MLflow. Each stage process is
    then a fork of that clean, single-threaded server (no Prefect, no event loop, no CUDA in it): ~0.1 s
    instead of the ~8-10 s a fresh interpreter spends importing them, per stage. A server that imported
    other kinds or older code is replaced (only between stages: stopping it kills its children)."""
    if not kinds or _worker_start_method() != "forkserver":
        return
    import multiprocessing as mp
    from multiprocessing import forkserver

    from stages import KINDS

    mods = ["flows.worker", "flows.tracking", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
            *(KINDS[k] for k in kinds if k in KINDS)]
    sig = _code_signature()
    with _workers_lock:
        running = forkserver._forkserver._forkserver_pid is not None
        if running and (set(mods) - set(_prewarmed.get("mods", ())) or _prewarmed.get("sig") != sig):
            if _active_workers:
                return  # busy: new stage processes import what is missing themselves
            forkserver._forkserver._stop()
            running = False
        if running:
            return
        mp.get_context("forkserver").set_forkserver_preload(mods)
        # imports in the server must not initialise CUDA (a forked child could not use it): torch's
        # availability check, if anything calls it at import, asks NVML instead of the driver
        nvml = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        try:
            forkserver.ensure_running()  # returns at once; the server imports, then serves
        finally:
            if nvml is None:
                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
            else:
                os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        _prewarmed.update(mods=mods, sig=sig)


def launch_worker(name: str, snapshot: Path, artifacts: Path, parent_id: str, threads: int) -> tuple[int, list[str]]:
    """Run one stage in its own process (flows.worker), forwarding its log lines. Returns (exit code, last lines).
    The process is forked from the fork server (``prewarm_workers``), or with ``BATON_WORKER_START=spawn`` a
    fresh ``python -m flows.worker``. Either way its stdout and stderr (fds 1 and 2) come through a pipe."""
    import collections
    import subprocess
    import sys

    argv = [name, "--snapshot", str(snapshot), "--artifacts", str(artifacts),
            "--threads", str(threads)] + (["--parent-run-id", parent_id] if parent_id else [])
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cwd = Path(__file__).resolve().parents[1]
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def forward(lines) -> None:
        for line in lines:
            line = line.rstrip()
            tail.append(line)
            (log.warning if line.startswith(("error", "Traceback", "WARNING")) else log.info)(line)

    if _worker_start_method() == "spawn":
        with subprocess.Popen([sys.executable, "-m", "flows.worker", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd) as p:
            forward(p.stdout)
        return p.returncode, list(tail)

    import multiprocessing as mp

    from flows.worker import forked_main

    global _active_workers
    ctx = mp.get_context("forkserver")
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=forked_main, args=(argv, dict(env), str(cwd), w), name=f"baton-{name}")
    with _workers_lock:
        proc.start()
        _active_workers += 1
    try:
        w.close()
        with os.fdopen(os.dup(r.fileno()), "r", errors="replace") as f:
            r.close()
            forward(f)
        proc.join()
    finally:
        with _workers_lock:
            _active_workers -= 1
    return proc.exitcode, list(tail)


def build_flow():
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    # threads only wait on stage processes; `slots` below caps how many run (run_pipeline sets the same)
    @flow(name="baton", log_prints=False, validate_parameters=False, task_runner=ThreadPoolTaskRunner(max_workers=32))
    def baton_pipeline(recipe_path: str, recipe_snapshot: dict, artifacts: str, only: list[str] | None = None,
                       track: bool = True) -> dict[str, Any]:
        """Run (or resume) every stage of a recipe; complete stages are Cached."""
        from prefect.runtime import flow_run

        recipe = load_recipe(recipe_path, raw=recipe_snapshot)
        art = Path(artifacts)
        alive = hold_flow_run_lock(art, str(flow_run.id or ""))  # released when this process ends, or by the flow
        fps = plan_fingerprints(recipe.stages)
        prewarm_workers(incomplete_kinds(recipe, art, fps))  # no-op if run_pipeline already started it
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
        snapshot = art / "tmp" / f"recipe-{os.getpid()}-{time.time_ns()}.json"
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(json.dumps({  # what a stage process needs, already resolved: it imports only its kind
            "recipe": recipe.name, "fingerprints": fps, "python_path": recipe.python_path,
            "stages": {n: c.model_dump(mode="json", exclude_unset=True) for n, c in recipe.stages.items()}}))
        threads = _threads_per_stage(recipe, wanted)
        slots = threading.Semaphore(recipe.max_concurrency)

        def run_one(stage: str) -> Any:  # the recipe, tracking client etc. stay out of Prefect's parameters
            from prefect.states import Completed

            sd = StageDir(art, stage, fps[stage][0])
            with sd.lock():
                sd.remove_stale_temps()
                done = cached_result(stage, sd, tracking, parent_id)
            if done is None:
                with slots:
                    rc, tail = launch_worker(stage, snapshot, art, parent_id, threads[stage])
                if rc not in (0, EXIT_CACHED):
                    msg = next((ln[len("error: "):] for ln in reversed(tail) if ln.startswith("error: ")), None)
                    if rc == EXIT_BAD_INPUT and msg:
                        raise StageError(msg)
                    raise RuntimeError(f"stage {stage!r}: worker exited with status {rc}:\n" + "\n".join(tail[-12:]))
                done = sd.result()
                if done is None:
                    raise RuntimeError(f"stage {stage!r}: worker finished but {sd.path}/result.json is missing")
                if rc == 0:
                    return done.model_dump(mode="json")
            return Completed(name="Cached", data=done.model_dump(mode="json"),
                             message=f"result.json present in {sd.path}")

        # Submit a stage only once everything it needs has finished, so no worker thread sits blocked
        # on upstream futures (wait_for still records the edges for the Prefect UI).
        futures: dict[str, Any] = {}
        pending = [n for n in recipe.stages if n in wanted]
        results, failed = {}, None
        skipped: set[str] = set()
        while True:
            for name in list(pending):
                needs = [u for u in recipe.stages[name].needs if u in wanted]
                if any(u in skipped for u in needs):
                    pending.remove(name)
                    skipped.add(name)
                    log.warning("[%s] not run: an upstream stage failed", name)
                elif all(u in results for u in needs):
                    pending.remove(name)
                    t = task(run_one, name=f"stage-{recipe.stages[name].kind}", task_run_name=name,
                             retries=recipe.retries, retry_delay_seconds=5, retry_condition_fn=_is_transient,
                             cache_policy=None, persist_result=False)
                    futures[name] = t.submit(name, wait_for=[futures[u] for u in needs])
            open_ = [n for n in futures if n not in results and n not in skipped]
            running = [n for n in open_ if not futures[n].wrapped_future.done()]
            finished = [n for n in open_ if futures[n].wrapped_future.done()]
            for name in finished:
                try:
                    results[name] = futures[name].result()
                except BaseException as e:  # noqa: BLE001
                    failed = failed or (name, e)
                    skipped.add(name)
            if not running and not finished and not any(
                    all(u in results for u in recipe.stages[n].needs if u in wanted) for n in pending):
                skipped.update(pending)
                break
            if running and not finished:
                futures[running[0]].wait(timeout=0.2)
        snapshot.unlink(missing_ok=True)
        if tracking is not None:
            tracking.end_run(parent_id, "FAILED" if failed else "FINISHED")
        alive.close()
        if failed:
            raise failed[1]
        return {"results": results, "parent_run_id": parent_id}

    return baton_pipeline


def run_pipeline(recipe: Recipe, artifacts: Path, only: list[str] | None = None, track: bool = True) -> dict[str, Any]:
    configure_prefect(artifacts)
    # three things that take seconds each, at once: the Prefect server (its own process) starts in a
    # thread, the fork server imports the stages' libraries (its own process), this thread imports
    # MLflow. Prefect itself is imported here first: importing it from two threads at once breaks its
    # plugin initialisation (a circular import seen half-done)
    import importlib

    from prefect.task_runners import ThreadPoolTaskRunner

    if not os.environ.get("PREFECT_API_URL"):
        importlib.import_module("prefect.server.api.server")

    started: list[BaseException | None] = []

    def start() -> None:
        try:
            start_embedded_server()
            started.append(None)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            started.append(e)

    server = threading.Thread(target=start, name="baton-prefect-server", daemon=True)
    server.start()
    prewarm_workers(incomplete_kinds(recipe, artifacts))
    if track:
        __import__("mlflow")
    server.join()
    if started and started[0] is not None:
        raise started[0]

    # Threads only wait on stage processes (flows.worker); every stage can have one, and `slots` in the
    # flow caps how many stage processes run at once (recipe.max_concurrency).
    flow = build_flow().with_options(task_runner=ThreadPoolTaskRunner(max_workers=len(recipe.stages)),
                                     flow_run_name=f"{recipe.name}")
    return flow(str(recipe.path), recipe.raw, str(Path(artifacts).resolve()), only, track)
