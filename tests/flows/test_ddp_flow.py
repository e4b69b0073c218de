"""Multi-rank stages (DDP, gloo on CPU, 2 ranks) through the real CLI, Prefect flow and MLflow store.

One micro-recipe run with ``nproc_per_node: 2`` on bert and vqa feeds the rest: one MLflow run per stage
(rank 0 logs, the launcher logs the LoggedModel) and lineage as with one rank; then a rank SIGKILLed in the
middle of a stage, a rerun that resumes from the checkpoint and ends equal to an unbroken 2-rank run, with no
rank left behind (bert; and vqa under lp_ft with the kill after lp_steps). All slow: each CLI run of a few
micro stages takes a minute or more on the shared CPU."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import BATON, ROOT, baton, wait_for_checkpoint

pytestmark = pytest.mark.slow
CONFIG = "configs/vlp-micro.yaml"
TWO = ["stages.bert.runtime.nproc_per_node=2", "stages.vqa.runtime.nproc_per_node=2"]
TOL = 1e-5


def results(art: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in art.glob("stages/*/*/result.json"):
        out.setdefault(f.parts[-3], []).append(json.loads(f.read_text()) | {"dir": str(f.parent)})
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    art = tmp_path_factory.mktemp("ddp-flow") / "artifacts"
    p = baton(["run", CONFIG, *TWO], art, timeout=900)
    return art, p.stderr + p.stdout


def test_two_stages_on_two_ranks_one_mlflow_run_each_and_lineage(two_rank_run):
    from mlflow import MlflowClient

    art, out = two_rank_run
    assert "[bert] launching 2 ranks (gloo, fork)" in out and "[vqa] launching 2 ranks (gloo, fork)" in out
    res = {k: v[0] for k, v in results(art).items()}
    for name in ("bert", "vqa"):
        assert res[name]["info"]["ranks"]["world_size"] == 2
        assert len(set(res[name]["info"]["ranks"]["weights_sha256"])) == 1, name
    client = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlp-micro")
    runs = client.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(names) == sorted(["world", "cnn", "detector", "bert", "vl", "caption", "vqa"]), names  # one each
    for name in ("bert", "vqa"):
        run = client.get_run(res[name]["info"]["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == sorted(set(steps)) and len(steps) >= 2, (name, steps)  # rank 0 alone logged them
        model = client.get_logged_model(res[name]["info"]["mlflow_model_id"])
        assert model.source_run_id == run.info.run_id and model.tags["baton.fingerprint"] == res[name]["fingerprint"]
    vl_inputs = {m.model_id for m in client.get_run(res["vl"]["info"]["mlflow_run_id"]).inputs.model_inputs}
    assert vl_inputs == {res["detector"]["info"]["mlflow_model_id"], res["bert"]["info"]["mlflow_model_id"]}
    vqa_inputs = {m.model_id for m in client.get_run(res["vqa"]["info"]["mlflow_run_id"]).inputs.model_inputs}
    assert res["vl"]["info"]["mlflow_model_id"] in vqa_inputs


def rank_processes(root_pid: int, stage: str) -> list[psutil.Process]:
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.name().startswith(f"{stage[:10]}-r"):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_a_rank_mid_stage(art: Path, stage: str, over: list[str], min_step: int, victim: int) -> tuple[Path, int]:
    """Start `baton run` in the background; once ``stage`` has a checkpoint >= min_step, SIGKILL rank
    ``victim``. Returns (stage dir, newest checkpoint step) after the run has failed, with no rank left."""
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(BATON + ["run", CONFIG, "--only", stage, *over], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ranks = []
    try:
        found = wait_for_checkpoint(proc, art, stage, min_step, poll=0.05)
        assert found is not None, f"{stage}: no checkpoint >= {min_step}:\n{proc.communicate()[0][-3000:]}"
        sd = found[0]
        ranks = rank_processes(proc.pid, stage)
        assert sorted(p.name() for p in ranks) == [f"{stage}-r0", f"{stage}-r1"], ranks
        os.kill(next(p.pid for p in ranks if p.name().endswith(f"-r{victim}")), signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "a rank failed" in out, out[-3000:]
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"orphan ranks: {alive}"
    assert not (sd / "result.json").exists()
    steps = sorted(int(d.name) for d in (sd / "checkpoints").iterdir() if d.name.isdigit())
    return sd, steps[-1]


def unbroken(art: Path, tmp: Path, sd: Path, over: list[str]) -> Path:
    """The stage of directory ``sd``, 2 ranks, never killed (python -m stages: no Prefect, no MLflow), on the
    upstream directories that ``sd`` was fingerprinted with -> its directory."""
    stage = sd.parent.name
    ups = json.loads((sd / "config.json").read_text())["fingerprint_inputs"]["upstream"]
    up = [a for n, fp in ups.items() for a in ("--upstream", f"{n}={art / 'stages' / n / fp[:16]}")]
    out = tmp / f"{stage}-unbroken"
    p = subprocess.run([sys.executable, "-m", "stages", CONFIG, stage, "--out", str(out), *up, *over], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def same_weights(a: Path, b: Path, files: tuple[str, ...]) -> float:
    from stages.train.checkpoint import load_weights

    worst = 0.0
    for f in files:
        wa, wb = load_weights(a / f), load_weights(b / f)
        worst = max(worst, max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa))
    return worst


@pytest.mark.parametrize("stage,victim,extra,files", [
    ("bert", 1, ["stages.bert.train.steps=150"], ("outputs/model/model.safetensors",)),
    ("vqa", 0, ["stages.vqa.train.steps=120", "stages.vqa.train.transfer.strategy=lp_ft",
                "stages.vqa.train.transfer.lp_steps=10"],
     ("outputs/model/model.safetensors", "outputs/model/head.safetensors")),
], ids=["bert", "vqa-lp_ft-after-lp_steps"])
def test_sigkill_a_rank_then_rerun_resumes_and_equals_an_unbroken_run(two_rank_run, tmp_path, stage, victim, extra,
                                                                      files):
    art, _ = two_rank_run
    over = [f"stages.{stage}.runtime.nproc_per_node=2", f"stages.{stage}.runtime.checkpoint_every=10",
            f"stages.{stage}.runtime.deterministic=true", *extra]
    sd, k = kill_a_rank_mid_stage(art, stage, over, min_step=20, victim=victim)
    assert k >= 20
    p = baton(["run", CONFIG, "--only", stage, *over], art, timeout=900)
    out = p.stderr + p.stdout
    m = re.search(rf"\[{stage}\] resumed from checkpoint at step (\d+)", out)
    assert m and int(m.group(1)) >= k > 0, out[-3000:]
    done = json.loads((sd / "result.json").read_text())
    assert done["info"]["resumed_from"] >= k
    worst = same_weights(sd, unbroken(art, tmp_path, sd, over), files)
    print(f"{stage}: killed rank {victim} after checkpoint {k}, resumed; max |diff| to unbroken 2-rank {worst:.2e}")
    assert worst < TOL
