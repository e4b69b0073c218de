"""The whole recipe through the real Prefect flow engine and a real MLflow store (micro sizes).

One session-scoped run feeds several assertions: lineage in MLflow, a second run that trains
nothing (every stage Cached), an override that reruns only the stage and its downstream, and a
SIGKILL during `vl` training that the next run resumes from its checkpoint, continuing the same
MLflow run with one continuous metric history."""
import json
import xml.etree.ElementTree as ET
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BATON, ROOT, baton, wait_for_checkpoint

CONFIG = "configs/vlp-micro.yaml"
STAGES = ["world", "cnn", "detector", "bert", "vl", "caption", "vqa"]


def ran(output: str) -> set[str]:
    return set(re.findall(r"\[(\w+)\] done in", output))


def cached(output: str) -> set[str]:
    return set(re.findall(r"\[(\w+)\] cached:", output))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    art = tmp_path_factory.mktemp("e2e") / "artifacts"
    t0 = time.perf_counter()
    p = baton(["run", CONFIG], art, env={"BATON_SYSTEM_METRICS_INTERVAL": "1"})
    return art, p.stderr + p.stdout, time.perf_counter() - t0


def mlflow_client(art: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")


def results(art: Path) -> dict:
    out = {}
    for f in art.glob("stages/*/*/result.json"):
        out.setdefault(f.parts[-3], []).append(json.loads(f.read_text()))
    return out


def test_first_run_runs_every_stage(first_run):
    art, out, secs = first_run
    assert ran(out) == set(STAGES), out[-3000:]
    res = results(art)
    assert set(res) == set(STAGES)
    for name in STAGES:
        r = res[name][0]
        assert r["metrics"], name
        assert r["info"]["mlflow_run_id"]


def test_lineage_vl_inputs_are_detector_and_bert_models(first_run):
    art, _, _ = first_run
    res = {k: v[0] for k, v in results(art).items()}
    client = mlflow_client(art)
    vl_run = client.get_run(res["vl"]["info"]["mlflow_run_id"])
    inputs = {m.model_id for m in vl_run.inputs.model_inputs}
    assert inputs == {res["detector"]["info"]["mlflow_model_id"], res["bert"]["info"]["mlflow_model_id"]}
    # each stage's weights are a LoggedModel tagged with its fingerprint, output of its run
    for name in ("cnn", "detector", "bert", "vl", "caption", "vqa"):
        m = client.get_logged_model(res[name]["info"]["mlflow_model_id"])
        assert m.tags["baton.fingerprint"] == res[name]["fingerprint"]
        assert m.source_run_id == res[name]["info"]["mlflow_run_id"]
        assert "model.safetensors" in {f.path for f in client.list_logged_model_artifacts(m.model_id)}, name
    # datasets from the world stage are recorded as dataset inputs of the cnn run
    cnn_run = client.get_run(res["cnn"]["info"]["mlflow_run_id"])
    assert any(d.dataset.name == "world/imagenet" for d in cnn_run.inputs.dataset_inputs)
    # nested under the invocation's parent run, metrics per step
    assert vl_run.data.tags["mlflow.parentRunId"]
    assert len(client.get_metric_history(vl_run.info.run_id, "train/loss")) >= 2


def first_results(art: Path) -> dict:
    """{stage: result.json} of the recipe as shipped (the first run's stage dirs; later tests add variants)."""
    from flows.fingerprint import plan_fingerprints
    from stages.recipe import load_recipe

    fps = {n: p.fingerprint for n, p in plan_fingerprints(load_recipe(ROOT / CONFIG).stages).items()}
    return {n: next(r for r in rs if r["fingerprint"] == fps[n]) for n, rs in results(art).items()}


def test_final_metrics_are_logged_once_at_the_last_step_and_carried_by_the_logged_model(first_run):
    """Bugs 2 and 3: a stage's final val/* and baseline/* metrics are one point each at its last step (not a
    second copy at step 0); its LoggedModel is the run's output at that step and carries the metrics, the
    fingerprint as a param and the resolved config; an upstream model links forward to the runs that used it."""
    art, _, _ = first_run
    res, client = first_results(art), mlflow_client(art)
    for name, steps in (("cnn", 10), ("vqa", 6)):  # train.steps in the micro recipe
        info = res[name]["info"]
        run_id = info["mlflow_run_id"]
        for key, value in list(res[name]["metrics"].items()) + [
                (f"baseline/{k}", v) for k, v in res[name]["baselines"].items()]:
            assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(steps, value)], key
        assert info["steps"] == steps
        run = client.get_run(run_id)
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(info["mlflow_model_id"], steps)]
        model = client.get_logged_model(info["mlflow_model_id"])
        assert {m.key: m.value for m in model.metrics}.items() >= res[name]["metrics"].items()
        assert {m.step for m in model.metrics} == {steps}
        assert model.params["baton.fingerprint"] == res[name]["fingerprint"]
        assert model.params["train.steps"] == str(steps)
    cnn_model = client.get_logged_model(res["cnn"]["info"]["mlflow_model_id"])
    det_run = res["detector"]["info"]["mlflow_run_id"]
    assert cnn_model.tags[f"baton.used_by.{det_run}"] == "detector"
    assert f"runs/{det_run}" in cnn_model.tags["mlflow.note.content"]


