"""`baton run --cluster`: the stages as prefect-ray tasks on a real local Ray cluster of two nodes
(tools.raycluster: `ray start --block` processes in their own process group, on loopback, stopped after)
whose custom resources differ, so where each stage ran is observable.

Default suite: the config refusals (no Ray) and the unplaceable-stage refusal against the real cluster.
Slow: the micro recipe placed on the two nodes, a SIGKILLed stage process on a node resumed by the rerun, and
a node whose own baton code differs from the driver's (shipped: the driver's code runs; not shipped: refused)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import BATON, ROOT, baton, wait_for_checkpoint

from tools.raycluster import LocalRayCluster

CONFIG = "configs/vlp-micro.yaml"
# cnn long enough that bert (whose node may first have to start a Ray worker) starts while it trains
PLACED = ["stages.cnn.runtime.resources={vision: 1}", "stages.bert.runtime.resources={text: 1}",
          "stages.cnn.train.steps=240"]


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster([{"vision": 1}, {"text": 1}], num_cpus=1) as c:
        yield c


def summary(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout)


def test_cluster_refuses_cuda_index_and_nnodes_without_cluster_or_forced_before_connecting(tmp_path):
    """No Ray needed: the address answers nothing, the refusal comes from the config alone."""
    art = tmp_path / "art"
    p = baton(["run", CONFIG, "--cluster", "127.0.0.1:9", "stages.cnn.runtime.device=cuda:1"], art, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "stages.cnn.runtime.device='cuda:1'" in p.stderr and "Ray assigns the devices" in p.stderr
    p = baton(["run", CONFIG, "stages.vl.runtime.nnodes=2"], art, check=False)  # nnodes needs --cluster
    assert p.returncode == 2 and "stages.vl.runtime.nnodes=2: a stage across several nodes runs only on a Ray " \
        "cluster" in " ".join(p.stderr.split()), p.stderr[-2000:]
    p = baton(["run", CONFIG, "--cluster", "127.0.0.1:9", "--force", "bert", "stages.vl.runtime.nnodes=2"], art,
              check=False)  # vl is downstream of bert
    assert p.returncode == 2 and "--force of a stage across several nodes" in p.stderr, p.stderr[-2000:]
    p = baton(["run", CONFIG, "--cluster", "127.0.0.1:9", "stages.bert.runtime.nnodes=3"], art, check=False)
    assert p.returncode == 2 and "train.batch_size=16 does not split into runtime.nproc_per_node=1 x " \
        "runtime.nnodes=3" in " ".join(p.stderr.split()), p.stderr[-2000:]  # the global batch: 3 ranks
    assert not (art / "stages").exists()
    p = subprocess.run([sys.executable, "-m", "stages", CONFIG, "bert", "--out", str(tmp_path / "alone"),
                        "stages.bert.runtime.nnodes=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "stages.bert.runtime.nnodes=2: a stage across several nodes runs through " \
        "`baton run ... --cluster ADDRESS`" in p.stderr, p.stderr[-2000:]  # python -m stages: one machine
    assert not (tmp_path / "alone").exists()


def test_submit_and_sweep_refuse_what_the_config_tells_before_submitting_or_starting(tmp_path):
    """`baton submit --cluster` and `baton sweep --cluster` check the address and the configs before they reach a
    server or Ray (none answers here): exit 2 naming the key; a sweep never runs a stage across nodes."""
    art = tmp_path / "art"
    p = baton(["submit", CONFIG, "--cluster", "127.0.0.1:9", "stages.cnn.runtime.device=cuda:1", "--port", "9"], art,
              check=False)
    assert p.returncode == 2 and "stages.cnn.runtime.device='cuda:1'" in p.stderr, p.stderr[-2000:]
    p = baton(["submit", CONFIG, "--cluster", "not an address", "--port", "9"], art, check=False)
    assert p.returncode == 2 and "--cluster 'not an address': expected ray://HOST:PORT" in p.stderr, p.stderr[-2000:]
    p = baton(["submit", CONFIG, "stages.vl.runtime.nnodes=2", "--port", "9"], art, check=False)
    assert p.returncode == 2 and "runs only on a Ray cluster" in " ".join(p.stderr.split()), p.stderr[-2000:]
    p = baton(["sweep", CONFIG, "--variant", "a=stages.vqa.runtime.device=cuda:0", "--cluster", "127.0.0.1:9"], art,
              check=False)
    assert p.returncode == 2 and "stages.vqa.runtime.device='cuda:0'" in p.stderr, p.stderr[-2000:]
    p = baton(["sweep", CONFIG, "--variant", "a=stages.bert.runtime.nnodes=2", "--cluster", "127.0.0.1:9"], art,
              check=False)
    err = " ".join(p.stderr.split())
    assert p.returncode == 2 and "member 'a': stages.bert.runtime.nnodes=2: a stage across several nodes is not " \
        "run in a sweep" in err, err[-2000:]
    assert not art.exists() or not (art / "stages").exists()


def test_unplaceable_stage_refused_naming_stage_resource_and_offer(cluster, tmp_path):
    art = tmp_path / "art"
    p = baton(["run", CONFIG, "--cluster", cluster.address, "stages.bert.runtime.gpus=8"], art, check=False,
              timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    err = " ".join(p.stderr.split())
    assert "stage 'bert' asks for GPU 8 (runtime.gpus): no node of the Ray cluster has it" in err, err[-2000:]
    assert "vision 1" in err and "text 1" in err  # what each node offers
    p = baton(["run", CONFIG, "--cluster", cluster.address, "stages.bert.runtime.nnodes=2",
               "stages.bert.runtime.resources={text: 1}"], art, check=False, timeout=300)
    err = " ".join(p.stderr.split())
    assert p.returncode == 2 and "stage 'bert' asks for 2 nodes (runtime.nnodes) with CPU 1, text 1 each: 1 " \
        "node(s) of the Ray cluster have it" in err, err[-2000:]
    assert not (art / "stages").exists()  # refused at submission: nothing started


@pytest.fixture(scope="module")
def placed_run(cluster, tmp_path_factory):
    art = tmp_path_factory.mktemp("cluster") / "art"
    p = baton(["run", CONFIG, "--cluster", cluster.address, "--json", *PLACED], art, timeout=900)
    return art, summary(p)


@pytest.mark.slow
def test_micro_recipe_runs_on_the_nodes_its_resources_name(placed_run):
    art, out = placed_run
    by = {s["name"]: s for s in out["stages"]}
    assert set(by) == {"world", "cnn", "detector", "bert", "vl", "caption", "vqa"}
    assert all(s["state"] == "ran" for s in out["stages"])
    assert "vision" in by["cnn"]["ray_node"]["resources"] and "text" in by["bert"]["ray_node"]["resources"]
    assert by["cnn"]["ray_node"]["id"] != by["bert"]["ray_node"]["id"]
    # the two independent stages ran at the same time, on their two nodes (their MLflow runs overlap)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    cnn, bert = (client.get_run(by[n]["mlflow_run_id"]).info for n in ("cnn", "bert"))
    assert cnn.start_time < bert.end_time and bert.start_time < cnn.end_time, (cnn, bert)


@pytest.mark.slow
def test_a_sweep_runs_its_stages_on_the_cluster_sharing_what_the_variants_share(cluster, tmp_path):
    """`baton sweep --cluster`: two cnn variants on the two nodes their resources name; world (shared) once."""
    art = tmp_path / "art"
    p = baton(["sweep", CONFIG, "--name", "onray", "--variant", "v=stages.cnn.runtime.resources.vision=1",
               "--variant", "t=stages.cnn.runtime.resources.text=1 stages.cnn.train.lr=0.002", "--only", "cnn",
               "--cluster", cluster.address, "--json"], art, timeout=900)
    out = json.loads(p.stdout)
    assert out["members"] == ["v", "t"]
    assert len(list(art.glob("stages/world/*/result.json"))) == 1  # shared: one stage dir, trained once
    assert len(list(art.glob("stages/cnn/*/result.json"))) == 2
    nodes = set(re.findall(r"\[cnn\] on Ray node (\w+)", p.stderr))
    assert len(nodes) == 2, p.stderr[-3000:]  # the two variants' cnn on the two nodes
    # world trained by one task (its lines may show twice: both local nodes' log monitors read one session dir)
    assert len(set(re.findall(r"\(stage-world pid=(\d+)\).*\[world\] done in", p.stderr))) == 1, p.stderr[-3000:]
    record = json.loads((art / "sweeps" / "onray.json").read_text())
    assert record["status"] == "FINISHED"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vlp-micro").experiment_id],
                              "tags.`baton.stage` = 'cnn'")
    assert sorted(r.data.tags["baton.variants"] for r in runs) == ["t", "v"]  # tagged by the driver after Ray


@pytest.mark.slow
def test_submit_with_cluster_runs_the_served_flow_runs_stages_on_the_nodes(cluster, tmp_path):
    """`baton serve` (deployments on this machine) + `baton submit --cluster`: the deployment run connects to
    Ray itself and its stages run on the node their resources name."""
    from tools.pgserver import free_port
    from tools.servers import serve

    art, port, log = tmp_path / "art", free_port(), tmp_path / "serve.log"
    with serve(art, port, log) as (_, env):
        deadline = time.monotonic() + 300
        while True:  # `serve` registers baton/baton a moment after the UI answers
            p = subprocess.run(BATON + ["submit", CONFIG, "--only", "cnn", "--port", str(port), "--cluster",
                                        cluster.address, "--wait", "stages.cnn.runtime.resources={text: 1}"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if p.returncode != 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        text = log.read_text(errors="replace")
        assert p.returncode == 0, p.stdout + p.stderr + text[-4000:]
        assert "COMPLETED" in p.stdout
        assert len(re.findall(r"\[(?:world|cnn)\] on Ray node", text)) >= 2, text[-4000:]
        assert len(list(art.glob("stages/cnn/*/result.json"))) == 1


def _stage_process(stage: str, art: Path):
    """The stage process a Ray worker spawned for ``stage`` of this artifacts dir (python -m flows.worker)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "flows.worker" in cmd and stage in cmd and str(art) in " ".join(cmd):
            return proc
    return None


