"""One stage in its own process: ``python -m flows.worker STAGE --snapshot FILE --artifacts DIR``.

The flow's task for a stage starts this process and streams its log lines into Prefect. Giving
every executing stage its own process means concurrent stages do not share torch's global RNG
(so each stays reproducible), do not fight over the GIL or one OpenMP pool (each sets its own
thread count), release all their (GPU) memory when done, and a hard crash of one stage cannot take
the flow down. It is also where a multi-GPU stage becomes ``torchrun`` instead of ``python``.

Exit status: 0 done, 2 a config or data error (never retried), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from types import SimpleNamespace

from stages import kind_module, use_python_path
from stages.contract import StageError
from stages.recipe import RecipeError

log = logging.getLogger("baton")
EXIT_BAD_INPUT, EXIT_CACHED = 2, 3  # same as flows.pipeline


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the flow process dies, so no orphan keeps writing a stage dir."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker")
    p.add_argument("stage")
    p.add_argument("--snapshot", required=True, type=Path, help="JSON: {recipe, fingerprints, stages: resolved configs}")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--parent-run-id", default="")
    p.add_argument("--threads", type=int, default=None, help="torch threads when runtime.threads is unset")
    args = p.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        snap = json.loads(args.snapshot.read_text())
        block = snap["stages"][args.stage]
        use_python_path(snap.get("python_path", []))  # the recipe's rule, as in the flow's process
        cfg = kind_module(block["kind"]).Config.model_validate(block)
        if cfg.runtime.threads is None and args.threads:
            cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"threads": args.threads})})
        recipe = SimpleNamespace(name=snap["recipe"], stages={args.stage: cfg})
        from flows.pipeline import execute_stage

        tracking = None
        if args.parent_run_id:
            from flows.tracking import Tracking

            tracking = Tracking(args.artifacts, recipe.name)
        fps = {n: tuple(v) for n, v in snap["fingerprints"].items()}
        _, was_complete = execute_stage(args.stage, recipe, fps, args.artifacts, tracking, args.parent_run_id)
        return EXIT_CACHED if was_complete else 0
    except (StageError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def forked_main(argv: list[str], env: dict[str, str], cwd: str, out) -> None:
    """Entry of a stage process forked from the fork server (flows.pipeline.launch_worker): take the
    launching flow's environment and working directory, send fds 1 and 2 into its pipe ``out``, run."""
    import os

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
