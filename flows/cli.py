"""``baton`` command line.

    baton run CONFIG [dotted.key=value ...]   run / resume a recipe through Prefect, tracked in MLflow
    baton status CONFIG [overrides]           per stage: fingerprint and complete / partial at step k / not started
    baton ui [--port 5000]                    MLflow UI on 127.0.0.1 over artifacts/mlflow.db
    baton resume RUN_ID                       rerun the exact recipe snapshot of an earlier invocation
                                              (its MLflow parent or stage run id, or its Prefect flow run id)
    baton retry FLOW_RUN_ID                   `prefect flow-run retry` of a failed or killed flow run: the same
                                              flow run (id, parameters) runs again; finished stages are Cached
    baton prefect ARGS...                     the Prefect CLI against baton's embedded Prefect database
    baton serve [--port 4200]                 a Prefect server with its UI on 127.0.0.1 (unless PREFECT_API_URL
                                              is set) serving the deployment baton/baton: it executes submitted
                                              runs and the runs retried from the UI's Retry button
    baton submit CONFIG [overrides] [--wait]  run a recipe through that deployment (retryable from the UI)
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from flows import interrupt
from flows.interrupt import Interrupted
from stages.contract import StageError
from stages.recipe import RecipeError, load_recipe

log = logging.getLogger("baton")


def _artifacts(args) -> Path:
    return Path(args.artifacts or os.environ.get("BATON_ARTIFACTS", "artifacts"))


def _check_writable(art: Path) -> None:
    try:
        art.mkdir(parents=True, exist_ok=True)
        probe = art / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"artifacts directory {art} is not writable: {e.strerror}") from None


def cmd_status(args) -> int:
    from flows.execute import stage_dirs

    recipe = load_recipe(args.config, args.overrides)
    dirs = stage_dirs(recipe, _artifacts(args))
    width = max(len(n) for n in dirs)
    print(f"recipe {recipe.name} ({args.config})")
    for name, d in dirs.items():
        print(f"  {name:<{width}}  {d.fingerprint[:16]}  {d.status()}")
    return 0


def cmd_run(args) -> int:
    recipe = load_recipe(args.config, args.overrides)
    art = _artifacts(args)
    _check_writable(art)
    for name in args.only or []:
        if name not in recipe.stages:
            raise RecipeError(f"--only {name}: no such stage in {args.config} ({', '.join(recipe.stages)})")
    from flows.pipeline import run_pipeline

    t0 = time.perf_counter()
    out = run_pipeline(recipe, art, only=args.only, track=not args.no_track)
    print(f"\nrecipe {recipe.name}: {len(out['results'])} stages in {time.perf_counter() - t0:.1f}s "
          f"(MLflow parent run {out['parent_run_id'] or '-'})")
    for name, res in out["results"].items():
        m = ", ".join(f"{k}={v:.4g}" for k, v in res["metrics"].items())
        b = ", ".join(f"{k}={v:.4g}" for k, v in res["baselines"].items())
        print(f"  {name:<10} {m}" + (f"   [baseline {b}]" if b else ""))
    return 0


def _invocation_run(client, run_id: str):
    """The MLflow parent run of an invocation, from its id, one of its stage runs' ids, or the id of
    its Prefect flow run (tag ``baton.prefect_flow_run_id`` of the parent run)."""
    import re

    if not re.fullmatch(r"[0-9A-Za-z-]+", run_id):
        raise RecipeError(f"resume {run_id!r}: not an MLflow run id or a Prefect flow run id")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException: no such run; try it as a Prefect flow run id
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string=f"tags.`baton.prefect_flow_run_id` = '{run_id}'",
                                  max_results=1) if exps else []
        if not runs:
            raise RecipeError(f"resume {run_id}: no MLflow run and no invocation of Prefect flow run {run_id} "
                              f"in {client.tracking_uri}") from None
        run = runs[0]
    parent = run.data.tags.get("mlflow.parentRunId")
    return client.get_run(parent) if parent else run


def cmd_resume(args) -> int:
    import tempfile

    import yaml
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    art = _artifacts(args)
    if not (art / "mlflow.db").exists():
        raise RecipeError(f"resume {args.run_id}: no MLflow store in {art} (set --artifacts or BATON_ARTIFACTS)")
    with open(art / ".mlflow-init.lock", "w") as lock:  # see flows.tracking.Tracking
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=tracking_uri(art))
    prun = _invocation_run(client, args.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(prun.info.run_id, "recipe.yaml", tmp)
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"resume {args.run_id}: run {prun.info.run_id} has no recipe.yaml snapshot ({e})") from None
        raw = yaml.safe_load(Path(path).read_text())
    recipe = load_recipe(prun.data.tags.get("baton.recipe", "recipe.yaml"), raw=raw)
    _check_writable(art)
    from flows.pipeline import run_pipeline

    print(f"resuming {recipe.name} from the snapshot of run {prun.info.run_id} ({prun.info.status})")
    out = run_pipeline(recipe, art)
    print(f"resumed {recipe.name}: {len(out['results'])} stages complete (MLflow parent run {out['parent_run_id']})")
    return 0


def _prefect_env(art: Path) -> dict[str, str]:
    """Environment for a Prefect CLI process that talks to baton's embedded server (started here)."""
    from flows.prefect_env import configure_prefect, start_embedded_server

    configure_prefect(art)
    start_embedded_server()
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        url = SubprocessASGIServer().api_url
    return os.environ | {"PREFECT_API_URL": url}


