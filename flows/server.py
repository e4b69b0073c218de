"""One Prefect server per artifacts dir: found through a discovery file, started in the background when none
answers, reused by every later ``baton run``, gone after an idle timeout.

    artifacts/prefect/server.json          discovery file {url, pid, port, started, idle_timeout}, written atomically
                                           by the server once it answers, removed when it exits
    artifacts/prefect/server.start.lock    held around "find a live server or start one": two runs starting at
                                           once end up with one server
    artifacts/prefect/server.users.lock    every baton process that uses the server holds it shared while it runs
    artifacts/prefect/server.log           the background server's output

Idle means: no HTTP request for ``idle_timeout`` seconds AND nobody holds ``server.users.lock`` shared. The
request time covers the UI and other clients; the lock covers a run whose stages train for longer than the
timeout without an API call (a flock is released when its process dies, so a killed run never pins the server).
The server takes the users lock exclusively when it decides to exit and keeps it until its process is gone, so a
run that arrives meanwhile waits for it and then starts a fresh one.

``python -m flows.server ARTIFACTS [--port P] [--idle S] [--ui]`` runs the server in the foreground (``baton serve``
uses it with no idle timeout); ``ensure_server`` starts it detached (its own session: Ctrl-C of a run leaves it).
This module imports neither Prefect nor httpx at the top: discovering a live server costs milliseconds.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stages.fsio import pid_alive, write_json_atomic

IDLE_ENV = "BATON_SERVER_IDLE_TIMEOUT"  # seconds without requests or users before the background server exits
DEFAULT_IDLE = 1800.0


class ServerError(RuntimeError):
    pass


def prefect_home(artifacts: Path) -> Path:
    return Path(artifacts).resolve() / "prefect"


def discovery_path(artifacts: Path) -> Path:
    return prefect_home(artifacts) / "server.json"


def _lock_file(artifacts: Path, name: str):
    home = prefect_home(artifacts)
    home.mkdir(parents=True, exist_ok=True)
    return open(home / f"server.{name}.lock", "a")


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True if a Prefect API answers ``GET {url}/health`` with 200."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def read_discovery(artifacts: Path) -> dict | None:
    try:
        return json.loads(discovery_path(artifacts).read_text())
    except (OSError, ValueError):
        return None


def live_server(artifacts: Path) -> dict | None:
    """The discovery file's server if its process is alive and it answers; a stale file is removed."""
    info = read_discovery(artifacts)
    if info is None:
        return None
    if pid_alive(int(info.get("pid", 0))) and healthy(info["url"]):
        return info
    if not pid_alive(int(info.get("pid", 0))):
        discovery_path(artifacts).unlink(missing_ok=True)
    return None


def hold_users_lock(artifacts: Path):
    """Shared lock that keeps the background server alive while this process runs (released when it exits)."""
    f = _lock_file(artifacts, "users")
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


def idle_timeout() -> float:
    return float(os.environ.get(IDLE_ENV, DEFAULT_IDLE))


