"""Robustness of `baton run` as a whole: SIGKILLs anywhere (tools.faults), two runs at once, `baton resume`.

The runs here use a snapshot of flows/ + stages/ (tools.faults.snapshot_code), so that edits to the
working tree while a test runs do not change fingerprints between its runs.

Determinism: the comparisons are exact (metrics and every output file). ``runtime.deterministic=true``
makes the micro recipe bitwise reproducible on CPU; each executing stage runs in its own process
(flows.worker), so concurrent stages never share torch's process-wide RNG."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.faults import ROOT, check_consistency, run_harness, snapshot_code

CONFIG = "configs/vlp-micro.yaml"
STAGES = ["world", "cnn", "detector", "bert", "vl", "caption", "vqa"]
DETERMINISTIC = ["runtime.deterministic=true"]
# long version (= `make faults-long`): enough steps and checkpoints that 20 kills per stage land inside
# training; one stage at a time, so that no stage completes while another one is the target
LONG_OVERRIDES = ["max_concurrency=1"] + DETERMINISTIC + ["runtime.checkpoint_every=1", "runtime.log_every=2"] + [
    f"stages.{s}.train.steps={n}" for s, n in
    (("cnn", 24), ("detector", 20), ("bert", 24), ("vl", 24), ("caption", 20), ("vqa", 20))]


def ran(output: str) -> list[str]:
    return re.findall(r"\[(\w+)\] done in", output)


def cached(output: str) -> list[str]:
    return re.findall(r"\[(\w+)\] cached:", output)


def check_report(rep: dict, min_kills: int) -> None:
    summary = {k: rep[k] for k in ("kills_per_stage", "phases_hit", "misses", "failures", "metric_diffs",
                                   "output_diffs", "problems", "mlflow_problems", "loss_history_diffs",
                                   "final_exit")}
    assert rep["all_completed"], summary
    assert rep["metrics_identical"], summary
    assert rep["outputs_identical"], summary
    assert rep["consistent"], summary
    assert not rep["mlflow_problems"], summary
    assert rep["loss_histories_identical"], summary  # no step lost, repeated or averaged differently
    assert not rep["failures"], summary
    assert rep["kills_total"] >= min_kills, summary
    for k in rep["kills"]:  # a kill that was not a miss interrupted its target
        assert k["missed"] or k["target"] in k["hit"], k


def test_sigkill_in_every_stage_quick(tmp_path):
    """One kill aimed at each stage (each at another phase: generation, checkpoint write, region store
    write, result write, ...), then a final run: same metrics and outputs as the uninterrupted run."""
    rep = run_harness(CONFIG, kills_per_stage=1, overrides=DETERMINISTIC, workdir=tmp_path,
                      out=tmp_path / "report.json", run_timeout=600)
    check_report(rep, min_kills=len(STAGES) - 2)
    hit = {p for s in rep["phases_hit"].values() for p in s}
    assert hit & {"checkpoint-write", "regions-write", "result-write", "outputs-write"}, rep["phases_hit"]


@pytest.mark.slow
def test_sigkill_in_every_stage_long(tmp_path):
    """>= 20 kills per stage (`make faults-long` runs the same from the command line)."""
    out = Path(os.environ.get("BATON_FAULTS_REPORT", tmp_path / "faults-report.json"))
    rep = run_harness(CONFIG, kills_per_stage=20, overrides=LONG_OVERRIDES,
                      workdir=tmp_path / "work", out=out, run_timeout=900)
    check_report(rep, min_kills=20 * len(STAGES) - 10)
    assert all(n >= 20 for n in rep["kills_per_stage"].values()), rep["kills_per_stage"]
    assert all(n >= 18 for n in rep["aimed_kills_per_stage"].values()), rep["aimed_kills_per_stage"]


# ----------------------------------------------------------------------------------------------
# two runs at once, resume


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    cwd, _ = snapshot_code(tmp_path_factory.mktemp("code"), ROOT / CONFIG)
    return cwd


def baton(code: Path, args: list[str], art: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=code, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_at_once(code, tmp_path_factory):
    art = tmp_path_factory.mktemp("concurrent") / "artifacts"
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", CONFIG], cwd=code, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return art, [p.returncode for p in procs], outs


def test_two_runs_at_once_share_the_work(two_at_once):
    art, codes, outs = two_at_once
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    both = outs[0] + outs[1]
    for s in STAGES:  # every stage trained by one of the two; the other found it complete
        assert ran(both).count(s) == 1, (s, ran(outs[0]), ran(outs[1]))
        assert cached(both).count(s) == 1, (s, cached(outs[0]), cached(outs[1]))
    assert "database is locked" not in both
    assert "Application startup failed" not in both  # the two embedded Prefect servers did not race
    assert check_consistency(art) == []
    assert sorted(p.parent.parent.name for p in art.glob("stages/*/*/result.json")) == sorted(STAGES)


def parent_runs(art: Path) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=100)
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_resume_by_prefect_flow_run_id_reruns_the_snapshot_cached(two_at_once, code):
    art, codes, _ = two_at_once
    assert codes == [0, 0]
    parent = parent_runs(art)[0]
    flow_run_id = parent.data.tags["baton.prefect_flow_run_id"]
    p = baton(code, ["resume", flow_run_id], art)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"snapshot of run {parent.info.run_id}" in out
    assert ran(out) == [] and sorted(cached(out)) == sorted(STAGES), out[-3000:]


def test_resume_completes_a_failed_run_with_its_own_snapshot(two_at_once, code):
    """A run with an override fails in one stage (its stage dir is blocked by a file: an environment
    problem, not a config one). After the problem is gone, `baton resume <its parent run id>` reruns
    that invocation's snapshot, override included, and completes it."""
    art, codes, _ = two_at_once
    assert codes == [0, 0]
    over = "stages.vqa.train.lr=0.002"
    st = baton(code, ["status", CONFIG, over], art)
    fp16 = re.search(r"vqa\s+(\w{16})\s+not started", st.stdout).group(1)
    blocker = art / "stages" / "vqa" / fp16
    blocker.write_text("not a directory\n")
    p = baton(code, ["run", CONFIG, over], art)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "error: [Errno 17] File exists" in out and str(blocker) in out, out[-2000:]
    failed = parent_runs(art)[0]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["fingerprint.vqa"].startswith(fp16)

    blocker.unlink()
    p = baton(code, ["resume", failed.info.run_id], art)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert ran(out) == ["vqa"], out[-3000:]
    res = json.loads((blocker / "result.json").read_text())  # the overridden vqa: the snapshot was used
    assert res["fingerprint"].startswith(fp16)
    assert parent_runs(art)[0].info.status == "FINISHED"
    assert check_consistency(art) == []