def cmd_prefect(args) -> int:
    art = _artifacts(args)
    _check_writable(art)
    prefect = Path(sys.executable).with_name("prefect")
    return subprocess.call([str(prefect), *args.args], env=_prefect_env(art))


def cmd_retry(args) -> int:
    import uuid

    art = _artifacts(args)
    _check_writable(art)
    try:
        fid = uuid.UUID(args.flow_run_id)
    except ValueError:
        raise RecipeError(f"retry {args.flow_run_id!r}: not a Prefect flow run id (a UUID)") from None
    env = _prefect_env(art)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    from flows.prefect_env import flow_run_is_alive

    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(fid)
        except ObjectNotFound:
            raise RecipeError(f"retry {fid}: no such flow run in the Prefect database of {art}") from None
        if fr.state is not None and fr.state.type in (StateType.RUNNING, StateType.PENDING):
            if flow_run_is_alive(art, str(fid)):
                raise RecipeError(f"retry {fid}: the flow run is still running (a live process holds it)")
            client.set_flow_run_state(fid, Crashed(message="its process is gone (found by baton retry)"), force=True)
            print(f"flow run {fid} was {fr.state.type.value} but its process is gone: marked CRASHED")
    entry = Path(__file__).resolve().parent / "entry.py"
    prefect = Path(sys.executable).with_name("prefect")
    rc = subprocess.call([str(prefect), "flow-run", "retry", str(fid), "--entrypoint", f"{entry}:baton_pipeline"],
                         env=env)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fid)
    print(f"flow run {fid}: {fr.state.type.value if fr.state else 'unknown'} (run count {fr.run_count})")
    return rc


