import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One torch thread in the test process (set before any test imports torch): on a small shared CPU two
# intra-op threads spin against each other (test_detector's stage run: 99 s on 2 threads beside other
# jobs, 6 s on one). Stage processes started by the CLI get their threads from the pipeline.
os.environ.setdefault("OMP_NUM_THREADS", "1")
BATON = [sys.executable, "-m", "flows.cli"]


def baton(args: list[str], artifacts: Path, timeout: int = 600, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (real Prefect engine, real MLflow store under ``artifacts``)."""
    env = os.environ | {"BATON_ARTIFACTS": str(artifacts), "PYTHONUNBUFFERED": "1"} | (env or {})
    p = subprocess.run(BATON + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"baton {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def wait_for_checkpoint(proc: subprocess.Popen, art: Path, stage: str, min_step: int, timeout: float = 600,
                        poll: float = 0.1) -> tuple[Path, int] | None:
    """While ``proc`` (a background `baton run`) runs: as soon as ``stage`` has a checkpoint at step >= min_step
    and no result.json yet, (its stage dir, its newest checkpoint step); None if ``proc`` ended or ``timeout``
    passed first. The tests that SIGKILL a stage (or a rank, or a node's process) mid-training wait here."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for sd in {d.parents[1] for d in art.glob(f"stages/{stage}/*/checkpoints/0*")}:
            steps = [int(d.name) for d in (sd / "checkpoints").glob("0*") if d.is_dir()]
            if steps and max(steps) >= min_step and not (sd / "result.json").exists():
                return sd, max(steps)
        time.sleep(poll)
    return None


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def _stop_background_servers(tmp_path_factory):
    """`baton run` leaves a background Prefect server per artifacts dir (flows.server): stop every one the
    session started under its temp dirs; the short idle timeout is the safety net if this never runs."""
    os.environ.setdefault("BATON_SERVER_IDLE_TIMEOUT", "300")
    yield
    from flows import server

    for found in tmp_path_factory.getbasetemp().glob("**/prefect/server.json"):
        server.stop(found.parent.parent)