def test_resume_unknown_id_is_a_clear_error(two_at_once, code):
    art, _, _ = two_at_once
    p = baton(code, ["resume", "0123456789abcdef0123456789abcdef"], art)
    assert p.returncode == 2
    assert "no MLflow run and no invocation of Prefect flow run 0123456789abcdef0123456789abcdef" in p.stderr


def test_retry_a_killed_flow_run_in_place(two_at_once, code):
    """`baton retry <prefect flow run id>` (= `prefect flow-run retry --entrypoint flows/entry.py:...` against
    baton's Prefect database): a run SIGKILLed during vqa is left Running in Prefect; retry marks it
    Crashed, reruns the same flow run from its stored parameters, every other stage is Cached and vqa
    continues from its checkpoint."""
    import signal
    import time

    art, codes, _ = two_at_once
    assert codes == [0, 0]
    over = ["stages.vqa.train.lr=0.003", "runtime.checkpoint_every=2"]
    st = baton(code, ["status", CONFIG, *over], art)
    fp16 = re.search(r"vqa\s+(\w{16})\s+not started", st.stdout).group(1)
    ckpts = art / "stages" / "vqa" / fp16 / "checkpoints"
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", CONFIG, *over], cwd=code, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "vqa wrote no checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = parent_runs(art)[0]
    fid = killed.data.tags["baton.prefect_flow_run_id"]

    p = baton(code, ["retry", fid], art)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert f"flow run {fid} was RUNNING but its process is gone: marked CRASHED" in out, out[-3000:]
    assert re.search(r"\[vqa\] resumed from checkpoint at step [1-9]", out), out[-3000:]
    assert ran(out) == ["vqa"] and sorted(cached(out)) == sorted(s for s in STAGES if s != "vqa"), out[-3000:]
    assert re.search(rf"flow run {fid}: COMPLETED \(run count [2-9]\)", out), out[-2000:]
    assert (ckpts.parent / "result.json").exists()
    assert check_consistency(art) == []
    # a running flow run is not retried; an unknown id is a clear error
    p = baton(code, ["retry", "5b6c7d8e-0000-4000-8000-000000000000"], art)
    assert p.returncode == 2 and "no such flow run" in p.stderr, p.stderr[-2000:]
