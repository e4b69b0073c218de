"""One stage across two Ray nodes (`runtime.nnodes: 2`, one CPU rank per node) through `baton run --cluster` on a
real local Ray cluster (tools.raycluster: two `ray start --block` nodes of 1 CPU and an 80 MB object store, on
loopback, in their own process group, stopped after).

Slow: the micro recipe's bert on the two nodes equals a 1-node 2-rank run of the same stage (same global batch,
dropout off, runtime.deterministic) and has one MLflow run; a SIGKILL of one node's stage process mid-stage fails
the stage, and the rerun resumes from its checkpoint in the same MLflow run. (The refusal of nnodes > 1 without
--cluster is a fast test in test_cluster.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import BATON, ROOT, baton, wait_for_checkpoint

from tools.raycluster import LocalRayCluster

pytestmark = pytest.mark.slow
CONFIG = "configs/vlp-micro.yaml"
TOL = 1e-5
TWO_NODES = ["stages.bert.runtime.nnodes=2", "stages.bert.runtime.nproc_per_node=1",
             "stages.bert.runtime.deterministic=true", "runtime.threads=1"]


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster([{"n0": 1}, {"n1": 1}], num_cpus=1) as c:
        yield c


def stage_dir(art: Path, stage: str) -> Path:
    (sd,) = [f.parent for f in art.glob(f"stages/{stage}/*/config.json")]
    return sd


def one_node_two_ranks(art: Path, sd: Path, out: Path) -> Path:
    """The same stage on 1 node x 2 ranks (python -m stages: no Prefect, no MLflow), on the upstream dirs ``sd``
    was fingerprinted with."""
    ups = json.loads((sd / "config.json").read_text())["fingerprint_inputs"]["upstream"]
    up = [a for n, fp in ups.items() for a in ("--upstream", f"{n}={art / 'stages' / n / fp[:16]}")]
    over = ["stages.bert.runtime.nproc_per_node=2", "stages.bert.runtime.deterministic=true", "runtime.threads=1"]
    p = subprocess.run([sys.executable, "-m", "stages", CONFIG, "bert", "--out", str(out), *up, *over], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_bert_on_two_nodes_equals_one_node_two_ranks_one_mlflow_run(cluster, tmp_path):
    from mlflow import MlflowClient

    from stages.train.checkpoint import load_weights

    art = tmp_path / "art"
    p = baton(["run", CONFIG, "--cluster", cluster.address, "--only", "bert", "--json", *TWO_NODES], art, timeout=900)
    out = json.loads(p.stdout)
    bert = next(s for s in out["stages"] if s["name"] == "bert")
    assert bert["state"] == "ran"
    err = p.stderr
    assert "[bert] across 2 Ray nodes (CPU 1 each), rendezvous at" in err, err[-3000:]
    assert "[bert] node 0 of the stage on Ray node" in err and "[bert] node 1 of the stage on Ray node" in err
    sd = stage_dir(art, "bert")
    res = json.loads((sd / "result.json").read_text())
    assert res["info"]["ranks"]["world_size"] == 2 and len(set(res["info"]["ranks"]["weights_sha256"])) == 1
    assert not (sd / ".nodes-result.json").exists()

    ref = one_node_two_ranks(art, sd, tmp_path / "ref")
    ref_res = json.loads((ref / "result.json").read_text())
    wa, wb = (load_weights(d / "outputs/model/model.safetensors") for d in (sd, ref))
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    print(f"bert 2 nodes x 1 rank vs 1 node x 2 ranks: max |weight diff| {worst:.2e}, "
          f"metrics {res['metrics']} vs {ref_res['metrics']}")
    assert set(wa) == set(wb) and worst < TOL
    assert res["metrics"].keys() == ref_res["metrics"].keys()
    assert all(abs(res["metrics"][k] - ref_res["metrics"][k]) < TOL for k in res["metrics"])

    client = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlp-micro")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "bert"]
    assert len(runs) == 1 and runs[0].info.run_id == res["info"]["mlflow_run_id"]  # one run, not one per node
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) >= 2, steps  # global rank 0 alone logged them
    assert client.get_logged_model(res["info"]["mlflow_model_id"]).source_run_id == runs[0].info.run_id


def node_process(art: Path, node_rank: int) -> psutil.Process | None:
    """The stage process of node ``node_rank`` (python -m flows.worker bert ... --node-rank N) of this run."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "flows.worker" in cmd and str(art) in cmd and "--node-rank" in cmd \
                and cmd[cmd.index("--node-rank") + 1] == str(node_rank):
            return proc
    return None


def test_kill_one_nodes_stage_process_then_rerun_resumes(cluster, tmp_path):
    art = tmp_path / "art"
    over = [*TWO_NODES, "stages.bert.train.steps=400", "stages.bert.runtime.checkpoint_every=20"]  # retries: 0
    argv = BATON + ["run", CONFIG, "--cluster", cluster.address, "--only", "bert", "--json", *over]
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    found = wait_for_checkpoint(first, art, "bert", 40, poll=0.2)
    proc = node_process(art, 1) if found else None
    if proc is not None:
        proc.send_signal(signal.SIGKILL)
    _, err1 = first.communicate(timeout=300)
    assert proc is not None, f"bert wrote no checkpoint >= 40 (or node 1's process was gone):\n{err1[-3000:]}"
    killed = found[1]
    assert first.returncode != 0, err1[-3000:]  # the stage failed: one of its nodes was killed
    assert node_process(art, 0) is None and node_process(art, 1) is None  # no node's process left behind
    sd = stage_dir(art, "bert")
    assert not (sd / "result.json").exists()
    killed_run = json.loads((sd / "run.json").read_text())["mlflow_run_id"]

    p = baton(argv[len(BATON):], art, timeout=900)
    by = {s["name"]: s for s in json.loads(p.stdout)["stages"]}
    assert by["world"]["state"] == "cached" and by["bert"]["state"] == "ran"
    res = json.loads((sd / "result.json").read_text())
    assert res["info"]["resumed_from"] >= killed, p.stderr[-3000:]  # from its checkpoint, not from step 0
    assert res["info"]["ranks"]["world_size"] == 2
    assert by["bert"]["mlflow_run_id"] == killed_run  # and it continued the killed run's MLflow run
    print(f"killed node 1 after checkpoint {killed}; the rerun resumed from step {res['info']['resumed_from']}")
