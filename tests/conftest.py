import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BATON = [sys.executable, "-m", "flows.cli"]


def baton(args: list[str], artifacts: Path, timeout: int = 600, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (real Prefect engine, real MLflow store under ``artifacts``)."""
    env = os.environ | {"BATON_ARTIFACTS": str(artifacts), "PYTHONUNBUFFERED": "1"} | (env or {})
    p = subprocess.run(BATON + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"baton {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


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
