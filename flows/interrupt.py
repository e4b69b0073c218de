"""Ctrl-C in the process that runs the flow (``baton run``, ``baton resume``).

The terminal sends SIGINT to its foreground process group. Only this process acts on it: the Prefect
server runs in its own session and stays up (flows.server), the fork server blocks it (flows.worker), and
each stage process runs in its own process group (flows.worker). So one owner decides what a Ctrl-C means:

- the first one is passed on to the stage processes that are running: each stops where it is, ends its
  MLflow run KILLED and exits with :data:`EXIT_INTERRUPTED`, its last line saying the step it reached and
  its newest checkpoint. No new stage starts; the flow ends the parent run KILLED, removes its recipe
  snapshot and finishes Cancelled; ``baton run`` prints one line and exits 130. With no stage process
  running, it is a plain KeyboardInterrupt (Prefect records the flow run Crashed).
- a second one kills the stage processes and exits at once (130).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
RESUME_HINT = "run the same `baton run` again to resume"


class Interrupted(Exception):
    """The run was stopped by Ctrl-C; the message says which stages stopped where."""


_requested = threading.Event()
_stage_pgids: set[int] = set()  # process groups of the running stage processes
_stopped: list[str] = []  # the stage processes' "interrupted at step k" lines


def requested() -> bool:
    return _requested.is_set()


def add_stage_process(pid: int) -> None:
    """A stage process (the leader of its own process group) started; if Ctrl-C came first, pass it on now."""
    _stage_pgids.add(pid)
    if _requested.is_set():
        _signal_group(pid, signal.SIGINT)


def remove_stage_process(pid: int) -> None:
    _stage_pgids.discard(pid)


def stage_stopped(line: str) -> None:
    _stopped.append(line)


def summary() -> str:
    """The one line ``baton run`` prints when interrupted."""
    where = "; ".join(_stopped) if _stopped else "no stage was training"
    return f"{where}: {RESUME_HINT}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # just forked: not yet the leader of its own group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, sig)


def _stop_fork_server() -> None:
    """The stage processes' fork server (flows.worker): left alone it spends seconds unloading torch."""
    fs = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(fs, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _stop_everything() -> None:
    for pgid in list(_stage_pgids):
        _signal_group(pgid, signal.SIGKILL)
    _stop_fork_server()


def exit_now() -> None:
    """After the flow has recorded its final state: exit 130 now, without waiting for the fork server to
    unload torch (seconds) or Prefect to drain its log queues (nothing there matters any more)."""
    _stop_everything()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _stop_now() -> None:
    """Second Ctrl-C: the stage processes go now, and so does this process."""
    _stop_everything()
    print(f"\ninterrupted again: stopped at once; {RESUME_HINT}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum, frame) -> None:
    if _requested.is_set():
        _stop_now()
    _requested.set()
    if not _stage_pgids:
        raise KeyboardInterrupt
    for pgid in list(_stage_pgids):
        _signal_group(pgid, signal.SIGINT)


@contextlib.contextmanager
def handling():
    """Ctrl-C handled as above while the block runs (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    _stopped.clear()
    old = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
