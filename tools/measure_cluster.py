"""Overhead of the cluster and team modes (not shipped), in one run: the micro recipe, fresh artifacts each time,

    embedded  `baton run CONFIG`: the artifacts dir's background Prefect server (started by the run) and SQLite
              MLflow, every stage a process of this machine;
    ray       `baton run CONFIG --cluster ADDRESS` on a local two-node Ray cluster (tools.raycluster, one CPU
              per node), plus the time from `baton run` to the first stage's task starting on a Ray node (its
              "[world] on Ray node" line);
    team      `baton run CONFIG --server URL` against `baton serve --db` (the Prefect server and an MLflow
              tracking server on one PostgreSQL, tools.pgserver; started before the clock starts, as a lab's
              long-lived servers are): tracking over HTTP, stage locks as PostgreSQL leases.

    PYTHONPATH=$PWD python -m tools.measure_cluster [--rounds N] [--modes embedded,ray,team] [--json FILE]

The modes alternate within each round, so a change in the machine's load hits all of them alike; each line
says the load average when the run ended.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "vlp-micro.yaml")


def run(art: Path, extra: list[str], stop_server: bool = True) -> tuple[float, float | None, str]:
    """(seconds of `baton run`, seconds until the first stage task started on a Ray node or None, stderr)."""
    from flows import server

    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1", "BATON_BARS": "0"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "flows.cli", "run", CONFIG, *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
        wall = time.time() - t0
    finally:
        if stop_server:
            server.stop(art)  # the artifacts dir's background Prefect server that the run started
    if p.returncode:
        raise SystemExit(f"baton run {' '.join(extra)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    # "HH:MM:SS.mmm | INFO    | baton - [world] on Ray node ..." (Prefect's console format) or "HH:MM:SS.mmm | [world]
    # on Ray node ..." (baton's own handler, where Prefect did not set up logging in the Ray worker)
    m = re.search(r"(\d\d:\d\d:\d\d\.\d\d\d) \|(?: \w+ +\| [\w.]+ -)? \[world\] on Ray node", p.stderr)
    first = None
    if m:
        day = datetime.fromtimestamp(t0).strftime("%Y-%m-%d ")
        first = datetime.strptime(day + m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() - t0
    if "--cluster" in extra and first is None:
        raise SystemExit(f"no '[world] on Ray node' line in the output of baton run {' '.join(extra)}:\n"
                         f"{p.stderr[-3000:]}")
    return wall, first, p.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--modes", default="embedded,ray,team", type=lambda s: s.split(","))
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="measure-cluster-"))
    rows: list[dict] = []
    from contextlib import ExitStack

    from tools.pgserver import postgres
    from tools.raycluster import LocalRayCluster
    from tools.servers import TeamServers

    with ExitStack() as stack:
        cluster = stack.enter_context(LocalRayCluster([{"a": 1}, {"b": 1}], num_cpus=1)) \
            if "ray" in args.modes else None
        pg = stack.enter_context(postgres()) if "team" in args.modes else None
        for r in range(args.rounds):
            for mode in args.modes:
                art = tmp / f"{mode}{r}"
                first = None
                if mode == "embedded":
                    wall, _, err = run(art, [])
                elif mode == "ray":
                    wall, first, err = run(art, ["--cluster", cluster.address])
                else:
                    team = TeamServers(pg.url, art)
                    try:
                        wall, _, err = run(art, ["--server", team.api], stop_server=False)
                    finally:
                        team.stop()
                    assert not list(art.rglob("*.db")), "a team run opened an SQLite store"
                (tmp / f"{mode}{r}.stderr").write_text(err)
                row = {"round": r, "mode": mode, "seconds": round(wall, 1), "load": round(os.getloadavg()[0], 2)}
                if first is not None:
                    row["first_stage_on_node_s"] = round(first, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"stderr of each run: {tmp}/<mode><round>.stderr", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
