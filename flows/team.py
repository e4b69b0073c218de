"""Team servers on PostgreSQL: ``baton serve --db URL`` and the ``baton run``s that use it.

One PostgreSQL database holds everything a team shares, each part in its own schema:

    public        the Prefect server's tables (flow runs, task runs, deployments, variables)
    mlflow        the MLflow tracking server's tables (experiments, runs, metrics, LoggedModels)
    mlflow_auth   MLflow's basic-auth users (only when the servers require authentication)
    baton         stage leases (flows.lease)

``baton serve --db postgresql://USER@HOST:PORT/DB --artifacts /shared/baton`` runs, in the foreground, the
Prefect server (+ UI) and an MLflow tracking server (``mlflow server``, artifacts proxied to
``--artifacts-destination``, default ``/shared/baton/mlartifacts``), and publishes where MLflow and the lease
database are as the Prefect variable ``baton_team``; it also writes ``ARTIFACTS/team.json`` (its URL), so a
``baton run`` on that store uses it without ``--server`` and never starts a private server inside a shared
store. A run that finds that variable is in team mode: every stage tracks over HTTP to that MLflow (``BATON_TRACKING_URI``; no
process opens an SQLite file), stage locks become PostgreSQL leases (``BATON_LOCK_DB``), and the artifacts root
must be the team's store and pass ``flows.store.probe_store``.

Secrets never travel on a command line (``ps`` shows it to every user of the machine):
- the database password: PGPASSWORD or PGPASSFILE (libpq's ``~/.pgpass``; psycopg2 and asyncpg read both);
  a password in ``--db`` is refused;
- the servers' credentials ``user:password``: BATON_AUTH, or the file BATON_AUTH_FILE (mode 0600). They become
  the Prefect server's auth string (PREFECT_SERVER_API_AUTH_STRING; clients PREFECT_API_AUTH_STRING) and MLflow's
  basic-auth admin (clients MLFLOW_TRACKING_USERNAME / _PASSWORD), both set here from the same source.
The servers bind to loopback unless ``--host`` says otherwise; any other address is refused without credentials.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flows.server import ServerError

log = logging.getLogger("baton")
AUTH_ENV, AUTH_FILE_ENV = "BATON_AUTH", "BATON_AUTH_FILE"
TRACKING_ENV = "BATON_TRACKING_URI"  # the team's MLflow server (flows.tracking reads it)
VARIABLE = "baton_team"  # the Prefect variable that says where the rest of the team setup is
TEAM_FILE = "team.json"  # in the store while `baton serve --db` serves it: {prefect_api, pid, host}
SCHEMAS = ("mlflow", "mlflow_auth")


class TeamError(ServerError):
    """Team-mode input refused (names the option or variable, and where the value should go)."""


@dataclass(frozen=True)
class TeamDb:
    """The ``--db`` URL, checked: no password in it."""
    user: str
    host: str
    port: int
    name: str

    @classmethod
    def parse(cls, url: str) -> TeamDb:
        p = urllib.parse.urlsplit(url)
        if p.scheme.split("+")[0] not in ("postgresql", "postgres"):
            raise TeamError(f"--db {url}: expected postgresql://USER@HOST[:PORT]/DATABASE")
        if p.password is not None:
            shown = url.replace(f":{p.password}@", ":***@")
            raise TeamError(f"--db {shown}: a password on the command line is visible to every user of this machine "
                            f"(ps); put it in PGPASSFILE (~/.pgpass, mode 0600: "
                            f"{p.hostname}:{p.port or 5432}:{p.path.lstrip('/')}:{p.username}:PASSWORD) or PGPASSWORD")
        if not p.hostname or not p.username or not p.path.strip("/"):
            raise TeamError(f"--db {url}: expected postgresql://USER@HOST[:PORT]/DATABASE (user, host and database)")
        return cls(p.username, p.hostname, p.port or 5432, p.path.strip("/"))

    def url(self, driver: str = "", schema: str = "") -> str:
        opts = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql{'+' + driver if driver else ''}://{self.user}@{self.host}:{self.port}/{self.name}{opts}"


def credentials() -> tuple[str, str] | None:
    """(user, password) of the team servers from BATON_AUTH or BATON_AUTH_FILE, or None."""
    text, where = os.environ.get(AUTH_ENV), AUTH_ENV
    path = os.environ.get(AUTH_FILE_ENV)
    if not text and path:
        where = f"{AUTH_FILE_ENV}={path}"
        try:
            if os.stat(path).st_mode & 0o077:
                raise TeamError(f"{where}: readable by others (chmod 600 {path})")
            text = Path(path).read_text().strip()
        except OSError as e:
            raise TeamError(f"{where}: {e.strerror}") from None
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise TeamError(f"{where}: expected USER:PASSWORD")
    if len(password) < 12:  # MLflow's basic-auth app refuses a shorter admin password
        raise TeamError(f"{where}: the password must have at least 12 characters")
    return user, password


def client_auth_env() -> None:
    """Give this process's Prefect and MLflow clients (and the stage processes it starts) the team credentials."""
    cred = credentials()
    if cred is not None:
        os.environ.setdefault("PREFECT_API_AUTH_STRING", ":".join(cred))
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", cred[0])
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", cred[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api(url: str, method: str = "GET", body: dict | None = None) -> dict | None:
    """One Prefect API call with the auth string; None on 404."""
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        hint = " (set BATON_AUTH or BATON_AUTH_FILE to the team's user:password)" if e.code == 401 else ""
        raise TeamError(f"{method} {url}: HTTP {e.code}{hint}") from None
    return json.loads(text) if text else {}