@pytest.mark.slow
def test_sigkill_of_a_stage_process_on_a_node_then_rerun_resumes(cluster, tmp_path):
    art = tmp_path / "art"
    over = [*PLACED, "stages.cnn.train.steps=400", "stages.cnn.runtime.checkpoint_every=4"]  # retries: 0
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    argv = BATON + ["run", CONFIG, "--cluster", cluster.address, "--only", "cnn", "--json", *over]
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    found = wait_for_checkpoint(first, art, "cnn", 8, poll=0.2)
    proc = _stage_process("cnn", art) if found else None
    if proc is not None:
        proc.send_signal(signal.SIGKILL)
    out1, err1 = first.communicate(timeout=300)
    assert proc is not None, f"cnn wrote no checkpoint >= 8 on its node (or its process was gone):\n{err1[-3000:]}"
    killed = found[1]
    assert first.returncode != 0, err1[-3000:]  # the task failed: its process was killed
    (stage_dir,) = {d.parents[1] for d in art.glob("stages/cnn/*/checkpoints/0*")}
    killed_run = json.loads((stage_dir / "run.json").read_text())["mlflow_run_id"]
    p = baton(argv[3:], art, timeout=900)
    out = summary(p)
    by = {s["name"]: s for s in out["stages"]}
    assert by["world"]["state"] == "cached" and by["cnn"]["state"] == "ran"
    assert "vision" in by["cnn"]["ray_node"]["resources"]
    result = json.loads((stage_dir / "result.json").read_text())
    assert result["info"]["resumed_from"] >= killed, p.stderr[-3000:]  # from its checkpoint, not from step 0
    assert by["cnn"]["mlflow_run_id"] == killed_run  # and it continued the killed run's MLflow run


