"""`baton serve` processes for tests and measurements (not shipped): each in its own process group, on
loopback, stopped by signalling that group.

    with serve(art, port, log) as (proc, env): ...   # deployments + the Prefect UI; env: for its clients
    team = TeamServers(pg.url, art); team.api, team.mlflow; team.stop()   # `baton serve --db` (flows.team)
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tools.pgserver import free_port

ROOT = Path(__file__).resolve().parents[1]
BATON = [sys.executable, "-m", "flows.cli"]


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group ``proc`` leads; SIGKILL it if it is not gone within ``timeout`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve(art: Path, port: int, log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
          timeout: float = 240) -> Iterator[tuple[subprocess.Popen, dict[str, str]]]:
    """`baton serve --port PORT` for the artifacts dir ``art`` (output in ``log``), once its UI answers; yields
    it and its environment (what `baton submit` and friends need to reach it: the artifacts dir, no other
    PREFECT_API_URL)."""
    env = (os.environ if env is None else env) | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1",
                                                   "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(BATON + ["serve", "--port", str(port)], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "Prefect UI: http://127.0.0.1" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"baton serve did not start within {timeout:.0f}s:\n"
                                   f"{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        yield proc, env
    finally:
        stop_group(proc, 30)


class TeamServers:
    """`baton serve --db URL --artifacts ART` (the Prefect server and an MLflow server on PostgreSQL) in its own
    process group; ``api`` / ``mlflow`` once it printed how to use it; ``lines``: everything it printed."""

    def __init__(self, db: str, art: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None):
        self.port, self.mlflow_port = free_port(), free_port()
        environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | (env or {})
        self.proc = subprocess.Popen(
            BATON + ["serve", "--db", db, "--artifacts", str(art), "--host", host, "--port", str(self.port),
                     "--mlflow-port", str(self.mlflow_port)],
            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("on each machine:"):
                break
        else:
            raise RuntimeError("baton serve --db exited:\n" + "".join(self.lines[-40:]))
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stdout], daemon=True).start()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"

    def stop(self) -> None:
        stop_group(self.proc)
