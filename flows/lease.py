"""Stage locks as leases in PostgreSQL, for a store that several machines share.

A ``flock`` on the stage dir is enough on one machine (the kernel drops it when its process dies) and is
what baton uses by default. Across machines it is not: many shared filesystems do not carry it between
nodes, and a pid means nothing on another host. So when the store is shared (``BATON_LOCK_DB`` names the
team database: ``baton run`` sets it from the team server, flows.team) a stage is held through a row

    baton.stage_lease(key, host, pid, token, acquired, heartbeat)

- taken with one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <the old lease is dead>``: atomic, no two
  holders, whatever the clocks of the nodes say (only the database's ``now()`` is used);
- kept alive by a heartbeat thread (every ``timeout / 4`` seconds);
- dead when its heartbeat is older than ``timeout`` (``BATON_LEASE_TIMEOUT``, default 60 s), or at once when
  its holder ran on *this* host (same hostname) and its pid is gone. A lease of another host is never judged by
  its pid: the same pid on two hosts is two processes;
- owned by its random ``token``, not by (host, pid): releasing or renewing someone else's lease is impossible.

A holder whose heartbeat fails to find its token (it was stalled past the timeout and was taken over) logs an
error and calls ``on_lost``: a stage process then exits at once (flows.execute), leaving the directory to the
process that took it over.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from stages.fsio import pid_alive

log = logging.getLogger("baton")
DB_ENV = "BATON_LOCK_DB"  # postgresql://user@host:port/db of the team server (no password: PGPASSFILE)
TIMEOUT_ENV = "BATON_LEASE_TIMEOUT"
HOST_ENV = "BATON_HOSTNAME"  # this machine's name in leases (default: socket.gethostname())
DEFAULT_TIMEOUT = 60.0

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS baton;
CREATE TABLE IF NOT EXISTS baton.stage_lease (
    key       text PRIMARY KEY,
    host      text NOT NULL,
    pid       integer NOT NULL,
    token     text NOT NULL,
    acquired  timestamptz NOT NULL DEFAULT now(),
    heartbeat timestamptz NOT NULL DEFAULT now()
)"""

_TAKE = """
INSERT INTO baton.stage_lease AS l (key, host, pid, token) VALUES (%(key)s, %(host)s, %(pid)s, %(token)s)
ON CONFLICT (key) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, token = EXCLUDED.token,
                                acquired = now(), heartbeat = now()
 WHERE l.heartbeat < now() - make_interval(secs => %(timeout)s) OR l.token = %(dead_token)s
RETURNING token"""

_HOLDER = """SELECT host, pid, token, extract(epoch FROM now() - heartbeat) FROM baton.stage_lease WHERE key = %s"""


def lease_db() -> str | None:
    """The team database that holds the stage leases, or None: the store is not shared (flock)."""
    return os.environ.get(DB_ENV) or None


def lease_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def hostname() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def connect(url: str):
    """A psycopg2 connection in autocommit mode (the password comes from PGPASSWORD or PGPASSFILE)."""
    import psycopg2

    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1), connect_timeout=10,
                            application_name="baton-lease")
    conn.autocommit = True
    return conn


def ensure_schema(conn) -> None:
    """Create baton.stage_lease once (an advisory lock keeps two first-time callers from racing)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('baton.stage_lease')")
        if cur.fetchone()[0] is not None:
            return
        cur.execute("BEGIN")
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('baton.stage_lease'))")
        cur.execute(_SCHEMA)
        cur.execute("COMMIT")


class Lease:
    """One stage lease: ``acquire`` (waits), heartbeats in a thread while held, ``release``."""

    def __init__(self, url: str, key: str, label: str = "", timeout: float | None = None, poll: float = 1.0,
                 host: str | None = None, pid: int | None = None, on_lost: Callable[[], None] | None = None):
        self.url, self.key, self.label, self.on_lost = url, key, label or key, on_lost
        self.timeout = lease_timeout() if timeout is None else timeout
        self.poll, self.host, self.pid = poll, host or hostname(), os.getpid() if pid is None else pid
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._conn, self._db = None, threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> tuple[str, int, str, float] | None:
        """(host, pid, token, seconds since its heartbeat) of the current lease row, or None."""
        with self._db, self._conn.cursor() as cur:
            cur.execute(_HOLDER, (self.key,))
            row = cur.fetchone()
        return (row[0], int(row[1]), row[2], float(row[3])) if row else None

    def try_acquire(self) -> bool:
        """Take the lease if it is free or dead; never waits."""
        held = self.holder()
        dead = held[2] if held and held[0] == self.host and not pid_alive(held[1]) else ""
        with self._db, self._conn.cursor() as cur:
            cur.execute(_TAKE, {"key": self.key, "host": self.host, "pid": self.pid, "token": self.token,
                                "timeout": self.timeout, "dead_token": dead})
            got = cur.fetchone() is not None
        if got and held is not None:
            why = "its process is gone" if dead else f"no heartbeat for {held[3]:.0f}s"
            log.info("[%s] took over the lease of %s pid %d (%s)", self.label, held[0], held[1], why)
        return got

    def acquire(self) -> None:
        self._conn = connect(self.url)
        ensure_schema(self._conn)
        said = None
        while not self.try_acquire():
            held = self.holder()
            if held is not None and held[:2] != said:
                log.info("[%s] %s pid %d holds its lease (heartbeat %.0fs ago, taken over after %.0fs); waiting",
                         self.label, held[0], held[1], held[3], self.timeout)
                said = held[:2]
            time.sleep(self.poll)
        self._beat = threading.Thread(target=self._heartbeat, name=f"baton-lease-{self.label}", daemon=True)
        self._beat.start()

    def renew(self) -> bool:
        """Refresh the heartbeat; False if the lease is no longer ours (taken over after a stall)."""
        with self._db, self._conn.cursor() as cur:
            cur.execute("UPDATE baton.stage_lease SET heartbeat = now() WHERE key = %s AND token = %s",
                        (self.key, self.token))
            return cur.rowcount == 1

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                kept = self.renew()
            except Exception as e:  # noqa: BLE001 - a database hiccup: try again next beat
                log.warning("[%s] lease heartbeat failed: %s", self.label, e)
                continue
            if not kept:
                log.error("[%s] lost its lease (no heartbeat for over %.0fs; another process took it over)",
                          self.label, self.timeout)
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return

    def stop_heartbeat(self) -> None:
        """Stop renewing without releasing (what a crashed or partitioned holder looks like)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()

    def release(self) -> None:
        self.stop_heartbeat()
        if self._conn is None:
            return
        try:
            with self._db, self._conn.cursor() as cur:
                cur.execute("DELETE FROM baton.stage_lease WHERE key = %s AND token = %s", (self.key, self.token))
        except Exception as e:  # noqa: BLE001 - the database is gone: the lease dies with its heartbeat
            log.warning("[%s] could not release its lease (%s); it expires after %.0fs", self.label, e, self.timeout)
        finally:
            self._conn.close()
            self._conn = None


@contextmanager
def stage_lease(url: str, key: str, label: str = "", poll: float = 1.0,
                on_lost: Callable[[], None] | None = None) -> Iterator[Lease]:
    """Hold the lease ``key`` (waiting for it) while the block runs; ``on_lost`` is called (from the heartbeat
    thread) if it is taken over meanwhile."""
    lease = Lease(url, key, label, poll=poll, on_lost=on_lost)
    try:
        lease.acquire()
        yield lease
    finally:
        lease.release()
