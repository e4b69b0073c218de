"""Stage locks of a shared store as PostgreSQL leases (flows.lease), and the shared-store probe.

A real PostgreSQL (tools/pgserver.py) on loopback. The holders are real processes: one is SIGKILLed while it
holds a stage; two use the same pid under different hostnames (what a cluster looks like to a pid check)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from tools.pgserver import pg_bin, postgres

from flows.lease import Lease, connect
from flows.store import StageDir, StoreError, probe_store

pytestmark = pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL is not installed")
FP = "ab" * 32

HOLDER = """
import sys, time
from flows.store import StageDir
with StageDir(sys.argv[1], "cnn", sys.argv[2]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def pg():
    with postgres() as p:
        yield p


def _env(pg, host: str, timeout: float = 3.0) -> dict:
    return os.environ | {"BATON_LOCK_DB": pg.url, "BATON_HOSTNAME": host, "BATON_LEASE_TIMEOUT": str(timeout)}


def _holder(pg, art, host: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(art), FP], env=_env(pg, host), stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _row(pg, key: str):
    with connect(pg.url) as c, c.cursor() as cur:
        cur.execute("SELECT host, pid FROM baton.stage_lease WHERE key = %s", (key,))
        return cur.fetchone()


def _take(pg, art, host: str, monkeypatch) -> float:
    """Seconds this process waits to lock the stage as ``host``."""
    for k, v in _env(pg, host).items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with StageDir(art, "cnn", FP).lock(poll=0.2):
        assert _row(pg, str(StageDir(art, "cnn", FP).path.resolve())) == (host, os.getpid())
        return time.monotonic() - t0


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "other-host"])
def test_sigkilled_holder_is_taken_over(pg, tmp_path, monkeypatch, same_host):
    """The holder is SIGKILLed with the lease held: on its own host the lease is taken at once (its pid is
    gone); from another host only after the heartbeat timeout (3 s here), since a pid says nothing there."""
    holder = _holder(pg, tmp_path, "node-a")
    key = str(StageDir(tmp_path, "cnn", FP).path.resolve())
    assert _row(pg, key) == ("node-a", holder.pid)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    waited = _take(pg, tmp_path, "node-a" if same_host else "node-b", monkeypatch)
    if same_host:
        assert waited < 2.0
    else:
        assert 1.5 < waited < 15
    assert _row(pg, key) is None  # released on exit


def test_same_pid_on_two_hosts(pg, tmp_path):
    """Two holders with one pid on different hostnames are two processes: the second waits, and takes over
    only once the first stops its heartbeat for the timeout; the first then finds it lost the lease."""
    key = str(tmp_path / "stages" / "bert" / FP[:16])
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is not alive on this machine
    a = Lease(pg.url, key, "bert", timeout=2.0, host="node-a", pid=dead.pid)
    b = Lease(pg.url, key, "bert", timeout=2.0, host="node-b", pid=dead.pid)
    a.acquire()
    try:
        b._conn = connect(pg.url)
        assert not b.try_acquire()  # node-a's pid is dead *here*, which says nothing about node-a
        assert b.holder()[:2] == ("node-a", dead.pid)
        time.sleep(2.5)
        assert not b.try_acquire(), "a lease with a live heartbeat was taken"
        a.stop_heartbeat()  # node-a stalls (partition, crash)
        t0 = time.monotonic()
        while not b.try_acquire():
            time.sleep(0.1)
            assert time.monotonic() - t0 < 10
        assert b.holder()[:3] == ("node-b", dead.pid, b.token)
        assert not a.renew(), "the stalled holder could still renew a lease that was taken over"
    finally:
        a.release()  # releases nothing of b's: the token differs
        assert b.holder()[2] == b.token
        b.release()


def test_probe_store(tmp_path):
    probe_store(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []  # it cleans up
    with pytest.raises(StoreError, match="/proc/self/fdinfo cannot hold a baton store: create"):
        probe_store("/proc/self/fdinfo")


def test_a_holder_that_lost_its_lease_is_told(pg, tmp_path):
    """A holder stalled past the timeout (its heartbeat cannot reach the database) is taken over; its next
    heartbeat finds the lease gone and calls on_lost (a stage process then exits: flows.execute)."""
    import threading

    key = str(tmp_path / "stages" / "vl" / FP[:16])
    lost = threading.Event()
    a = Lease(pg.url, key, "vl", timeout=1.0, host="node-a", on_lost=lost.set)
    b = Lease(pg.url, key, "vl", timeout=1.0, host="node-b")
    a.acquire()
    b._conn = connect(pg.url)
    try:
        with a._db:  # node-a stalls: its heartbeat thread waits here
            t0 = time.monotonic()
            while not b.try_acquire():
                time.sleep(0.1)
                assert time.monotonic() - t0 < 10
        assert lost.wait(5), "the stalled holder was not told"
        assert a.lost.is_set() and b.holder()[2] == b.token
    finally:
        a.release()
        b.release()


def test_gc_keeps_a_stage_whose_lease_another_machine_holds(pg, tmp_path, monkeypatch, root):
    """In a shared store gc sees leases, not only this machine's flocks: an old unreferenced stage dir whose
    lease a live holder on another host has is kept (and listed by nothing); once released it goes."""
    from fakestore import fake_stage

    from flows.gc import collect, find_garbage
    from stages.recipe import load_recipe

    micro = load_recipe(root / "configs" / "vlp-micro.yaml")
    sd = fake_stage(tmp_path, "world", "c" * 64, {}, age_days=30)
    for k, v in _env(pg, "node-gc", timeout=60).items():
        monkeypatch.setenv(k, v)
    other = Lease(pg.url, str(sd.path.resolve()), "world", timeout=60, host="node-a", pid=os.getpid())
    other.acquire()  # a stage run on node-a (no flock here: another machine)
    try:
        assert find_garbage(tmp_path, [micro], keep_days=7, mlflow=False) == []
        removed, _ = collect(tmp_path, [micro], keep_days=7, mlflow=False)
        assert removed == [] and sd.path.is_dir()
    finally:
        other.release()
    removed, _ = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert [g.path for g in removed] == [sd.path] and not sd.path.exists()
    assert _row(pg, str(sd.path.resolve())) is None  # gc released the lease it took to remove the dir