def _node_code_that_differs(dest: Path) -> Path:
    """A copy of baton whose world stage fails if it is the code that runs (its digest differs, too)."""
    for pkg in ("flows", "stages"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(dest / "stages" / "world.py", "a") as f:
        f.write("\n\ndef run(ctx):\n    raise RuntimeError('the node ran its own world.py')\n")
    return dest


@pytest.mark.slow
def test_node_with_other_code_runs_the_drivers_code_or_refuses(tmp_path):
    node_code = _node_code_that_differs(tmp_path / "nodecode")
    node_env = os.environ | {"PYTHONPATH": str(node_code)}
    # the driver runs outside the checkout: Ray puts the driver's working directory on its workers' path
    driver = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with LocalRayCluster([{"other": 1}], num_cpus=1, env=node_env) as c:
        argv = BATON + ["run", str(ROOT / CONFIG), "--cluster", c.address, "--only", "world", "--json"]
        shipped = subprocess.run(argv, cwd=tmp_path, env=driver | {"BATON_ARTIFACTS": str(tmp_path / "a1")},
                                 capture_output=True, text=True, timeout=600)
        assert shipped.returncode == 0, shipped.stderr[-4000:]
        assert summary(shipped)["stages"][0]["state"] == "ran"
        own = subprocess.run(argv, cwd=tmp_path, env=driver | {"BATON_ARTIFACTS": str(tmp_path / "a2"),
                                                                "BATON_CLUSTER_SHIP_CODE": "0"},
                             capture_output=True, text=True, timeout=600)
    assert own.returncode != 0
    err = " ".join(own.stderr.split())
    m = re.search(r"the code on Ray node \w+ \(.*?\) is not the code that was fingerprinted: module stages\.world "
                  r"has digest (\w{16}) there, (\w{16}) on the driver", err)
    assert m and m.group(1) != m.group(2), err[-3000:]
    assert not list((tmp_path / "a2").glob("stages/world/*/result.json"))


PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(os.path.join(os.environ["OUT"], f"rank{dist.get_rank()}"), "w") as f:
    f.write(f"{dist.get_world_size()} {t.item():g}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_one_rank_per_node_meets_through_c10d_in_a_strict_spread_group(cluster, tmp_path):
    """The script launch beside runtime.nnodes's stage launch (test_cluster_nnodes.py): two Ray
    nodes of one CPU rank each all-reduce through torch.distributed.run's c10d rendezvous."""
    import ray

    from flows.cluster import launch_across_nodes
    from stages.contract import StageError

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    ray.init(address=cluster.address, namespace="baton-test")
    try:
        out = launch_across_nodes([str(script)], nnodes=2, env={"OUT": str(tmp_path), "OMP_NUM_THREADS": "1"},
                                  timeout=120)
        with pytest.raises(StageError, match="no 3 distinct Ray nodes with CPU 1 each"):
            launch_across_nodes([str(script)], nnodes=3, timeout=5)
    finally:
        ray.shutdown()
    assert [o["returncode"] for o in out] == [0, 0]
    assert len({o["node"] for o in out}) == 2  # STRICT_SPREAD: two different nodes
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["2 3", "2 3"]  # 1 + 2 on both ranks