def test_each_stage_records_the_datasets_it_reads(first_run):
    """Bug 4: a stage's dataset inputs are the upstream outputs it read, not every output of world."""
    art, _, _ = first_run
    res, client = first_results(art), mlflow_client(art)
    want = {"cnn": {"world/imagenet"}, "bert": {"world/corpus"}, "detector": {"world/vg"},
            "vqa": {"world/vqa", "detector/regions"}, "caption": {"world/coco", "detector/regions"}}
    for name, datasets in want.items():
        run = client.get_run(res[name]["info"]["mlflow_run_id"])
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == datasets, name


def test_mlflow_pages_tell_the_story(first_run):
    """Bug 5 (no "/" inside a metric's name), the experiment's model-training layout, git commit and user on
    runs, descriptions linking upstream runs and models, the parent run's metrics and lineage picture, and
    the Prefect flow run's stages table."""
    import httpx

    from flows.server import live_server

    art, _, _ = first_run
    res, client = first_results(art), mlflow_client(art)
    vqa = client.get_run(res["vqa"]["info"]["mlflow_run_id"])
    assert "val/vqa_acc_yes_no" in vqa.data.metrics and not [k for k in vqa.data.metrics if "yes/no" in k]
    assert client.get_experiment(vqa.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert vqa.data.tags["mlflow.source.git.commit"] == commit and vqa.data.tags["mlflow.user"]
    note = vqa.data.tags["mlflow.note.content"]
    for up in ("detector", "vl"):
        assert f"runs/{res[up]['info']['mlflow_run_id']}" in note and res[up]["info"]["mlflow_model_id"] in note
    parent = client.get_run(vqa.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["vqa/val/vqa_acc"] == res["vqa"]["metrics"]["val/vqa_acc"]
    assert parent.data.tags["mlflow.source.git.commit"] == commit
    svg = Path(client.download_artifacts(parent.info.run_id, "lineage.svg", str(art / "tmp")))
    boxes = ET.parse(svg).getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='stage']")
    assert len(boxes) == len(res)  # a box per stage, naming its fingerprint, model and outcome
    text = " ".join(t.text or "" for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text"))
    assert f"fp {res['vl']['fingerprint'][:12]}" in text and res["vl"]["info"]["mlflow_model_id"][:14] in text
    lineage = json.loads(Path(client.download_artifacts(parent.info.run_id, "lineage.json", str(art / "tmp")))
                         .read_text())
    assert {n["stage"]: n["model_id"] for n in lineage["nodes"]}["vl"] == res["vl"]["info"]["mlflow_model_id"]
    det = res["detector"]["info"]["mlflow_run_id"]  # a few val images with their predicted boxes, system metrics
    assert len([a for a in client.list_artifacts(det, "images") if a.path.endswith(".png")]) == 4
    assert "system/cpu_utilization_percentage" in client.get_run(det).data.metrics
    url = live_server(art)["url"]
    arts = httpx.post(f"{url}/artifacts/filter", json={"artifacts": {"key": {"any_": ["stages-vlp-micro"]}}}).json()
    table = json.loads(arts[-1]["data"]) if isinstance(arts[-1]["data"], str) else arts[-1]["data"]
    rows = {r["stage"]: r for r in table}
    assert list(rows) == STAGES and rows["vqa"]["fingerprint"] == res["vqa"]["fingerprint"][:16]
    assert rows["vqa"]["mlflow run"].endswith(f"/runs/{res['vqa']['info']['mlflow_run_id']}"
                                              f"?workflowType=machine_learning")


def test_watching_the_flow_run_prints_its_stages(first_run):
    """What `baton submit --wait` prints while it waits (flows.progress.watch_flow_run), read from the real
    Prefect server: the flow run's state and every stage's task-run state; a finished run: one line."""
    import sys

    from flows.server import live_server

    art, _, _ = first_run
    res, client = first_results(art), mlflow_client(art)
    parent = client.get_run(client.get_run(res["vqa"]["info"]["mlflow_run_id"]).data.tags["mlflow.parentRunId"])
    code = ("import sys\nfrom prefect.client.orchestration import get_client\nfrom flows.progress import "
            "watch_flow_run\nwith get_client(sync_client=True) as c:\n    watch_flow_run(c, sys.argv[1])")
    env = os.environ | {"PREFECT_API_URL": live_server(art)["url"], "PREFECT_HOME": str(art / "prefect")}
    p = subprocess.run([sys.executable, "-c", code, parent.data.tags["baton.prefect_flow_run_id"]], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(r"\[\d\d:\d\d:\d\d\] Completed: world Completed; ", lines[0]), p.stdout + p.stderr
    assert {f"{s} Completed" for s in STAGES} == set(lines[0].split(": ", 1)[1].split("; "))


def test_second_run_trains_nothing_and_every_stage_is_cached(first_run):
    art, _, _ = first_run
    t0 = time.perf_counter()
    p = baton(["run", CONFIG, "--json"], art)
    out = p.stderr + p.stdout
    assert ran(out) == set()
    assert cached(out) == set(STAGES)
    assert out.count("Finished in state Cached") == len(STAGES)
    assert time.perf_counter() - t0 < 60
    summary = json.loads(p.stdout)  # stdout is the JSON document alone: the logs went to stderr
    assert [s["name"] for s in summary["stages"]] == STAGES and summary["mlflow_parent_run_id"]
    assert {s["state"] for s in summary["stages"]} == {"cached"}
    vqa = summary["stages"][-1]
    assert vqa["mlflow_run_id"] and vqa["metrics"] and vqa["seconds"] > 0
    # the invocation shows its stages in MLflow: a child run each, tagged cached, with the stage's metrics
    client = mlflow_client(art)
    parent = summary["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_stage = {r.data.tags["baton.stage"]: r for r in children}
    assert set(by_stage) == set(STAGES) and {r.data.tags["baton.cached"] for r in children} == {"true"}
    assert by_stage["vqa"].data.tags["baton.cached_from"] == vqa["mlflow_run_id"]
    assert by_stage["vqa"].data.metrics["val/vqa_acc"] == vqa["metrics"]["val/vqa_acc"]
    assert client.get_run(parent).data.metrics["vqa/val/vqa_acc"] == vqa["metrics"]["val/vqa_acc"]


def test_status_reports_without_running(first_run):
    art, _, _ = first_run
    p = baton(["status", CONFIG], art)
    assert p.stdout.count("complete") == len(STAGES)
    p = baton(["status", CONFIG, "stages.vqa.train.lr=0.01"], art)
    assert re.search(r"vqa\s+\w{16}\s+not started", p.stdout)
    doc = json.loads(baton(["status", CONFIG, "stages.vqa.train.lr=0.01", "--json"], art).stdout)
    states = {s["name"]: s["state"] for s in doc["stages"]}
    assert states == {**{n: "complete" for n in STAGES}, "vqa": "not started"}


def test_override_reruns_stage_and_downstream_only(first_run):
    art, _, _ = first_run
    p = baton(["run", CONFIG, "stages.bert.train.lr=0.0015"], art)
    out = p.stderr + p.stdout
    assert ran(out) == {"bert", "vl", "caption", "vqa"}
    assert cached(out) == {"world", "cnn", "detector"}


@pytest.mark.slow  # one more CLI run of three stages, ~70 s beside other jobs (the fast unit test is in test_plan.py)
def test_force_mid_stage_reruns_it_and_downstream_and_tags_the_replaced_runs(first_run):
    """`--force vl`: vl, caption and vqa run again into their same directories (new result.json, new
    MLflow runs; each replaced run tagged baton.replaced_by); the stages upstream of vl stay cached."""
    from flows.fingerprint import plan_fingerprints
    from stages.recipe import load_recipe

    art, _, _ = first_run
    fps = {n: p.fingerprint for n, p in plan_fingerprints(load_recipe(ROOT / CONFIG).stages).items()}

    def base_results() -> dict:
        return {n: next(r for r in rs if r["fingerprint"] == fps[n]) for n, rs in results(art).items()}

    before = base_results()
    p = baton(["run", "--dry-run", CONFIG, "--force", "vl"], art)
    assert "3 of 7 stages will run" in p.stdout, p.stdout
    p = baton(["run", CONFIG, "--force", "vl", "--json"], art)
    out = p.stderr + p.stdout
    assert ran(out) == {"vl", "caption", "vqa"}, out[-3000:]
    assert cached(out) == {"world", "cnn", "detector", "bert"}
    summary = {s["name"]: s["state"] for s in json.loads(p.stdout)["stages"]}
    assert summary == {n: "ran" if n in ("vl", "caption", "vqa") else "cached" for n in STAGES}
    after, client = base_results(), mlflow_client(art)
    for n in STAGES:
        old_run, new_run = before[n]["info"]["mlflow_run_id"], after[n]["info"]["mlflow_run_id"]
        if n in ("vl", "caption", "vqa"):
            assert new_run != old_run, n
            assert client.get_run(old_run).data.tags["baton.replaced_by"] == new_run, n
        else:
            assert new_run == old_run, n
    assert not [d for d in art.glob("stages/*/.*") if d.is_dir()]  # no forced temp dir left


def run_until_checkpoint(art: Path, stage: str, over: list[str], min_step: int = 1, timeout: float = 300):
    """Start `baton run CONFIG over` in the background (its own process group); return (process, stage dir,
    step) as soon as ``stage`` has a checkpoint at step >= min_step and no result.json yet."""
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(BATON + ["run", CONFIG, *over], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    found = wait_for_checkpoint(proc, art, stage, min_step, timeout)
    if found:
        return proc, *found
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{stage} wrote no checkpoint >= {min_step} within {timeout}s:\n{proc.communicate()[0][-3000:]}")


def test_sigkill_during_vl_then_rerun_resumes_same_mlflow_run(first_run):
    art, _, _ = first_run
    over = ["stages.vl.train.steps=300", "stages.vl.runtime.checkpoint_every=4", "stages.vl.runtime.log_every=2"]
    proc, vl_dir, ckpt = run_until_checkpoint(art, "vl", over, min_step=8)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = (vl_dir / "run.json").read_text()

    p = baton(["run", CONFIG, *over], art)
    out = p.stderr + p.stdout
    m = re.search(r"\[vl\] resumed from checkpoint at step (\d+)", out)
    assert m and int(m.group(1)) >= ckpt > 0, out[-3000:]
    assert (vl_dir / "result.json").exists() and (vl_dir / "run.json").read_text() == run_id
    import json

    rid = json.loads(run_id)["mlflow_run_id"]
    hist = mlflow_client(art).get_metric_history(rid, "train/loss")
    steps = [h.step for h in sorted(hist, key=lambda h: h.timestamp)]
    assert steps == sorted(set(steps)), f"metric history has repeats or goes back: {steps}"
    assert steps == list(range(2, 301, 2)), steps


def test_transient_failure_is_retried_by_prefect_and_resumes(first_run):
    """recipe `retries: 1`: a stage process killed mid-training (as the OOM killer would) is a transient
    error; Prefect retries the task in the same `baton run`, which resumes from the checkpoint."""
    art, _, _ = first_run
    over = ["retries=1", "stages.vqa.train.steps=300", "stages.vqa.runtime.checkpoint_every=4"]
    proc, killed, _ = run_until_checkpoint(art, "vqa", over)
    m = re.match(r"pid=(\d+)", (killed / ".lock").read_text())
    os.kill(int(m.group(1)), signal.SIGKILL)  # the stage process, not the flow
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "worker exited with status -9" in out and re.search(r"Retry 1/1 will start", out), out[-4000:]
    assert re.search(r"\[vqa\] resumed from checkpoint at step [1-9]", out), out[-4000:]
    assert (killed / "result.json").exists()


def test_dag_lineage_and_gc_read_the_real_run(first_run):
    """dag and lineage render the store's stages with their MLflow runs and LoggedModels; gc of the recipe
    removes every stage dir it does not plan (the variants of the tests above) and the finished checkpoints,
    and the recipe stays complete."""
    import json

    art, _, _ = first_run
    dag = json.loads(baton(["dag", CONFIG, "--json"], art).stdout)
    nodes = {n["stage"]: n for n in dag["nodes"]}
    assert list(nodes) == STAGES and {n["state"] for n in nodes.values()} == {"complete"}
    assert ["vl", "vqa"] in dag["edges"] and ["bert", "caption"] not in dag["edges"]
    chain = json.loads(baton(["lineage", nodes["vqa"]["model_id"], "--json"], art).stdout)["chain"]
    assert [n["stage"] for n in chain] == ["world", "cnn", "detector", "bert", "vl", "vqa"]
    for n in chain:
        assert (n["fingerprint"], n["run_id"], n["model_id"]) == tuple(nodes[n["stage"]][k] for k in (
            "fingerprint", "run_id", "model_id")) and n["mlflow"]["status"] == "FINISHED"

    planned = {Path(n["path"]) for n in nodes.values()}
    others = {d for d in art.glob("stages/*/*") if d.is_dir() and d not in planned}
    plan = json.loads(baton(["gc", "--dry-run", "--keep-days", "0", CONFIG, "--json"], art).stdout)
    assert {Path(i["path"]) for i in plan["items"] if i["what"] == "stage dir"} == others
    assert {Path(i["path"]).parent for i in plan["items"] if i["what"] == "checkpoints"} == \
        {d for d in planned if (d / "checkpoints").is_dir()}
    assert plan["bytes"] == sum(i["bytes"] for i in plan["items"]) > 0 and all(d.exists() for d in others)
    p = baton(["gc", "--keep-days", "0", CONFIG], art)
    assert "freed" in p.stdout and not any(d.exists() for d in others)
    assert not any((d / "checkpoints").exists() for d in planned)
    assert baton(["status", CONFIG], art).stdout.count("complete") == len(STAGES)


@pytest.mark.slow  # three CLI runs, ~1-2 min
def test_stage_processes_can_be_spawned_instead_of_forked(tmp_path):
    """BATON_WORKER_START=spawn: each stage in a fresh `python -m flows.worker` (the fork server's
    fallback) trains the same as a forked one; an unknown value is refused, naming the variable."""
    art = tmp_path / "artifacts"
    det = "runtime.deterministic=true"
    p = baton(["run", CONFIG, det, "--only", "bert", "--no-track"], art, env={"BATON_WORKER_START": "spawn"})
    out = p.stderr + p.stdout
    assert p.returncode == 0 and ran(out) == {"world", "bert"}, out[-3000:]
    q = baton(["run", CONFIG, det, "--only", "bert", "--no-track"], tmp_path / "forked")
    assert q.returncode == 0, (q.stderr + q.stdout)[-3000:]
    spawned, forked = results(art)["bert"][0], results(tmp_path / "forked")["bert"][0]
    assert spawned["fingerprint"] == forked["fingerprint"] and spawned["metrics"] == forked["metrics"]
    p = baton(["run", CONFIG, "--only", "world", "--no-track"], tmp_path / "bad", check=False,
              env={"BATON_WORKER_START": "thread"})
    assert p.returncode == 2 and "BATON_WORKER_START='thread'" in p.stderr, p.stderr[-2000:]


def stage_process_alive(lock: Path) -> bool:
    m = re.match(r"pid=(\d+)", lock.read_text())
    try:
        return Path(f"/proc/{m.group(1)}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # two CLI runs, ~1.5 min; the pieces have fast tests in test_interrupt.py
def test_ctrl_c_during_vl_stops_cleanly_at_once_and_rerun_resumes(first_run):
    import sqlite3

    art, _, _ = first_run
    over = ["stages.vl.train.steps=120", "stages.vl.runtime.checkpoint_every=4", "--only", "vl"]
    proc, vl_dir, _ = run_until_checkpoint(art, "vl", over, min_step=4)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole foreground process group
    t0 = time.monotonic()
    try:
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.monotonic() - t0
    assert proc.returncode == 130 and took < 10, f"exit {proc.returncode} after {took:.1f}s\n{out[-3000:]}"
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"interrupted: stage 'vl' interrupted at step (\d+)/120, last checkpoint at step (\d+): "
                     r"run the same `baton run` again to resume", last)
    assert m and int(m.group(1)) >= int(m.group(2)) >= 4, out[-3000:]
    assert "Traceback" not in out and "ConnectError" not in out, out[-3000:]
    assert not stage_process_alive(vl_dir / ".lock")
    # this run removed its recipe snapshot (a SIGKILLed flow of an earlier test leaves its own: see the note)
    assert not list((art / "tmp").glob(f"recipe-{proc.pid}-*")), list((art / "tmp").iterdir())

    import json

    client = mlflow_client(art)
    vl_run = client.get_run(json.loads((vl_dir / "run.json").read_text())["mlflow_run_id"])
    parent = client.get_run(vl_run.data.tags["mlflow.parentRunId"])
    assert (vl_run.info.status, parent.info.status) == ("KILLED", "KILLED")
    flow_run_id = parent.data.tags["baton.prefect_flow_run_id"]
    with sqlite3.connect(art / "prefect" / "prefect.db") as db:
        (state,) = db.execute("select state_type from flow_run where id = ?", (flow_run_id,)).fetchone()
    assert state in ("CANCELLED", "CRASHED")

    p = baton(["run", CONFIG, *over], art)
    out = p.stderr + p.stdout
    assert f"[vl] resumed from checkpoint at step {m.group(2)}/120" in out, out[-3000:]
    assert (vl_dir / "result.json").exists()
