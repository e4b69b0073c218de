"""``baton`` command line (typer). ``baton --help`` lists the commands, ``baton COMMAND --help`` shows one
with an example; ``baton --install-completion`` installs shell completion.

    baton run CONFIG [dotted.key=value ...]   run / resume a recipe through Prefect, tracked in MLflow
              [--dry-run] [--force STAGE]     the plan only (cached / will run, and why) / rerun STAGE + downstream
              [--cluster ray://HOST:10001]    the stages as Ray tasks on a cluster (prefect-ray; README "Running on a cluster")
    baton status CONFIG|SWEEP_FILE [overrides]  per stage (and sweep member): fingerprint and complete / partial / not started
    baton ls / baton cp NAME [DEST]           the shipped recipes / copy one to edit it
    baton ui [--port 5000]                    MLflow UI on 127.0.0.1 over artifacts/mlflow.db
    baton dag CONFIG [overrides] [--dot]      the planned DAG: stage, kind, fingerprint, state, needs
    baton lineage RUN_ID|MODEL_ID|STAGE       the chain of upstream stages: fingerprints, runs, LoggedModels, metrics
    baton advise --from STAGE --target PATH   the 2x2 advisor: target size x domain distance -> strategy (no training)
    baton gc [--dry-run] [CONFIG ...]         remove stage dirs no recipe plans and complete stages' checkpoints
    baton resume RUN_ID                       rerun the exact recipe snapshot of an earlier invocation
    baton retry FLOW_RUN_ID                   `prefect flow-run retry` of a failed or killed flow run, in place
    baton prefect ARGS...                     the Prefect CLI against the artifacts dir's Prefect server
    baton server status|stop                  the artifacts dir's background Prefect server (flows.server): the
                                              first `baton run` starts it, later runs reuse it, it exits after
                                              $BATON_SERVER_IDLE_TIMEOUT seconds (default 1800) idle
    baton serve [--port 4200] [RECIPE...]     a Prefect server + UI serving one deployment per recipe (a Run
                                              form: overrides, only, track) and baton/baton
    baton serve --db postgresql://U@H/DB      team mode: Prefect + MLflow servers on PostgreSQL (flows.team)
    baton submit CONFIG [overrides] [--wait]  run a recipe through that deployment (retryable from the UI)
    baton sweep SWEEP_FILE|CONFIG [--variant NAME='k=v ...'] [--grid K=V1,V2] [--seeds 0,1,2]
                                              variants as one flow; shared stages run once (flows.sweep)
    baton report SWEEP                        charts + index.html of a finished sweep (flows.report)

Adding a command: a function decorated with ``@command("baton NAME example args")``; its docstring's first
line is its help. It raises ``RecipeError`` for bad input (exit 2), ``StageError`` / ``OSError`` for a
failure (exit 1), and returns its exit status (None = 0). ``main`` maps errors to exit codes, in one place.
Options that every command takes (``--artifacts``) are accepted before and after the command name.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from flows import interrupt
from flows.deploy import SUBMIT_DEPLOYMENT
from flows.interrupt import Interrupted
from flows.server import ServerError
from stages.contract import StageError
from stages.recipe import RecipeError, load_recipe

log = logging.getLogger("baton")

app = typer.Typer(name="baton", no_args_is_help=True, rich_markup_mode=None,
                  help="Run multi-stage pretrain -> fine-tune recipes as cached, restartable stages "
                       "(Prefect + MLflow). `baton COMMAND --help` shows a command with an example.",
                  context_settings={"help_option_names": ["-h", "--help"]})

# exit status of each error kind: the one place that says it (usage errors are click's: 2)
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = ((RecipeError, 2), (StageError, 1), (ServerError, 1),
                                                           (OSError, 1))
# commands whose output Prefect's console handler already formats (it prints our 'baton' logger)
_PREFECT_LOGGING = {"run", "resume", "retry", "serve", "sweep"}

Artifacts = Annotated[Path | None, typer.Option(
    "--artifacts", metavar="DIR", show_default=False,
    help="artifact root (default: $BATON_ARTIFACTS or ./artifacts); also accepted before the command")]
Config = Annotated[Path, typer.Argument(show_default=False, help="recipe YAML (`baton ls`)")]
Overrides = Annotated[list[str] | None, typer.Argument(
    metavar="[dotted.key=value]...", show_default=False, help="overrides, e.g. stages.vqa.train.lr=3e-4")]
Only = Annotated[list[str] | None, typer.Option(
    "--only", metavar="STAGE", show_default=False, help="run only this stage (and what it needs); repeatable")]
NoTrack = Annotated[bool, typer.Option("--no-track", help="no MLflow tracking")]
AsJson = Annotated[bool, typer.Option("--json", help="one JSON document on stdout (logs go to stderr)")]
Force = Annotated[list[str] | None, typer.Option(
    "--force", metavar="STAGE", show_default=False,
    help="rerun this stage and everything downstream of it even if complete (the old directories stay until "
         "the new result.json exists); repeatable")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the plan: per stage cached or will run, and why "
                                                        "(which config key, code module, upstream or data input "
                                                        "changed); nothing runs")]
Host = Annotated[str, typer.Option(help="bind address")]
Server = Annotated[str | None, typer.Option(
    "--server", metavar="URL", show_default=False,
    help="Prefect API URL (default: $PREFECT_API_URL, else the artifacts dir's background server, started if "
         "none answers)")]
Cluster = Annotated[str | None, typer.Option(
    "--cluster", metavar="ADDRESS", show_default=False,
    help="run the stages as Ray tasks on this cluster (prefect-ray): ray://HOST:10001, HOST:6379, auto, or local; "
         "each stage goes to a node with its runtime.cpus/gpus/memory_gb/resources (README: Running on a cluster)")]


def command(example: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """Register a ``baton`` subcommand named after the function (``kwargs`` go to ``Typer.command``, e.g.
    ``name=``); ``example`` is shown as the last line of its help."""
    def register(fn: Callable) -> Callable:
        app.command(epilog=f"Example: {example}", **kwargs)(fn)
        return fn
    return register


_given_before: dict[str, Any] = {}  # the options given before the command name, for this invocation


@app.callback()
def _global(ctx: typer.Context, artifacts: Artifacts = None) -> None:
    _given_before.clear()
    _given_before["artifacts"] = artifacts
    if ctx.invoked_subcommand not in _PREFECT_LOGGING:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)-7s | %(message)s",
                            datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)


def artifacts_root(given: Path | None) -> Path:
    """``--artifacts`` after the command, else before it, else $BATON_ARTIFACTS, else ./artifacts."""
    before = _given_before.get("artifacts")
    return Path(given or before or os.environ.get("BATON_ARTIFACTS", "artifacts"))


def _check_writable(art: Path) -> None:
    try:
        art.mkdir(parents=True, exist_ok=True)
        probe = art / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"artifacts directory {art} is not writable: {e.strerror}") from None


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout in here (this process and the processes it starts) goes to stderr, so
    that stdout carries only the JSON document printed afterwards."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):  # no real fd 1 (e.g. captured by a test runner): Python-level only
        saved = None
    real, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = real
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str), flush=True)


@command("baton status configs/vlp-tiny.yaml --json")
def status(config: Config, overrides: Overrides = None, artifacts: Artifacts = None, as_json: AsJson = False) -> None:
    """Per stage: fingerprint and complete / partial at step k / not started, without running anything."""
    from flows.execute import stage_dirs
    from flows.store import describe_state
    from stages.recipe import load_raw

    art = artifacts_root(artifacts)
    try:
        raw = load_raw(Path(config))
    except RecipeError:
        raw = None  # load_recipe below says what is wrong with it
    if isinstance(raw, dict) and "sweep" in raw:  # a sweep file (flows.sweep.is_sweep_file)
        from flows.sweep import load_sweep, status_rows

        sw = load_sweep(config)
        rows = status_rows(sw, art)
        if as_json:
            _print_json({"sweep": sw.spec.sweep, "config": str(config), "artifacts": str(art), "stages": rows})
        else:
            print(render_sweep_status(sw, rows))
        return
    recipe = load_recipe(config, overrides or ())
    rows = []
    for name, d in stage_dirs(recipe, art).items():
        state, step = d.state()
        rows.append({"name": name, "kind": recipe.stages[name].kind, "fingerprint": d.fingerprint,
                     "state": state, "step": step, "dir": str(d.path)})
    if as_json:
        _print_json({"recipe": recipe.name, "config": str(config), "artifacts": str(art), "stages": rows})
        return
    width = max(len(r["name"]) for r in rows)
    print(f"recipe {recipe.name} ({config})")
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['fingerprint'][:16]}  {describe_state(r['state'], r['step'])}")


@command("baton run configs/vlp-tiny.yaml stages.vqa.train.lr=3e-4 --only vqa --dry-run")
def run(config: Config, overrides: Overrides = None, only: Only = None, no_track: NoTrack = False,
        artifacts: Artifacts = None, as_json: AsJson = False, server: Server = None,
        force: Force = None, dry_run: DryRun = False, cluster: Cluster = None) -> None:
    """Run or resume a recipe: complete stages are Cached, an interrupted one continues from its checkpoint."""
    recipe = load_recipe(config, overrides or ())
    art = artifacts_root(artifacts)
    from flows.plan import check_stage_names

    check_stage_names(recipe, {"--only": only, "--force": force})
    if dry_run:
        return print_plan(recipe, art, only, force, as_json)
    from flows.cluster import refuse_before_connecting
    from flows.plan import needed_stages

    refuse_before_connecting(recipe, needed_stages(recipe, only), cluster, set(force or ()))  # before anything
    _check_writable(art)
    from flows.execute import stage_dirs
    from flows.pipeline import run_pipeline
    from flows.plan import downstream_of

    done_before = {n for n, d in stage_dirs(recipe, art).items() if d.result() is not None}
    done_before -= downstream_of(recipe, force or [])
    t0 = time.perf_counter()
    with _stdout_to_stderr() if as_json else _no_redirect():
        out = run_pipeline(recipe, art, only=only, track=not no_track, server=server, force=force, cluster=cluster)
    summary = run_summary(recipe, out, done_before, time.perf_counter() - t0)
    if as_json:
        _print_json(summary)
        return
    print(f"\nrecipe {recipe.name}: {len(summary['stages'])} stages in {summary['seconds']:.1f}s "
          f"(MLflow parent run {summary['mlflow_parent_run_id'] or '-'}; Prefect server {summary['prefect_api_url']})")
    for s in summary["stages"]:
        m = ", ".join(f"{k}={v:.4g}" for k, v in s["metrics"].items())
        b = ", ".join(f"{k}={v:.4g}" for k, v in s["baselines"].items())
        print(f"  {s['name']:<10} {s['state']:<6} {m}" + (f"   [baseline {b}]" if b else ""))


Variants = Annotated[list[str] | None, typer.Option(
    "--variant", metavar="NAME='k=v ...'", show_default=False,
    help="a named bundle of overrides, e.g. lp_ft='stages.vqa.train.transfer.strategy=lp_ft "
         "stages.vqa.train.transfer.lp_steps=50' (NAME='' = the recipe as it is); repeatable")]
Grid = Annotated[list[str] | None, typer.Option(
    "--grid", metavar="KEY=V1,V2", show_default=False, help="multiplies the variants; repeatable")]
Seeds = Annotated[str | None, typer.Option(
    "--seeds", metavar="0,1,2", show_default=False,
    help="seeds of the swept stages (those a variant changes) and everything downstream of them")]
SeedsFrom = Annotated[str | None, typer.Option(
    "--seeds-from", metavar="STAGE", show_default=False, help="seed this stage and its downstream stages too")]


@command("baton sweep configs/vlp-micro.yaml --variant ft='' --variant lp_ft='stages.vqa.train.transfer.strategy="
         "lp_ft stages.vqa.train.transfer.lp_steps=3' --grid stages.vqa.train.lr=1e-3,3e-3 --seeds 0,1")
def sweep(config: Annotated[Path, typer.Argument(show_default=False, help="a sweep file (configs/sweeps/) or a recipe")],
          variant: Variants = None, grid: Grid = None, seeds: Seeds = None, seeds_from: SeedsFrom = None,
          only: Only = None, name: Annotated[str | None, typer.Option(
              "--name", show_default=False, help="the sweep's name (default: the sweep file's, else recipe-<hash>)")]
          = None, no_track: NoTrack = False, no_report: Annotated[bool, typer.Option(
              "--no-report", help="do not write the report at the end (`baton report` writes it later)")] = False,
          max_concurrency: Annotated[int | None, typer.Option(
              "--max-concurrency", min=1, show_default=False, help="stage processes at once (default: the sweep "
                                                                    "file's, else the recipe's)")] = None,
          artifacts: Artifacts = None, as_json: AsJson = False, server: Server = None, dry_run: DryRun = False,
          cluster: Cluster = None) -> int:
    """Run variants of a recipe as one flow: stages they share (same fingerprint) run once; then the report."""
    from flows.sweep import load_sweep, status_rows

    sw = load_sweep(config, variant, grid, seeds, seeds_from, only, name)
    if max_concurrency:
        sw.spec = sw.spec.model_copy(update={"max_concurrency": max_concurrency})
    art = artifacts_root(artifacts)
    if dry_run:
        rows = status_rows(sw, art)
        if as_json:
            _print_json({"sweep": sw.spec.sweep, "members": [m.to_json() for m in sw.members], "stages": rows,
                         "nodes": len(sw.nodes), "swept": sw.swept, "seeded": sw.seeded})
        else:
            print(render_sweep_status(sw, rows))
        return 0
    from flows.sweep_flow import check_cluster, run_sweep

    check_cluster(sw, cluster)  # what the configs alone tell, before anything starts
    _check_writable(art)

    t0 = time.perf_counter()
    with _stdout_to_stderr() if as_json else _no_redirect():
        out = run_sweep(sw, art, track=not no_track, server=server, report=not no_report, cluster=cluster)
    out = {**(out if isinstance(out, dict) else {}), "seconds": round(time.perf_counter() - t0, 2),
           "members": [m.name for m in sw.members], "swept": sw.swept, "seeded": sw.seeded,
           "record": str(art / "sweeps" / f"{sw.spec.sweep}.json")}
    if as_json:
        _print_json(out)
    else:
        print(f"\nsweep {sw.spec.sweep}: {len(sw.members)} members, {len(sw.nodes)} unique stages, "
              f"{out['seconds']:.1f}s; swept {', '.join(sw.swept) or '-'}, seeded {', '.join(sw.seeded) or '-'}; "
              f"MLflow sweep run {out.get('mlflow_run_id') or '-'}" + (f"; report {out['report']}" if out.get("report")
                                                                        else ""))
    return 0


def render_sweep_status(sw, rows: list[dict]) -> str:
    from flows.store import describe_state

    width = max(len(r["name"]) for r in rows)
    lines = [f"sweep {sw.spec.sweep} ({sw.spec.recipe}): {len(sw.members)} members, {len(sw.nodes)} unique stages "
             f"({sum(r['state'] == 'complete' for r in {(r['name'], r['fingerprint']): r for r in rows}.values())} "
             f"complete); swept {', '.join(sw.swept) or '-'}; seeded {', '.join(sw.seeded) or '-'}"]
    for m in sw.members:
        lines.append(f"  {m.name}")
        for r in (r for r in rows if r["member"] == m.name):
            shared = f"  (shared x{r['shared']})" if r["shared"] > 1 else ""
            lines.append(f"    {r['name']:<{width}}  {r['fingerprint'][:16]}  {describe_state(r['state'], r['step'])}"
                         f"{shared}")
    return "\n".join(lines)


@command("baton report frozen-vs-finetuned")
def report(ref: Annotated[str, typer.Argument(metavar="SWEEP", show_default=False,
                                              help="a sweep's name, its sweep file or its MLflow sweep run id")],
           artifacts: Artifacts = None, as_json: AsJson = False, no_publish: Annotated[bool, typer.Option(
               "--no-publish", help="only the files: no MLflow / Prefect artifacts")] = False) -> None:
    """Charts + index.html of a sweep's finished results (artifacts/reports/NAME/), logged to its MLflow sweep run
    and published as a Prefect artifact. Never trains."""
    from flows.report import make_report

    art = artifacts_root(artifacts)
    rep = make_report(art, ref, publish=not no_publish)
    if as_json:
        _print_json(rep.to_json())
    else:
        print(rep.text())


def print_plan(recipe, art: Path, only: list[str] | None, force: list[str] | None, as_json: bool) -> None:
    """``baton run --dry-run``: per stage cached or will run, and why (flows.plan); nothing runs or is written."""
    from flows.fingerprint import plan_fingerprints
    from flows.plan import dry_run, needed_stages, render

    verdicts = dry_run(recipe, art, plan_fingerprints(recipe.stages), needed_stages(recipe, only), force)
    if as_json:
        _print_json({"recipe": recipe.name, "config": str(recipe.path), "artifacts": str(art), "dry_run": True,
                     "stages": [v.to_json() for v in verdicts]})
        return
    print(f"recipe {recipe.name} ({recipe.path}): dry run, nothing runs\n{render(verdicts)}")


@contextmanager
def _no_redirect() -> Iterator[None]:
    yield


def run_summary(recipe, out: dict, done_before: set[str], seconds: float) -> dict[str, Any]:
    """The JSON run summary: per stage whether it ran or was cached (complete before the run, or made by another
    run while this one waited for its lock), its seconds (of the run that made it),
    metrics, baselines and MLflow ids."""
    stages = []
    for name in (n for n in recipe.stages if n in out["results"]):  # recipe order, not completion order
        res = out["results"][name]
        info = res.get("info", {})
        stages.append({"name": name, "kind": recipe.stages[name].kind, "fingerprint": res.get("fingerprint"),
                       "state": "cached" if name in done_before or res.get("cached") else "ran",
                       "seconds": info.get("seconds"),
                       "metrics": res.get("metrics", {}), "baselines": res.get("baselines", {}),
                       "mlflow_run_id": info.get("mlflow_run_id"), "mlflow_model_id": info.get("mlflow_model_id"),
                       **({"ray_node": info["ray_node"]} if "ray_node" in info else {})})
    return {"recipe": recipe.name, "config": str(recipe.path), "seconds": round(seconds, 2),
            "mlflow_parent_run_id": out.get("parent_run_id") or None,
            "prefect_api_url": os.environ.get("PREFECT_API_URL"), "stages": stages}


def shipped_recipes() -> Path:
    """The recipes shipped with baton: ``configs/`` of a checkout, which the wheel installs as
    ``flows/configs/`` (pyproject.toml: package-dir)."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def recipe_summary(path: Path) -> str:
    """A recipe's first comment line that is not a command line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text:
                break
            continue
        text = text.lstrip("#").strip()
        if text and text.split()[0] not in ("baton", "make", "python"):
            return text
    return ""


@command("baton ls")
def ls() -> None:
    """The shipped recipes: name and what each one is (copy one with `baton cp`)."""
    paths = sorted(shipped_recipes().glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    for p in paths:
        print(f"{p.stem:<{width}}  {recipe_summary(p)}")


@command("baton cp vlp-tiny my-recipe.yaml")
def cp(name: Annotated[str, typer.Argument(help="a recipe from `baton ls`")],
       dest: Annotated[Path | None, typer.Argument(help="file or directory (default: ./NAME.yaml)")] = None,
       force: Annotated[bool, typer.Option("--force", help="overwrite DEST")] = False) -> None:
    """Copy a shipped recipe here, to edit it and run it with `baton run`."""
    import difflib

    known = {p.stem: p for p in shipped_recipes().glob("*.yaml")}
    src = known.get(name.removesuffix(".yaml"))
    if src is None:
        close = difflib.get_close_matches(name, known, n=1)
        raise RecipeError(f"cp {name}: no shipped recipe {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (`baton ls`: {', '.join(sorted(known))})")
    target = dest or Path(src.name)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise RecipeError(f"cp {name}: {target} exists (--force overwrites it)")
    shutil.copyfile(src, target)
    print(f"{target}  (run it: baton run {target})")


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


@command("baton resume 3f2a9c0d5e6b4a7f8e9d0c1b2a3f4e5d")
def resume(run_id: Annotated[str, typer.Argument(help="MLflow run id (parent or stage) or Prefect flow run id")],
           artifacts: Artifacts = None) -> None:
    """Rerun the exact recipe snapshot of an earlier invocation."""
    import tempfile

    import yaml
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    art = artifacts_root(artifacts)
    if not (art / "mlflow.db").exists():
        raise RecipeError(f"resume {run_id}: no MLflow store in {art} (set --artifacts or BATON_ARTIFACTS)")
    with open(art / ".mlflow-init.lock", "w") as lock:  # see flows.tracking.Tracking
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=tracking_uri(art))
    prun = _invocation_run(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(prun.info.run_id, "recipe.yaml", tmp)
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"resume {run_id}: run {prun.info.run_id} has no recipe.yaml snapshot ({e})") from None
        raw = yaml.safe_load(Path(path).read_text())
    recipe = load_recipe(prun.data.tags.get("baton.recipe", "recipe.yaml"), raw=raw)
    _check_writable(art)
    from flows.pipeline import run_pipeline

    print(f"resuming {recipe.name} from the snapshot of run {prun.info.run_id} ({prun.info.status})")
    out = run_pipeline(recipe, art)
    print(f"resumed {recipe.name}: {len(out['results'])} stages complete (MLflow parent run {out['parent_run_id']})")


_HELD: list = []  # the Prefect server's users lock (flows.server), held while this process runs


def _prefect_env(art: Path) -> dict[str, str]:
    """Environment for a Prefect CLI process that talks to the artifacts dir's server (found or started here)."""
    from flows.prefect_env import configure_prefect
    from flows.server import ensure_server

    configure_prefect(art)
    _HELD.append(ensure_server(art))
    return os.environ.copy()