# ---------------------------------------------------------------------------------------------- baton run


def join_team(prefect_url: str, artifacts: Path) -> dict | None:
    """If the Prefect server at ``prefect_url`` is a team server, switch this process to team mode (see the
    module doc) and return its ``baton_team`` variable; else None (single-machine mode, nothing changes)."""
    found = _api(f"{prefect_url.rstrip('/')}/variables/name/{VARIABLE}")
    if found is None:
        return None
    team = found["value"]
    art = Path(artifacts).resolve()
    if Path(team["artifacts"]) != art:
        raise TeamError(f"the team server at {prefect_url} uses the store {team['artifacts']}; this run's artifacts "
                        f"root is {art}: pass --artifacts {team['artifacts']} (every machine mounts it at that path)")
    from flows.store import probe_store

    probe_store(art)
    host = urllib.parse.urlsplit(prefect_url).hostname
    os.environ[TRACKING_ENV] = f"http://{host}:{team['mlflow_port']}"
    os.environ["BATON_LOCK_DB"] = team["lock_db"]
    log.info("team server %s: tracking to %s, stage leases in %s", prefect_url, os.environ[TRACKING_ENV],
             team["lock_db"])
    return team


# ---------------------------------------------------------------------------------------------- baton serve


def prepare_db(db: TeamDb) -> None:
    """Create the schemas MLflow and the leases use (Prefect uses ``public``); a clear error if unreachable."""
    from flows.lease import connect, ensure_schema

    try:
        conn = connect(db.url())
    except Exception as e:  # noqa: BLE001 - psycopg2.OperationalError: say which database and where secrets go
        raise TeamError(f"--db {db.url()}: cannot connect: {str(e).strip()} (the password comes from PGPASSFILE "
                        f"or PGPASSWORD)") from None
    with conn, conn.cursor() as cur:
        for schema in SCHEMAS:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        ensure_schema(conn)
    conn.close()


