"""Overhead of `baton run --cluster` (not shipped): the micro recipe embedded vs on a local two-node Ray
cluster (tools.raycluster), fresh artifacts each, and the time from `baton run` to the first stage's task
starting on a Ray node (its "[world] on Ray node" line).

    PYTHONPATH=$PWD python -m tools.measure_cluster [ROUNDS]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tools.raycluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "vlp-micro.yaml")


def run(art: Path, extra: list[str]) -> tuple[float, float | None, str]:
    """(seconds of `baton run`, seconds until the first stage task started on a node or None, stderr)."""
    from flows import server

    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "flows.cli", "run", CONFIG, *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
        wall = time.time() - t0
    finally:
        server.stop(art)  # the artifacts dir's background Prefect server that the run started
    if p.returncode:
        raise SystemExit(f"baton run {' '.join(extra)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    m = re.search(r"(\d\d:\d\d:\d\d\.\d\d\d) \| \[world\] on Ray node", p.stderr)
    first = None
    if m:
        day = datetime.fromtimestamp(t0).strftime("%Y-%m-%d ")
        first = datetime.strptime(day + m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() - t0
    return wall, first, p.stderr


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    tmp = Path(tempfile.mkdtemp(prefix="measure-cluster-"))
    with LocalRayCluster([{"a": 1}, {"b": 1}], num_cpus=1) as cluster:
        for r in range(rounds):
            wall, _, _ = run(tmp / f"embedded{r}", [])
            print(f"round {r}: embedded {wall:.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
            wall, first, _ = run(tmp / f"cluster{r}", ["--cluster", cluster.address])
            print(f"round {r}: cluster  {wall:.1f} s, first stage on a node after {first:.1f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