server_app = typer.Typer(help="The artifacts dir's background Prefect server: the first `baton run` starts it, "
                              "later runs reuse it; it exits after $BATON_SERVER_IDLE_TIMEOUT seconds "
                              "(default 1800) without requests or runs.", no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("status", epilog="Example: baton server status")
def server_status(artifacts: Artifacts = None) -> int:
    """Its URL, pid and idle timeout; exit 3 when none is running."""
    from flows import server

    art = artifacts_root(artifacts)
    info = server.live_server(art)
    if info is None:
        print(f"no Prefect server for {art} (the next `baton run` starts one)")
        return 3
    idle = f", exits after {info['idle_timeout']:.0f}s idle" if info.get("idle_timeout") else ""
    print(f"Prefect server {info['url']} (pid {info['pid']}, started {info['started']}{idle})")
    return 0


@server_app.command("stop", epilog="Example: baton server stop")
def server_stop(artifacts: Artifacts = None) -> None:
    """Stop it (the next `baton run` starts a fresh one)."""
    from flows import server

    art = artifacts_root(artifacts)
    info = server.stop(art)
    print(f"stopped the Prefect server {info['url']} (pid {info['pid']})" if info else f"no Prefect server for {art}")


def _prefect_cli() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@command("baton prefect flow-run ls", add_help_option=False,
         context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def prefect(ctx: typer.Context, artifacts: Artifacts = None) -> int:
    """The Prefect CLI against baton's embedded Prefect database (arguments pass through, --help too)."""
    art = artifacts_root(artifacts)
    _check_writable(art)
    return subprocess.call([_prefect_cli(), *ctx.args], env=_prefect_env(art))


@command("baton retry 0b6c1f4e-5a2d-4c3b-9e8f-7a6b5c4d3e2f")
def retry(flow_run_id: Annotated[str, typer.Argument(help="the Prefect flow run id (a UUID)")],
          artifacts: Artifacts = None) -> int:
    """Retry a failed (or killed) Prefect flow run in place: same flow run id and recipe snapshot; finished
    stages are Cached."""
    import uuid

    art = artifacts_root(artifacts)
    _check_writable(art)
    try:
        fid = uuid.UUID(flow_run_id)
    except ValueError:
        raise RecipeError(f"retry {flow_run_id!r}: not a Prefect flow run id (a UUID)") from None
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
    rc = subprocess.call([_prefect_cli(), "flow-run", "retry", str(fid), "--entrypoint", f"{entry}:baton_pipeline"],
                         env=env)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fid)
    print(f"flow run {fid}: {fr.state.type.value if fr.state else 'unknown'} (run count {fr.run_count})")
    return rc


DEPLOYMENT = f"baton/{SUBMIT_DEPLOYMENT}"  # what `baton submit` runs (flows.deploy)


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


Db = Annotated[str | None, typer.Option(
    "--db", metavar="URL", show_default=False,
    help="team mode: postgresql://USER@HOST[:PORT]/DB for the Prefect server and an MLflow server, in the "
         "foreground (password: PGPASSFILE or PGPASSWORD, never in the URL; see flows.team)")]
MlflowPort = Annotated[int, typer.Option("--mlflow-port", help="MLflow server port (with --db)")]
ArtifactsDestination = Annotated[str | None, typer.Option(
    "--artifacts-destination", metavar="URI", show_default=False,
    help="where the MLflow server stores artifacts (with --db; default ARTIFACTS/mlartifacts), e.g. s3://bucket/x")]


@command("baton serve --port 4200 --limit 2 my-recipe.yaml   |   baton serve --db postgresql://baton@db/baton --artifacts /shared/baton")
def serve(recipes: Annotated[list[Path] | None, typer.Argument(
              metavar="RECIPE", show_default=False,
              help="recipes to serve besides those in ./configs (else the shipped ones)")] = None,
          host: Host = "127.0.0.1", port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
          limit: Annotated[int | None, typer.Option(help="flow runs executed at once (default: no limit)")] = None,
          artifacts: Artifacts = None, db: Db = None, mlflow_port: MlflowPort = 5000,
          artifacts_destination: ArtifactsDestination = None) -> None:
    """Prefect server + UI on loopback (unless PREFECT_API_URL or a running server of the artifacts dir answers),
    serving one deployment per recipe (baton/<recipe file stem>, a Run form: overrides, only, track) and baton/baton;
    with --db, the team servers on PostgreSQL instead.

    Runs of those deployments (the UI's Quick Run / Custom Run, `baton submit`) execute here; so do the ones the
    UI's Retry button puts back to Scheduled: finished stages are Cached and the failed one continues from its
    checkpoint. --db: the Prefect server and an MLflow tracking server on one PostgreSQL database, in the
    foreground; `baton run --server URL` on any machine then tracks over HTTP and locks stages with PostgreSQL
    leases. A --host other than loopback requires $BATON_AUTH or $BATON_AUTH_FILE (USER:PASSWORD)."""
    from flows.deploy import recipe_files, serve_deployments
    from flows.prefect_env import configure_prefect

    art = artifacts_root(artifacts).resolve()
    if db is not None:
        return _serve_team(db, art, host, port, mlflow_port, artifacts_destination)
    configs_dir = Path("configs") if Path("configs").is_dir() else shipped_recipes()
    served, skipped = recipe_files(recipes or [], configs_dir)  # bad input refused before a server starts
    _check_writable(art)
    configure_prefect(art)  # PREFECT_HOME=artifacts/prefect: the UI also shows the `baton run` flow runs
    url, proc = _serve_server(art, host, port)
    os.environ["PREFECT_API_URL"] = url
    try:
        _wait_healthy(url, proc, timeout=180)
        for why in skipped:
            print(f"not served (not a recipe): {why}", flush=True)
        names = ", ".join(f"baton/{p.stem}" for p, _ in served)
        print(f"Prefect UI: {url.removesuffix('/api')}  (API {url}); serving deployments {names} and {DEPLOYMENT}",
              flush=True)
        serve_deployments(served, art, limit)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _serve_team(db: str, art: Path, host: str, port: int, mlflow_port: int, destination: str | None) -> None:
    """``baton serve --db``: flows.team (checked before anything is created)."""
    from flows import team

    team.check_serve(db, host)
    _check_writable(art)
    team.serve_team(db, art, host, port, mlflow_port, destination)


def _serve_server(art: Path, host: str, port: int) -> tuple[str, subprocess.Popen | None]:
    """(url, our server process or None) for ``baton serve``: PREFECT_API_URL, the artifacts dir's running
    server, or a server with its UI started here (flows.server, no idle timeout) on ``port``."""
    from flows import server

    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url, None
    _HELD.append(server.hold_users_lock(art))
    info = server.live_server(art)
    if info is not None:
        print(f"using the running Prefect server of {art} ({info['url']}; started by `baton run`, so without "
              f"the UI: `baton server stop` first for the UI)", flush=True)
        return info["url"], None
    # its own session, so that Ctrl-C (SIGINT to the terminal's process group) reaches only this process: the
    # runner then shuts down through the server, and `finally` stops the server; it exits if this process dies
    proc = server.spawn(art, host=host, port=port, idle=0, ui=True, parent=os.getpid())
    try:
        return server.wait_started(art, proc)["url"], proc
    except BaseException:
        proc.terminate()
        raise


@command("baton submit configs/vlp-tiny.yaml stages.vqa.train.lr=3e-4 --wait")
def submit(config: Config, overrides: Overrides = None, only: Only = None, no_track: NoTrack = False,
           wait: Annotated[bool, typer.Option(help="wait for the flow run to finish; exit 1 unless it completed")]
           = False,
           port: Annotated[int, typer.Option(help="the `baton serve` port (when PREFECT_API_URL is unset)")] = 4200,
           artifacts: Artifacts = None, cluster: Cluster = None) -> int:
    """Run a recipe through the deployment baton/baton that `baton serve` serves (retryable from the UI); with
    --cluster, the served flow run (on the serving machine) runs the stages as Ray tasks on that cluster."""
    recipe = load_recipe(config, overrides or ())
    from flows.cluster import refuse_before_connecting
    from flows.plan import check_stage_names, needed_stages

    check_stage_names(recipe, {"--only": only})
    # what the config alone tells, before anything is submitted (the flow run checks the nodes when it connects)
    refuse_before_connecting(recipe, needed_stages(recipe, only), cluster)
    art = artifacts_root(artifacts).resolve()
    _check_writable(art)
    from flows.prefect_env import configure_prefect

    url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    configure_prefect(art)
    os.environ["PREFECT_API_URL"] = url
    _wait_healthy(url, None, timeout=10)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        fr = run_deployment(DEPLOYMENT, timeout=0, flow_run_name=recipe.name, parameters={
            "recipe_path": str(recipe.path), "recipe_snapshot": recipe.raw, "artifacts": str(art),
            "only": only, "track": not no_track, "cluster": cluster})
    except ObjectNotFound:
        raise RecipeError(f"no deployment {DEPLOYMENT} at {url}: start `baton serve` first") from None
    print(f"flow run {fr.id} ({fr.name}) submitted: {url.removesuffix('/api')}/runs/flow-run/{fr.id}", flush=True)
    if not wait:
        return 0
    from flows.progress import watch_flow_run

    with get_client(sync_client=True) as client:
        fr = watch_flow_run(client, fr.id)
    print(f"flow run {fr.id}: {fr.state.type.value} ({fr.state.message or ''})".rstrip(" ()"))
    return 0 if fr.state.is_completed() else 1


Ref = Annotated[str, typer.Argument(metavar="RUN_ID|MODEL_ID|STAGE", show_default=False,
                                    help="an MLflow stage run id, a LoggedModel id, a stage name or a stage dir")]
KeepDays = Annotated[float, typer.Option("--keep-days", metavar="N", help="keep dirs with MLflow run or file activity "
                                                                          "within N days")]


@command("baton dag configs/vlp-tiny.yaml --dot | dot -Tsvg > dag.svg")
def dag(config: Config, overrides: Overrides = None, artifacts: Artifacts = None, as_json: AsJson = False,
        dot: Annotated[bool, typer.Option("--dot", help="Graphviz text instead of the tree")] = False) -> None:
    """The recipe's stages as planned: kind, fingerprint, state, and the stages each needs."""
    from flows.lineage import plan_dag, render_dot, render_tree

    graph = plan_dag(load_recipe(config, overrides or ()), artifacts_root(artifacts))
    if as_json:
        _print_json(graph.to_json())
    else:
        print(render_dot(graph) if dot else render_tree(graph))


@command("baton lineage vqa --config configs/vlp-tiny.yaml")
def lineage(ref: Ref, config: Annotated[Path | None, typer.Option(
                "--config", show_default=False, help="a stage name means this recipe's planned stage (default: "
                                                      "the stage's newest complete dir)")] = None,
            artifacts: Artifacts = None, as_json: AsJson = False) -> None:
    """The chain of upstream stages of a stage run, LoggedModel or stage: fingerprints, runs, models, metrics."""
    from flows.lineage import lineage_chain, render_chain

    chain = lineage_chain(artifacts_root(artifacts), ref, load_recipe(config) if config else None)
    if as_json:
        _print_json({"of": chain[-1].to_json(), "chain": [n.to_json() for n in chain]})
    else:
        print(render_chain(chain))


@command("baton advise --from cnn --target data/my_set --recipe configs/transfer-2x2.yaml --json")
def advise(source: Annotated[str, typer.Option(
               "--from", metavar="STAGE", show_default=False,
               help="a finished cnn stage: its name (with --recipe: the recipe's planned dir; else the newest "
                    "complete dir), a stage dir or an MLflow run id")],
           target: Annotated[Path, typer.Option(
               "--target", metavar="PATH", show_default=False,
               help="a classification set in ImageNet layout (PATH/train/<wnid>/*.JPEG, or PATH/<wnid>/*)")],
           recipe: Annotated[Path | None, typer.Option("--recipe", metavar="CONFIG", show_default=False,
                                                       help="the recipe that planned --from")] = None,
           max_images: Annotated[int, typer.Option(min=10, help="images per dataset whose features are "
                                                                 "extracted (a random subset above)")] = 2000,
           artifacts: Artifacts = None, as_json: AsJson = False) -> None:
    """Place a target in the 2x2 (size x domain similarity) and recommend a transfer strategy; never trains."""
    from flows.advise import advise as run_advise
    from flows.advise import render

    doc = run_advise(artifacts_root(artifacts), source, target, load_recipe(recipe) if recipe else None,
                     max_images=max_images)
    print(json.dumps(doc, indent=2) if as_json else render(doc))


@command("baton gc --dry-run --keep-days 3 configs/vlp-tiny.yaml")
def gc(configs: Annotated[list[Path] | None, typer.Argument(
           metavar="[CONFIG]...", show_default=False,
           help="recipes whose stages are kept (default: every ./configs/*.yaml, else the shipped ones)")] = None,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go and the bytes it would free")] = False,
       keep_days: KeepDays = 7.0, artifacts: Artifacts = None, as_json: AsJson = False) -> None:
    """Remove stage dirs no recipe references and finished stages' checkpoints; never a referenced, recent
    (--keep-days) or locked dir."""
    from flows.gc import collect, recipes_for_gc, render_garbage

    configs_dir = Path("configs") if Path("configs").is_dir() else shipped_recipes()
    recipes = recipes_for_gc(configs or [], configs_dir)
    art = artifacts_root(artifacts)
    _join_store_team(art)
    items, freed = collect(art, recipes, keep_days=keep_days, dry_run=dry_run)
    if as_json:
        _print_json({"dry_run": dry_run, "bytes": freed, "recipes": [str(r.path) for r in recipes], "items": [
            {"path": str(g.path), "what": g.what, "bytes": g.bytes, "why": g.why} for g in items]})
    else:
        print(f"keeping the stages of {', '.join(str(r.path) for r in recipes)}")
        print(render_garbage(items, freed, dry_run))


def _join_store_team(art: Path) -> None:
    """A store served by `baton serve --db` (its team.json): its MLflow server and PostgreSQL stage leases, as a
    run's would be (flows.team), so gc sees stages that other machines hold."""
    from flows.team import client_auth_env, join_team, team_server

    url = team_server(art)
    if url:
        client_auth_env()
        join_team(url, art)


@command("baton ui --port 5000")
def ui(host: Host = "127.0.0.1", port: Annotated[int, typer.Option(help="MLflow UI port")] = 5000,
       workers: Annotated[int, typer.Option(help="server processes (MLflow's default, 4, each imports MLflow: on a "
                                                  "busy small machine uvicorn restarts them before they answer)")] = 1,
       artifacts: Artifacts = None) -> int:
    """MLflow UI over the artifact root's tracking store (runs, metrics, LoggedModels, lineage)."""
    from flows.tracking import tracking_uri

    art = artifacts_root(artifacts).resolve()
    art.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(art),
           "--host", host, "--port", str(port), "--workers", str(workers)]
    from flows.tracking import ML_LAYOUT

    print(f"MLflow UI on http://{host}:{port}/#/experiments{ML_LAYOUT}  ({' '.join(cmd)})")
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """``baton``: the exit status of the command (errors mapped by ``EXIT_CODES``; usage errors 2)."""
    cli = typer.main.get_command(app)
    try:
        rv = cli.main(args=argv, prog_name="baton", standalone_mode=False)
    except typer.Exit as e:  # --help, completion
        return e.exit_code
    except typer.TyperException as e:  # usage: unknown command (with "did you mean"), missing argument, ...
        e.show() if hasattr(e, "show") else print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except tuple(kind for kind, _ in EXIT_CODES) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(e, kind))
    except Interrupted as e:  # Ctrl-C during run / resume: the flow has recorded its final state
        print(f"interrupted: {e}", file=sys.stderr)
        interrupt.exit_now()  # 130, without Prefect's slow shutdown
    return rv if isinstance(rv, int) else 0


def program() -> None:
    """``python -m flows.cli`` / the ``baton`` script: ``main`` on sys.argv, then ``_exit_now``."""
    _exit_now(main())


def _exit_now(rc: int) -> None:
    """End the process as the interpreter would (wait for non-daemon threads, run the exit handlers: Prefect
    and MLflow flush there), minus the teardown of the ~5000 modules Prefect and MLflow imported, which
    takes seconds after a run."""
    import atexit
    import threading

    threading._shutdown()  # what Py_Finalize does first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    program()
