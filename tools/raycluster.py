"""A local Ray cluster of several nodes on this machine, for tests and measurements (not shipped).

    with LocalRayCluster([{"vision": 1}, {"text": 1}]) as cluster:
        subprocess.run(["baton", "run", "configs/vlp-micro.yaml", "--cluster", cluster.address])

Every node is a ``ray start --block`` process in one process group of its own (stopped by killing that
group: never anyone else's Ray), on 127.0.0.1, with explicit free ports (the machine may run other people's
Ray clusters: nothing here uses Ray's default ports or /tmp/ray), a small object store and its own temp
dir. ``env`` is the nodes' environment (a node whose ``PYTHONPATH`` points at other code shows what code
shipping does).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECT_STORE_BYTES = 80 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


class LocalRayCluster:
    """``nodes``: one dict of custom resources per node (the first is the head); ``num_cpus`` per node."""

    def __init__(self, nodes: list[dict[str, float]], num_cpus: int = 1, env: dict[str, str] | None = None,
                 timeout: float = 90.0):
        self.nodes, self.num_cpus, self.timeout = nodes, num_cpus, timeout
        self.env = dict(env if env is not None else os.environ)
        self.procs: list[subprocess.Popen] = []
        self.temp = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _argv(self, i: int, resources: dict[str, float]) -> list[str]:
        worker_lo = 20000 + (self.port % 2000) * 20 + i * 10  # a private range of 10 worker ports per node
        argv = [_ray_cli(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus),
                "--num-gpus", "0", "--resources", json.dumps(resources), "--object-store-memory",
                str(OBJECT_STORE_BYTES), "--disable-usage-stats", "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--min-worker-port", str(worker_lo),
                "--max-worker-port", str(worker_lo + 9)]
        if i == 0:
            return argv + ["--head", "--port", str(self.port), "--include-dashboard", "false",
                           "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.temp)]
        return argv + ["--address", self.address]

    def __enter__(self) -> LocalRayCluster:
        env = self.env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
        try:
            for i, res in enumerate(self.nodes):
                log = open(self.temp / f"node{i}.log", "wb")
                self.procs.append(subprocess.Popen(self._argv(i, res), stdout=log, stderr=subprocess.STDOUT,
                                                   env=env, process_group=0))
                self._wait_nodes(i + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray node exited with {p.returncode}: {self.log_tail()}")
            if self._alive() >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"ray cluster {self.address}: {n} nodes not up in {self.timeout:.0f}s: {self.log_tail()}")

    def _alive(self) -> int:
        """Nodes registered with the head's GCS (a raylet writes its node id line to the log once up)."""
        return sum(1 for i in range(len(self.procs)) if "Ray runtime started" in self._log(i))

    def _log(self, i: int) -> str:
        try:
            return (self.temp / f"node{i}.log").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        return "\n".join(self._log(i)[-1500:] for i in range(len(self.procs)))

    def stop(self) -> None:
        """SIGKILL every node's process group, then any process of this cluster that left it (Ray workers
        are found by this cluster's own temp dir in their command line: nobody else's)."""
        import psutil

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs.clear()
        mine = str(self.temp)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(mine in a for a in proc.info["cmdline"] or ()):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()