def _mlflow_cmd(db: TeamDb, art: Path, host: str, port: int, destination: str | None, auth: bool,
                workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db.url("psycopg2", "mlflow"),
           "--artifacts-destination", destination or (art / "mlartifacts").as_uri(), "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if not is_loopback(host):
        cmd += ["--allowed-hosts", "*"]  # authentication, not the Host header, guards a non-loopback server
    return cmd + (["--app-name", "basic-auth"] if auth else [])


def _mlflow_env(db: TeamDb, art: Path, cred: tuple[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    if cred is not None:
        ini = art / "prefect" / "mlflow-auth.ini"  # no secret in it: the admin comes from the environment
        ini.parent.mkdir(parents=True, exist_ok=True)
        ini.write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = {db.url('psycopg2', 'mlflow_auth').replace('%', '%%')}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": cred[0],
                "MLFLOW_AUTH_ADMIN_PASSWORD": cred[1]}
        # the UI's CSRF key: one server process, so a fresh key per start unless the team sets one
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return env


def _wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise TeamError(f"{' '.join(map(str, p.args[:4]))} exited with status {p.returncode} before {url} "
                                "answered (its output is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TeamError(f"{url} did not answer within {timeout:.0f}s")


def _reach(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops `baton serve --db` as Ctrl-C does


def check_serve(db_url: str, host: str) -> tuple[TeamDb, tuple[str, str] | None]:
    """Everything ``baton serve --db`` refuses, before anything starts."""
    db = TeamDb.parse(db_url)
    cred = credentials()
    if cred is None and not is_loopback(host):
        raise TeamError(f"--host {host}: a server reachable from other machines requires authentication; put "
                        f"USER:PASSWORD in {AUTH_ENV} or in a file named by {AUTH_FILE_ENV} (mode 0600), never on "
                        "the command line")
    return db, cred


def serve_team(db_url: str, artifacts: Path, host: str = "127.0.0.1", port: int = 4200, mlflow_port: int = 5000,
               destination: str | None = None, workers: int = 1) -> None:
    """``baton serve --db``: the Prefect server (+ UI) and the MLflow server on PostgreSQL, in the foreground
    until Ctrl-C or SIGTERM (then both stop)."""
    from flows import server
    from flows.store import probe_store

    db, cred = check_serve(db_url, host)
    art = Path(artifacts).resolve()
    probe_store(art)
    prepare_db(db)
    server.prefect_home(art).mkdir(parents=True, exist_ok=True)
    os.environ |= {"PREFECT_SERVER_DATABASE_CONNECTION_URL": db.url("asyncpg")}
    if cred is not None:
        os.environ["PREFECT_SERVER_API_AUTH_STRING"] = ":".join(cred)
        os.environ["PREFECT_API_AUTH_STRING"] = ":".join(cred)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        procs.append(server.spawn(art, host=host, port=port, idle=0, ui=True, detached=False))
        procs.append(subprocess.Popen(_mlflow_cmd(db, art, host, mlflow_port, destination, cred is not None, workers),
                                      env=_mlflow_env(db, art, cred), stdin=subprocess.DEVNULL))
        api = server.wait_started(art, procs[0])["url"]
        _wait_http(f"http://{_reach(host)}:{mlflow_port}/health", procs)
        _publish(api, {"mlflow_port": mlflow_port, "lock_db": db.url(), "artifacts": str(art)})
        _write_team_file(art, host, port)
        print(f"Prefect UI and API: {api.removesuffix('/api')}  (database {db.url()}, schema public)\n"
              f"MLflow: http://{_reach(host)}:{mlflow_port}  (schema mlflow; artifacts "
              f"{destination or art / 'mlartifacts'})\n"
              f"on each machine: baton run RECIPE --server {api} --artifacts {art}"
              + (f"  (with {AUTH_ENV} or {AUTH_FILE_ENV} set)" if cred else ""), flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        raise TeamError(f"a team server exited (status {[p.poll() for p in procs]}); stopping the other")
    except KeyboardInterrupt:
        print("baton serve: stopping the team servers", flush=True)
    finally:
        _stop(procs)
        if (read_team_file(art) or {}).get("pid") == os.getpid():
            (art / TEAM_FILE).unlink(missing_ok=True)


def _write_team_file(art: Path, host: str, port: int) -> None:
    """``ARTIFACTS/team.json``: the team server's URL as other machines reach it, so that a ``baton run`` on
    this store without ``--server`` uses the team server instead of starting a private SQLite one in it."""
    import socket

    from stages.fsio import write_json_atomic

    reach = socket.getfqdn() if host in ("0.0.0.0", "", "::") else host
    write_json_atomic(art / TEAM_FILE, {"prefect_api": f"http://{reach}:{port}/api", "pid": os.getpid(),
                                        "host": socket.gethostname()})


def read_team_file(artifacts: Path) -> dict | None:
    try:
        return json.loads((Path(artifacts) / TEAM_FILE).read_text())
    except (OSError, ValueError):
        return None


def team_server(artifacts: Path) -> str | None:
    """The Prefect API URL of the team server that serves this store (``team.json``), or None. Raises
    TeamError when it does not answer: a shared store never falls back to a private server."""
    from flows.server import healthy

    url = (read_team_file(artifacts) or {}).get("prefect_api")
    if url and not healthy(url, timeout=10):
        f = Path(artifacts) / TEAM_FILE
        raise TeamError(f"{f} names the team server {url}, which does not answer: start `baton serve --db ...` "
                        f"again, or delete {f} if no team server serves this store any more")
    return url


def _publish(api: str, team: dict) -> None:
    """Set the Prefect variable ``baton_team`` (create or update)."""
    if _api(f"{api}/variables/name/{VARIABLE}") is None:
        _api(f"{api}/variables/", "POST", {"name": VARIABLE, "value": team, "tags": ["baton"]})
    else:
        _api(f"{api}/variables/name/{VARIABLE}", "PATCH", {"value": team})


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