DEPLOYMENT = "baton/baton"


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RecipeError(f"the Prefect server exited with status {proc.returncode} before it was up ({url})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RecipeError(f"no Prefect server answered at {url} within {timeout:.0f}s")


def cmd_serve(args) -> int:
    """A Prefect server with its UI (started here on loopback unless PREFECT_API_URL names one), and a
    process serving the flow as deployment baton/baton. Runs of that deployment (``baton submit``, the UI's
    Run) execute here; so do the ones the UI's Retry button puts back to Scheduled: finished stages are
    Cached and the failed one continues from its checkpoint, in the same flow run."""
    from flows.prefect_env import configure_prefect

    art = _artifacts(args).resolve()
    _check_writable(art)
    configure_prefect(art)  # PREFECT_HOME=artifacts/prefect: the UI also shows the `baton run` flow runs
    server = None
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        url = f"http://{args.host}:{args.port}/api"
        prefect = Path(sys.executable).with_name("prefect")
        server = subprocess.Popen([str(prefect), "server", "start", "--host", args.host, "--port", str(args.port)],
                                  env=os.environ | {"PREFECT_SERVER_UI_ENABLED": "true"}, stdout=subprocess.DEVNULL)
        os.environ["PREFECT_API_URL"] = url
    try:
        _wait_healthy(url, server, timeout=180)
        print(f"Prefect UI: {url.removesuffix('/api')}  (API {url}); serving deployment {DEPLOYMENT}", flush=True)
        from prefect import serve

        from flows.entry import baton_pipeline

        dep = baton_pipeline.to_deployment(
            name="baton", enforce_parameter_schema=False,
            description="baton recipe runs: `baton submit CONFIG` (or the UI's Run with the same parameters)")
        # each flow run executes in a fresh process that loads the flow by its entrypoint, relative to here
        root = Path(__file__).resolve().parents[1]
        os.chdir(root)
        dep.entrypoint = "flows/entry.py:baton_pipeline"
        serve(dep, limit=args.limit, print_starting_message=False)
        return 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def cmd_submit(args) -> int:
    """Create a flow run of deployment baton/baton for this recipe (executed by ``baton serve``)."""
    recipe = load_recipe(args.config, args.overrides)
    art = _artifacts(args).resolve()
    _check_writable(art)
    from flows.prefect_env import configure_prefect

    url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{args.port}/api"
    configure_prefect(art)
    os.environ["PREFECT_API_URL"] = url
    _wait_healthy(url, None, timeout=10)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        fr = run_deployment(DEPLOYMENT, timeout=0, flow_run_name=recipe.name, parameters={
            "recipe_path": str(recipe.path), "recipe_snapshot": recipe.raw, "artifacts": str(art),
            "only": args.only, "track": not args.no_track})
    except ObjectNotFound:
        raise RecipeError(f"no deployment {DEPLOYMENT} at {url}: start `baton serve` first") from None
    print(f"flow run {fr.id} ({fr.name}) submitted: {url.removesuffix('/api')}/runs/flow-run/{fr.id}", flush=True)
    if not args.wait:
        return 0
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(fr.id)
            if fr.state is not None and fr.state.is_final():
                break
            time.sleep(1)
    print(f"flow run {fr.id}: {fr.state.type.value} ({fr.state.message or ''})".rstrip(" ()"))
    return 0 if fr.state.is_completed() else 1


def cmd_ui(args) -> int:
    from flows.tracking import tracking_uri

    art = _artifacts(args).resolve()
    art.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(art),
           "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port}  ({' '.join(cmd)})")
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="baton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", help="artifact root (default: $BATON_ARTIFACTS or ./artifacts)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume a recipe")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted.key=value")
    r.add_argument("--only", action="append", help="run only this stage (and what it needs); repeatable")
    r.add_argument("--no-track", action="store_true", help="no MLflow tracking")
    s = sub.add_parser("status", help="stage status without running anything")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    u = sub.add_parser("ui", help="MLflow UI")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    rs = sub.add_parser("resume", help="rerun the recipe snapshot of an invocation: MLflow run id (parent or "
                                       "stage) or Prefect flow run id")
    rs.add_argument("run_id")
    rt = sub.add_parser("retry", help="retry a failed (or killed) Prefect flow run in place: same flow run id and "
                                      "recipe snapshot; finished stages are Cached")
    rt.add_argument("flow_run_id")
    pf = sub.add_parser("prefect", help="the Prefect CLI against baton's embedded Prefect database "
                                        "(e.g. baton prefect flow-run ls)")
    pf.add_argument("args", nargs=argparse.REMAINDER)
    sv = sub.add_parser("serve", help="Prefect server + UI on loopback, serving deployment baton/baton (runs "
                                      "from `baton submit`, retries from the UI)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=4200)
    sv.add_argument("--limit", type=int, default=None, help="flow runs executed at once (default: no limit)")
    sm = sub.add_parser("submit", help="run a recipe through the served deployment baton/baton")
    sm.add_argument("config")
    sm.add_argument("overrides", nargs="*", help="dotted.key=value")
    sm.add_argument("--only", action="append")
    sm.add_argument("--no-track", action="store_true")
    sm.add_argument("--wait", action="store_true", help="wait for the flow run to finish; exit 1 unless it completed")
    sm.add_argument("--port", type=int, default=4200, help="the `baton serve` port (when PREFECT_API_URL is unset)")
    args = p.parse_args(argv)
    if args.cmd not in ("run", "resume", "retry", "serve"):  # under Prefect, Prefect's console handler prints our 'baton' logger
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)-7s | %(message)s",
                            datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    try:
        return {"run": cmd_run, "status": cmd_status, "ui": cmd_ui, "resume": cmd_resume, "retry": cmd_retry,
                "prefect": cmd_prefect, "serve": cmd_serve, "submit": cmd_submit}[args.cmd](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        interrupt.exit_now()  # 130, without Prefect's slow shutdown
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ...: the message names the path
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
