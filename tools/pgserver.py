"""A throwaway PostgreSQL for tests: initdb + pg_ctl as the ``postgres`` user on 127.0.0.1 and a free port,
in a temp dir that user can read, stopped and removed after. ``python -m tools.pgserver`` starts one in the
foreground (for trying things by hand) and prints its URL.

    with postgres() as pg:          # pg.url: postgresql://baton@127.0.0.1:PORT/baton (trust auth on loopback)
        ...
``password=`` switches local auth to scram and sets the password of role ``baton`` (tests of PGPASSFILE).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    url: str  # without a password
    port: int
    data: Path


def _as_postgres(args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = args if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def postgres(password: str | None = None) -> Iterator[Postgres]:
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    top = Path(tempfile.mkdtemp(prefix="baton-pg-"))
    os.chmod(top, 0o755)
    if os.geteuid() == 0:
        shutil.chown(top, "postgres", "postgres")
    data, port = top / "data", free_port()
    try:
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        with open(data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{top}'\n"
                    "fsync = off\nsynchronous_commit = off\nmax_connections = 200\n")
        if password is not None:  # loopback TCP needs the password; the admin socket stays trust
            (data / "pg_hba.conf").write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                                              "host all all 127.0.0.1/32 scram-sha-256\n")
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(top / "log"), "-w", "-t", "60", "start"])
        pw = f" PASSWORD '{password}'" if password is not None else ""
        psql = [str(bindir / "psql"), "-h", str(top), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                "-c"]
        _as_postgres(psql + [f"CREATE ROLE baton LOGIN{pw}"])
        _as_postgres(psql + ["CREATE DATABASE baton OWNER baton"])
        yield Postgres(url=f"postgresql://baton@127.0.0.1:{port}/baton", port=port, data=data)
    finally:
        if (data / "postmaster.pid").exists():
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    import signal

    with postgres() as pg:
        print(pg.url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
