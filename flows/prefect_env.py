"""Prefect's side of a baton process: settings and the flow-run liveness lock.

``configure_prefect`` must run before Prefect is imported. The artifacts dir's Prefect server (flows.server)
keeps its SQLite database in ``artifacts/prefect`` (PREFECT_HOME). The liveness lock lets ``baton retry`` tell a flow run that is
still executing from one that Prefect shows as Running because its process was killed.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from stages.fsio import flock_held

# Quiet, fast embedded Prefect: no analytics, no UI build, no background services a single local
# run does not need (they poll SQLite and cause "database is locked" noise).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
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
    return flock_held(flow_run_lock_path(artifacts, flow_run_id))
