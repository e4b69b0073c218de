"""One stage in its own process, both ends: launching it (from the flow) and the process itself.

    python -m flows.worker STAGE --snapshot FILE --artifacts DIR [--parent-run-id ID] [--threads N]
        [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT --rdzv-id ID --node-addr ADDR]   (flows.cluster)

The flow's task for a stage calls :func:`run_stage_process`, which starts this process and streams its
log lines into Prefect. Giving every executing stage its own process means concurrent stages do not
share torch's global RNG (so each stays reproducible), do not fight over the GIL or one OpenMP pool
(each sets its own thread count), release all their (GPU) memory when done, and a hard crash of one
stage cannot take the flow down. With ``runtime.nproc_per_node`` > 1 this process becomes the stage's
torch elastic agent (flows.execute -> stages.train.launch): it starts the N ranks (gloo on CPU, nccl on CUDA),
which stay in its process group, so a Ctrl-C or a kill of the group reaches every rank, and die with it.

The process is forked from a fork server that imported torch, MLflow and the stage kinds once
(:func:`prewarm_workers`), or with ``BATON_WORKER_START=spawn`` a fresh interpreter. Its input is a
snapshot file (:func:`write_snapshot`): resolved configs and fingerprints, so it imports only its kind.

Exit status (:data:`EXIT_OK`, :data:`EXIT_BAD_INPUT`, :data:`EXIT_CACHED`, :data:`EXIT_INTERRUPTED`, anything
else = a crash): 0 done, 2 a config or data error (never retried), 3 already complete, 130 stopped by SIGINT
(Ctrl-C, passed on by the flow: the process leads its own process group, see flows.interrupt), 1 anything else.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows import interrupt, progress
from flows.fingerprint import StagePlan
from flows.interrupt import EXIT_INTERRUPTED
from stages import kind_module, use_python_path
from stages.contract import StageError
from stages.recipe import Recipe, RecipeError
from stages.progress import PROGRESS_PREFIX

log = logging.getLogger("baton")
EXIT_OK, EXIT_BAD_INPUT, EXIT_CACHED = 0, 2, 3
ERROR_PREFIX = "error: "  # the child's last word on bad input, read back by the launching end
INTERRUPTED_PREFIX = "interrupted: "  # its last word on Ctrl-C: the step it reached, its newest checkpoint


# ---------------------------------------------------------------------------------------------- launching


def write_snapshot(artifacts: Path, recipe: Recipe, plans: dict[str, StagePlan], force: set[str] = frozenset()
                   ) -> Path:
    """What a stage process needs, already resolved (configs and fingerprints, the stages to rerun even if
    complete): it imports only its kind."""
    snapshot = Path(artifacts) / "tmp" / f"recipe-{os.getpid()}-{time.time_ns()}.json"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_text(json.dumps({
        "recipe": recipe.name, "plans": {n: p.to_json() for n, p in plans.items()}, "python_path": recipe.python_path,
        "force": sorted(force),
        "stages": {n: c.model_dump(mode="json", exclude_unset=True) for n, c in recipe.stages.items()}}))
    return snapshot


def _worker_start_method() -> str:
    m = os.environ.get("BATON_WORKER_START", "forkserver")
    if m not in ("forkserver", "spawn"):
        raise RecipeError(f"BATON_WORKER_START={m!r}: expected 'forkserver' or 'spawn'")
    return m


_prewarmed: dict[str, Any] = {}  # what the running fork server imported, and the code it imported
_active_workers = 0
_workers_lock = threading.Lock()


def _code_signature() -> tuple:
    """mtimes of baton's own modules: a long-lived process (a notebook, pytest) that edits stage code
    must not keep forking the old code."""
    root = Path(__file__).resolve().parents[1]
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for d in ("flows", "stages") for p in (root / d).rglob("*.py")))


def prewarm_workers(kinds: list[str]) -> None:
    """Start the stage-process fork server now, importing torch, transformers, MLflow and the recipe's
    stage kinds once, in the background, while the flow starts Prefect and MLflow. Each stage process is
    then a fork of that clean, single-threaded server (no Prefect, no event loop, no CUDA in it): ~0.1 s
    instead of the ~8-10 s a fresh interpreter spends importing them, per stage. A server that imported
    other kinds or older code is replaced (only between stages: stopping it kills its children)."""
    if not kinds or _worker_start_method() != "forkserver":
        return
    import multiprocessing as mp
    from multiprocessing import forkserver, resource_tracker

    from stages import KINDS

    mods = ["flows.worker", "flows.execute", "flows.tracking", "mlflow", "mlflow.tracking",
            "mlflow.store.tracking.sqlalchemy_store", *(KINDS[k] for k in kinds if k in KINDS)]
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
        # the terminal's Ctrl-C reaches the whole foreground process group: the fork server (which ignores
        # SIGINT only once its imports are done) starts with it blocked; forked_main unblocks it. (The
        # resource tracker first: starting it unblocks SIGINT in the calling thread.)
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            forkserver.ensure_running()  # returns at once; the server imports, then serves
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if nvml is None:
                os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
            else:
                os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        _prewarmed.update(mods=mods, sig=sig)


def launch_worker(name: str, snapshot: Path, artifacts: Path, parent_id: str, threads: int,
                  extra: list[str] = ()) -> tuple[int, list[str]]:
    """Run one stage in its own process (flows.worker), forwarding its log lines. Returns (exit code, last lines).
    The process is forked from the fork server (``prewarm_workers``), or with ``BATON_WORKER_START=spawn`` a
    fresh ``python -m flows.worker``. Either way its stdout and stderr (fds 1 and 2) come through a pipe."""
    argv = [name, "--snapshot", str(snapshot), "--artifacts", str(artifacts),
            "--threads", str(threads), *extra] + (["--parent-run-id", parent_id] if parent_id else [])
    env = os.environ | {"PYTHONUNBUFFERED": "1", "BATON_PROGRESS": "events"}
    cwd = Path(__file__).resolve().parents[1]
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def forward(lines) -> None:
        with progress.tracking(name) as bar:
            for line in lines:
                line = line.rstrip()
                if line.startswith(PROGRESS_PREFIX):  # a progress event (stages.train.progress), not text
                    try:
                        bar.handle(json.loads(line[len(PROGRESS_PREFIX):]))
                    except ValueError:
                        log.info(line)
                    continue
                tail.append(line)
                (log.warning if line.startswith(("error", "Traceback", "WARNING")) else log.info)(line)

    if _worker_start_method() == "spawn":
        with subprocess.Popen([sys.executable, "-m", "flows.worker", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, process_group=0) as p:
            interrupt.add_stage_process(p.pid)
            try:
                forward(p.stdout)
            finally:
                interrupt.remove_stage_process(p.pid)
        return p.returncode, list(tail)

    import multiprocessing as mp

    global _active_workers
    ctx = mp.get_context("forkserver")
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=forked_main, args=(argv, dict(env), str(cwd), w), name=f"baton-{name}")
    with _workers_lock:
        proc.start()
        _active_workers += 1
    interrupt.add_stage_process(proc.pid)  # forked_main makes it a process group leader first thing
    try:
        w.close()
        with os.fdopen(os.dup(r.fileno()), "r", errors="replace") as f:
            r.close()
            forward(f)
        proc.join()
    finally:
        interrupt.remove_stage_process(proc.pid)
        with _workers_lock:
            _active_workers -= 1
    return proc.exitcode, list(tail)


def run_stage_process(name: str, snapshot: Path, artifacts: Path, parent_id: str, threads: int,
                      extra: list[str] = ()) -> bool:
    """Execute stage ``name`` in its own process; True if it turned out to be complete already. A config
    or data error in the process is raised as StageError (never retried), a crash as RuntimeError.
    ``extra``: more arguments of the process (one node of a stage across nodes: :func:`node_args`)."""
    rc, tail = launch_worker(name, snapshot, artifacts, parent_id, threads, extra)
    if rc in (EXIT_OK, EXIT_CACHED):
        return rc == EXIT_CACHED
    if rc == EXIT_INTERRUPTED or interrupt.requested():
        said = next((ln[len(INTERRUPTED_PREFIX):] for ln in reversed(tail) if ln.startswith(INTERRUPTED_PREFIX)),
                    f"stage {name!r} interrupted (exit status {rc})")
        raise interrupt.Interrupted(said)
    msg = next((ln[len(ERROR_PREFIX):] for ln in reversed(tail) if ln.startswith(ERROR_PREFIX)), None)
    if rc == EXIT_BAD_INPUT and msg:
        raise StageError(msg)
    raise RuntimeError(f"stage {name!r}: worker exited with status {rc}:\n" + "\n".join(tail[-12:]))


def node_args(nnodes: int, node_rank: int, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """The stage process's arguments that make it node ``node_rank`` of a stage across ``nnodes`` nodes."""
    return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-endpoint", rdzv_endpoint,
            "--rdzv-id", rdzv_id]


