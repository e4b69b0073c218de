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
