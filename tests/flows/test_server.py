"""The server model (flows.server): one background Prefect server per artifacts dir, found through
artifacts/prefect/server.json, shared by concurrent runs, gone after its idle timeout or `baton server stop`."""
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows import server
from tests.conftest import ROOT, baton


def wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout}s")


@pytest.fixture
def art(tmp_path, monkeypatch):
    """An artifacts dir whose background server (if any test starts one) is stopped afterwards."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    a = tmp_path / "artifacts"
    yield a
    server.stop(a)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_discovery_file_is_removed(art):
    server.discovery_path(art).parent.mkdir(parents=True)
    server.discovery_path(art).write_text(f'{{"url": "http://127.0.0.1:9/api", "pid": {dead_pid()}}}')
    assert server.live_server(art) is None
    assert not server.discovery_path(art).exists()


def test_idle_server_exits_but_not_while_a_run_holds_it(art, monkeypatch):
    monkeypatch.setenv(server.IDLE_ENV, "3")
    server.discovery_path(art).parent.mkdir(parents=True)
    server.discovery_path(art).write_text(f'{{"url": "http://127.0.0.1:9/api", "pid": {dead_pid()}}}')
    users = server.hold_users_lock(art)  # a run in progress (e.g. a long stage making no API calls)
    info = server.find_or_start(art)  # the stale discovery file is replaced
    assert server.healthy(info["url"]) and info["idle_timeout"] == 3
    assert server.find_or_start(art)["pid"] == info["pid"]  # found, not started again
    p = baton(["server", "status"], art)
    assert info["url"] in p.stdout and f"pid {info['pid']}" in p.stdout
    time.sleep(6)
    assert server.pid_alive(info["pid"]) and server.discovery_path(art).exists()
    users.close()
    wait_until(lambda: not server.discovery_path(art).exists(), 60, "the idle server removes its discovery file")
    wait_until(lambda: not server.pid_alive(info["pid"]), 30, "the idle server exits")
    assert "no request and no run for 3s" in (server.prefect_home(art) / "server.log").read_text()
    assert baton(["server", "status"], art, check=False).returncode == 3


def test_baton_server_stop(art):
    """`baton server stop` ends the process the discovery file names (here a stand-in) and removes the file."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        server.discovery_path(art).parent.mkdir(parents=True)
        server.discovery_path(art).write_text(f'{{"url": "http://127.0.0.1:9/api", "pid": {proc.pid}}}')
        p = baton(["server", "stop"], art)
        assert f"pid {proc.pid}" in p.stdout
        assert proc.wait(timeout=30) is not None and not server.discovery_path(art).exists()
    finally:
        proc.kill()
    assert "no Prefect server" in baton(["server", "stop"], art).stdout


def test_concurrent_processes_start_one_server(art):
    """Two processes that find-or-start at once, with a stale discovery file in place: one server."""
    server.discovery_path(art).parent.mkdir(parents=True)
    server.discovery_path(art).write_text(f'{{"url": "http://127.0.0.1:9/api", "pid": {dead_pid()}}}')
    code = "import sys; from flows import server; print(server.ensure_server(sys.argv[1]) and server.read_discovery(sys.argv[1])['pid'])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(art)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    pids = {p.communicate(timeout=300)[0].strip() for p in procs}
    info = server.read_discovery(art)
    assert pids == {str(info["pid"])} and server.healthy(info["url"])


@pytest.mark.slow
def test_concurrent_runs_share_one_background_server(art):
    """Two `baton run` started at once with no server running end up with one background server: both runs
    complete (the stage lock lets one train `world`, the other finds it Cached) and the server outlives them."""
    cmd = ["run", "configs/vlp-micro.yaml", "runtime.threads=1", "--only", "world"]
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda _: baton(cmd, art).stdout, range(2)))
    info = server.read_discovery(art)
    assert info is not None and server.pid_alive(info["pid"]) and server.healthy(info["url"])
    for out in outs:
        assert f"Prefect server {info['url']})" in out, out[-2000:]
        assert "recipe vlp-micro: 1 stages" in out


def test_run_uses_the_server_it_is_given(art, tmp_path):
    """--server URL that does not answer: an error naming it, and no background server started."""
    p = baton(["run", "configs/vlp-micro.yaml", "--only", "world", "--server", "http://127.0.0.1:9/api"], art,
              check=False)
    assert p.returncode == 1 and "no Prefect server answers at http://127.0.0.1:9/api" in p.stderr
    assert not server.discovery_path(art).exists()
    assert not Path(tmp_path / "artifacts" / "stages").exists()