# ---------------------------------------------------------------------------------------------- the process


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the flow process dies, so no orphan keeps writing a stage dir."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker")
    p.add_argument("stage")
    p.add_argument("--snapshot", required=True, type=Path, help="JSON: {recipe, plans, stages: resolved configs}")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--parent-run-id", default="")
    p.add_argument("--threads", type=int, default=None, help="torch threads when runtime.threads is unset")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of this stage (flows.cluster); then also:")
    p.add_argument("--node-rank", type=int, default=0, help="this node's (0 holds the lock, writes result.json)")
    p.add_argument("--rdzv-endpoint", default="", help="host:port of the c10d rendezvous store (node 0's)")
    p.add_argument("--rdzv-id", default="", help="the rendezvous' id, the same on every node")
    p.add_argument("--node-addr", default=None, help="the address other nodes reach this one at")
    args = p.parse_args(argv)
    _die_with_parent()
    # Ctrl-C reaches a stage only as the SIGINT the flow passes on (flows.interrupt); a flow started in the
    # background by a script (`baton run ... &`, nohup) hands its children SIGINT ignored, which would make
    # the stage deaf to it: KeyboardInterrupt -> a checkpointed stop, whatever was inherited
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        snap = json.loads(args.snapshot.read_text())
        block = snap["stages"][args.stage]
        use_python_path(snap.get("python_path", []))  # the recipe's rule, as in the flow's process
        cfg = kind_module(block["kind"]).Config.model_validate(block)
        if cfg.runtime.threads is None and args.threads:
            cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"threads": args.threads})})
        plans = {n: StagePlan.from_json(v) for n, v in snap["plans"].items()}
        from flows.execute import execute_stage, join_stage

        nodes = None
        if args.nnodes > 1:
            nodes = {"nnodes": args.nnodes, "node_rank": args.node_rank, "rdzv_endpoint": args.rdzv_endpoint,
                     "run_id": args.rdzv_id, "local_addr": args.node_addr}
            if args.node_rank > 0:
                uri = _tracking_uri(args.artifacts) if args.parent_run_id else None
                join_stage(args.stage, cfg, plans, args.artifacts, uri, nodes)
                return EXIT_OK
        tracking = None
        if args.parent_run_id:
            from flows.tracking import Tracking

            tracking = Tracking(args.artifacts, snap["recipe"])
        _, was_complete = execute_stage(args.stage, cfg, plans, args.artifacts, tracking, args.parent_run_id,
                                        force=args.stage in snap.get("force", ()), nodes=nodes)
        return EXIT_CACHED if was_complete else EXIT_OK
    except (StageError, RecipeError) as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # SIGINT from the flow (Ctrl-C); a StageInterrupted names the step
        print(f"{INTERRUPTED_PREFIX}{e or f'stage {args.stage!r} interrupted before training'}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _tracking_uri(artifacts: Path) -> str:
    from flows.tracking import tracking_uri

    return tracking_uri(artifacts)


def forked_main(argv: list[str], env: dict[str, str], cwd: str, out) -> None:
    """Entry of a stage process forked from the fork server (launch_worker): take the
    launching flow's environment and working directory, send fds 1 and 2 into its pipe ``out``, run."""
    import os

    os.setpgid(0, 0)  # its own process group: a terminal's Ctrl-C reaches the flow, which passes it on
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked in the fork server (prewarm_workers)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    for name, fd in (("stdout", 1), ("stderr", 2)):  # line by line into the pipe
        stream = getattr(sys, name)
        try:
            ok = stream.fileno() == fd
        except (AttributeError, OSError, ValueError):  # None (a server started without it), or not a file
            ok = False
        if ok:
            stream.reconfigure(line_buffering=True)
        else:
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda._is_in_bad_fork():  # CUDA was initialised in the fork server
        os.execv(sys.executable, [sys.executable, "-m", "flows.worker", *argv])  # a fresh interpreter
    sys.argv = ["flows.worker", *argv]
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)


if __name__ == "__main__":
    sys.exit(main())