def spawn(artifacts: Path, host: str = "127.0.0.1", port: int = 0, idle: float | None = None, ui: bool = False,
          detached: bool = True, parent: int | None = None) -> subprocess.Popen:
    """Start ``python -m flows.server`` for this artifacts dir (detached: own session, output to server.log;
    ``parent``: it exits when that process is gone)."""
    from flows.prefect_env import configure_prefect

    configure_prefect(artifacts)
    cmd = [sys.executable, "-m", "flows.server", str(Path(artifacts).resolve()), "--host", host, "--port", str(port),
           "--idle", str(idle_timeout() if idle is None else idle)] + (["--ui"] if ui else []) + \
        (["--parent", str(parent)] if parent else [])
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("PREFECT_API_URL", None)
    with open(prefect_home(artifacts) / "server.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=detached, close_fds=True)


def wait_started(artifacts: Path, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    """The discovery file of the server ``proc`` once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (prefect_home(artifacts) / "server.log").read_text(errors="replace")[-2000:]
            raise ServerError(f"the Prefect server for {artifacts} exited with status {proc.returncode} before it "
                              f"answered:\n{tail}")
        info = read_discovery(artifacts)
        if info is not None and info.get("pid") == proc.pid and healthy(info["url"]):
            return info
        time.sleep(0.1)
    raise ServerError(f"the Prefect server for {artifacts} did not answer within {timeout:.0f}s "
                      f"(see {prefect_home(artifacts) / 'server.log'})")


def find_or_start(artifacts: Path) -> dict:
    """The live background server of this artifacts dir, started (detached) if none answers."""
    with _lock_file(artifacts, "start") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        info = live_server(artifacts)
        if info is not None:
            return info
        return wait_started(artifacts, spawn(artifacts))


def ensure_server(artifacts: Path, url: str | None = None):
    """Point this process's Prefect client at a server that answers, before Prefect is imported: ``url``
    (``--server``), else PREFECT_API_URL from the environment, else the artifacts dir's background server
    (started if none answers). Returns the users-lock file to keep open while the run lasts (or None)."""
    url = url or os.environ.get("PREFECT_API_URL")
    if url:
        if not healthy(url):
            raise ServerError(f"no Prefect server answers at {url}")
        os.environ["PREFECT_API_URL"] = url
        return None
    users = hold_users_lock(artifacts)
    os.environ["PREFECT_API_URL"] = find_or_start(artifacts)["url"]
    return users


def stop(artifacts: Path, timeout: float = 30.0) -> dict | None:
    """Stop the artifacts dir's background server (SIGTERM, then SIGKILL); the stopped server's info or None."""
    import signal

    info = read_discovery(artifacts)
    if info is None:
        return None
    pid = int(info["pid"])
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    discovery_path(artifacts).unlink(missing_ok=True)
    return info


class _LastRequest:
    """ASGI wrapper around Prefect's app that records when the last HTTP request arrived."""

    def __init__(self, app):
        self.app, self.at = app, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.at = time.monotonic()
        await self.app(scope, receive, send)


def _client_host(sock) -> str:
    host = sock.getsockname()[0]
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def ui_api_url(sock) -> str:
    """The API URL a browser is told to call: the bound address and port (a wildcard bind: this host's name,
    which other machines can reach)."""
    import socket

    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "", "::"):
        host = socket.getfqdn()
    return f"http://{host}:{port}/api"


async def _watch(server, app: _LastRequest, artifacts: Path, sock, idle: float, parent: int | None) -> None:
    """Write the discovery file once the server answers; stop it after ``idle`` seconds without requests
    and without users (idle <= 0: never), or once the ``parent`` process is gone."""
    import asyncio

    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)
    port = sock.getsockname()[1]
    write_json_atomic(discovery_path(artifacts), {
        "url": f"http://{_client_host(sock)}:{port}/api", "pid": os.getpid(), "port": port,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "idle_timeout": idle})
    users = _lock_file(artifacts, "users")
    while (idle > 0 or parent) and not server.should_exit:
        await asyncio.sleep(min(1.0, idle / 4) if idle > 0 else 1.0)
        if parent and not pid_alive(parent):
            print(f"baton: the process that started this server (pid {parent}) is gone: stopping", flush=True)
            server.should_exit = True
            break
        if idle <= 0 or time.monotonic() - app.at < idle:
            continue
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # kept until this process exits (see module doc)
        except BlockingIOError:
            continue
        print(f"baton: no request and no run for {idle:.0f}s: stopping", flush=True)
        server.should_exit = True


def serve(artifacts: Path, port: int = 0, idle: float = 0.0, ui: bool = False, host: str = "127.0.0.1",
          parent: int | None = None) -> None:
    """Run Prefect's API (and UI) for this artifacts dir in this process until stopped or idle."""
    import asyncio
    import socket

    from flows.prefect_env import configure_prefect

    configure_prefect(artifacts)
    prefect_home(artifacts).mkdir(parents=True, exist_ok=True)  # its database lives there
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    os.environ["PREFECT_SERVER_UI_ENABLED"] = "true" if ui else "false"
    os.environ.pop("PREFECT_API_URL", None)
    # what the UI is told to call (its /ui-settings): this server, not Prefect's default :4200. Set before
    # Prefect is imported (its settings are read then); one the user set (a proxy's URL) wins
    os.environ.setdefault("PREFECT_UI_API_URL", ui_api_url(sock))
    import uvicorn
    from prefect.server.api.server import create_app

    app = _LastRequest(create_app(ephemeral=not ui, final=True))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="error", timeout_graceful_shutdown=5))

    async def main() -> None:
        watcher = asyncio.ensure_future(_watch(server, app, artifacts, sock, idle, parent))
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
    try:
        asyncio.run(main())
    finally:
        info = read_discovery(artifacts)
        if info is not None and info.get("pid") == os.getpid():
            discovery_path(artifacts).unlink(missing_ok=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m flows.server", description="baton's Prefect server for one "
                                "artifacts dir (discovery file artifacts/prefect/server.json)")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--idle", type=float, default=0.0, help="exit after this many idle seconds (0: never)")
    p.add_argument("--ui", action="store_true")
    p.add_argument("--parent", type=int, help="exit when this process is gone (`baton serve`'s server)")
    a = p.parse_args()
    serve(a.artifacts, a.port, a.idle, a.ui, a.host, a.parent)
