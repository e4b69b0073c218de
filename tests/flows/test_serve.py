"""Retrying a failed run from the Prefect UI: `baton serve` (a Prefect server with its UI on loopback,
serving the flow as deployment baton/baton), `baton submit` (a run of that deployment), a stage process
killed mid-training, then exactly the request the UI's Retry button sends. The served process runs the
same flow run again: finished stages are Cached and the killed one continues from its checkpoint."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tools.faults import ROOT, Watch, check_consistency, snapshot_code
from tools.pgserver import free_port
from tools.servers import serve

CONFIG = "configs/vlp-micro.yaml"
OVER = ["stages.vqa.train.steps=30", "runtime.checkpoint_every=2"]


def wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    pytest.fail(f"{what}: not within {timeout}s\n{tail}")


@pytest.fixture
def served(tmp_path):
    code, _ = snapshot_code(tmp_path / "code", ROOT / CONFIG)
    art, port, log = tmp_path / "artifacts", free_port(), tmp_path / "serve.log"
    with serve(art, port, log, cwd=code) as (_, env):
        yield code, art, port, log, env


@pytest.mark.slow  # ~2-3 min: a Prefect server with its UI, a served deployment, two flow runs
def test_retry_from_the_prefect_ui_resumes_the_failed_stage(served):
    code, art, port, log, env = served
    api = f"http://127.0.0.1:{port}/api"

    def submit():
        p = subprocess.run([sys.executable, "-m", "flows.cli", "submit", CONFIG, *OVER, "--port", str(port)], cwd=code,
                           env=env, capture_output=True, text=True, timeout=300)
        if p.returncode == 2 and "no deployment" in p.stderr:  # `serve` registers it a moment after the UI is up
            return None
        assert p.returncode == 0, p.stdout + p.stderr
        return re.search(r"flow run ([0-9a-f-]{36}) \(vlp-micro\) submitted", p.stdout).group(1)

    fid = wait(submit, 60, "deployment baton/baton registered")
    st = subprocess.run([sys.executable, "-m", "flows.cli", "status", CONFIG, *OVER], cwd=code, env=env,
                        capture_output=True, text=True)
    fp16 = re.search(r"vqa\s+(\w{16})\s+not started", st.stdout).group(1)
    vqa = art / "stages" / "vqa" / fp16

    def flow_run() -> dict:
        return httpx.get(f"{api}/flow_runs/{fid}").json()

    # kill vqa's stage process (as the OOM killer would) once it has written a checkpoint
    w = Watch("vqa", vqa, 30)

    def vqa_checkpoint() -> bool:
        state = flow_run()["state"] or {}
        assert state.get("type") not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), \
            (state, log.read_text(errors="replace")[-4000:])
        return bool(w.checkpoints())

    wait(vqa_checkpoint, 400, "vqa checkpoint", log=log)
    pid = w.lock_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    state = wait(lambda: (flow_run()["state"] or {}).get("type") in ("FAILED", "CRASHED") and flow_run()["state"],
                 120, "flow run failed", log=log)
    assert not (vqa / "result.json").exists()
    killed_at = max(w.checkpoints())
    n_before = log.read_text().count("[world] done in")

    # what the UI's Retry button sends (prefect-ui-library: retryFlowRun)
    r = httpx.post(f"{api}/flow_runs/{fid}/set_state", json={
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": False})
    assert r.status_code in (200, 201) and r.json()["status"] == "ACCEPT", (state, r.text)
    final = wait(lambda: flow_run()["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") and
                 flow_run()["run_count"] >= 2 and flow_run(), 300, "retried flow run finished", log=log)
    text = log.read_text(errors="replace")
    assert final["state"]["type"] == "COMPLETED", text[-4000:]
    assert final["id"] == fid and final["run_count"] >= 2
    m = re.findall(r"\[vqa\] resumed from checkpoint at step (\d+)", text)
    assert m and int(m[-1]) == killed_at, text[-4000:]
    assert text.count("[world] done in") == n_before  # nothing upstream trained again
    for s in ("world", "cnn", "detector", "bert", "vl", "caption"):  # the first attempt started from nothing
        assert f"[{s}] cached:" in text, (s, text[-4000:])
    assert (vqa / "result.json").exists()
    assert check_consistency(art) == []
