"""`baton sweep` / `baton report` over the micro recipe, through the real Prefect engine and server, MLflow
store and stage processes: variants are validated before anything runs, a stage the members share is one
node trained once, the names show every member, a rerun trains nothing, and the report's files, MLflow
artifacts and Prefect artifact carry the numbers of the stages' result.json."""
import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import baton

from flows.sweep import load_sweep, spec_from_options
from stages.recipe import RecipeError

CONFIG = "configs/vlp-micro.yaml"
LP_FT = "lp_ft=stages.vqa.train.transfer.strategy=lp_ft stages.vqa.train.transfer.lp_steps=3"
SHARED = ["world", "cnn", "detector", "bert", "vl"]


def done(output: str) -> list[str]:
    return re.findall(r"\[(\w+)\] done in", output)


def mlflow_client(art: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")


def prefect_post(art: Path, path: str, body: dict) -> list[dict]:
    from flows import server

    url = server.live_server(art)["url"]
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    art = tmp_path_factory.mktemp("sweep") / "artifacts"
    p = baton(["sweep", CONFIG, "--name", "s22", "--variant", "ft=", "--variant", LP_FT,
               "--grid", "stages.vqa.train.lr=0.001,0.003", "--only", "vqa", "--json"], art)
    return art, p.stderr, json.loads(p.stdout)


MEMBERS = ["ft+lr=0.001", "ft+lr=0.003", "lp_ft+lr=0.001", "lp_ft+lr=0.003"]


def test_2x2_sweep_trains_each_shared_stage_once(two_by_two):
    art, log, out = two_by_two
    assert out["members"] == MEMBERS and out["swept"] == ["vqa"]
    for s in SHARED:  # one directory, one execution, one Prefect task run for all four members
        assert len(list((art / "stages" / s).iterdir())) == 1, s
        assert done(log).count(s) == 1, (s, done(log))
    assert len([d for d in (art / "stages" / "vqa").iterdir() if (d / "result.json").exists()]) == 4
    assert done(log).count("vqa") == 4 and "caption" not in done(log)  # --only vqa
    record = json.loads((art / "sweeps" / "s22.json").read_text())
    assert record["status"] == "FINISHED" and [m["name"] for m in record["members"]] == MEMBERS
    tasks = prefect_post(art, "/task_runs/filter",
                         {"flow_runs": {"id": {"any_": [record["prefect_flow_run_id"]]}}})
    names = sorted(t["name"] for t in tasks)
    assert names == sorted([f"{s}[shared x4]" for s in SHARED] + [f"vqa[{m}]" for m in MEMBERS]), names


def test_2x2_sweep_names_every_member_in_mlflow(two_by_two):
    art, _, out = two_by_two
    client = mlflow_client(art)
    sweep_run = client.get_run(out["mlflow_run_id"])
    assert sweep_run.data.tags["baton.sweep"] == "s22" and sweep_run.info.status == "FINISHED"
    exp = sweep_run.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    members = {r.info.run_name: r for r in children if "baton.member" in r.data.tags}
    assert sorted(members) == MEMBERS
    assert {r.data.tags["baton.variant"] for r in members.values()} == set(MEMBERS)
    record = json.loads((art / "sweeps" / "s22.json").read_text())
    for m in record["members"]:  # a member's own stage is its child; its metric is on the member's run
        vqa = json.loads((art / "stages/vqa" / m["fingerprints"]["vqa"][:16] / "result.json").read_text())
        stage_run = client.get_run(vqa["info"]["mlflow_run_id"])
        assert stage_run.data.tags["mlflow.parentRunId"] == members[m["name"]].info.run_id
        assert members[m["name"]].data.metrics["vqa/val/vqa_acc"] == pytest.approx(vqa["metrics"]["val/vqa_acc"])
    vl = json.loads(next((art / "stages/vl").glob("*/result.json")).read_text())
    vl_run = client.get_run(vl["info"]["mlflow_run_id"])  # shared: child of the sweep run, tagged with all
    assert vl_run.data.tags["mlflow.parentRunId"] == out["mlflow_run_id"]
    assert sorted(vl_run.data.tags["baton.variants"].split(",")) == MEMBERS


def test_2x2_report_files_mlflow_and_prefect_carry_the_results(two_by_two):
    art, _, out = two_by_two
    rep = art / "reports" / "s22"
    assert out["report"] == str(rep / "index.html")
    assert (rep / "bars.png").stat().st_size > 5000 and "<img src=\"bars.png\"" in (rep / "index.html").read_text()
    numbers = json.loads((rep / "numbers.json").read_text())
    record = json.loads((art / "sweeps" / "s22.json").read_text())
    for m in record["members"]:
        vqa = json.loads((art / "stages/vqa" / m["fingerprints"]["vqa"][:16] / "result.json").read_text())
        cell = numbers["metrics"]["vqa/val/vqa_acc"][m["variant"]]
        assert cell["n"] == 1 and cell["values"] == [pytest.approx(vqa["metrics"]["val/vqa_acc"])]
    logged = {f.path for f in mlflow_client(art).list_artifacts(out["mlflow_run_id"], "report")}
    assert {"report/bars.png", "report/index.html", "report/numbers.json"} <= logged
    arts = prefect_post(art, "/artifacts/filter", {"artifacts": {"key": {"any_": ["sweep-s22"]}}})
    assert arts and arts[-1]["flow_run_id"] == record["prefect_flow_run_id"]
    md = arts[-1]["data"]
    assert all(f"| vqa/val/vqa_acc | {m} |" in md for m in MEMBERS), md


def test_status_reads_a_sweep_file(two_by_two, tmp_path):
    art, _, _ = two_by_two
    f = tmp_path / "s22.yaml"
    f.write_text(f"sweep: s22\nrecipe: {Path(CONFIG).resolve()}\nonly: [vqa]\nvariants:\n  ft: ''\n"
                 f"  lp_ft: 'stages.vqa.train.transfer.strategy=lp_ft stages.vqa.train.transfer.lp_steps=3'\n"
                 f"grid: {{stages.vqa.train.lr: [0.001, 0.003]}}\n")
    st = json.loads(baton(["status", str(f), "--json"], art).stdout)
    assert {r["state"] for r in st["stages"]} == {"complete"} and len(st["stages"]) == 4 * 6
    assert {r["shared"] for r in st["stages"] if r["name"] == "vl"} == {4}


@pytest.mark.slow
def test_2x2_rerun_trains_nothing(two_by_two):
    art, _, _ = two_by_two
    p = baton(["sweep", CONFIG, "--name", "s22", "--variant", "ft=", "--variant", LP_FT,
               "--grid", "stages.vqa.train.lr=0.001,0.003", "--only", "vqa", "--no-report"], art)
    assert done(p.stderr + p.stdout) == []
    assert (p.stderr + p.stdout).count("Finished in state Cached") == 9


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_stage_from_the_checkpoint_and_shares_the_rest(two_by_two):
    """SIGKILL of the whole `baton sweep` (flow and stage processes) while a member's vqa trains; the same
    sweep again resumes that vqa from its newest checkpoint, trains the other member's, and reruns nothing
    upstream (Cached)."""
    import os
    import signal
    import subprocess

    from conftest import BATON, ROOT, wait_for_checkpoint

    art, _, _ = two_by_two
    long = "stages.vqa.train.steps=400 stages.vqa.runtime.checkpoint_every=4"
    argv = ["sweep", CONFIG, "--name", "killed", "--variant", f"a={long}", "--variant",
            f"b={long} stages.vqa.train.lr=0.002", "--only", "vqa", "--max-concurrency", "1", "--no-report"]
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(BATON + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    found = wait_for_checkpoint(proc, art, "vqa", 8, timeout=600, poll=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert found, out[-3000:]
    killed, step = found
    assert not (killed / "result.json").exists()
    record = json.loads((art / "sweeps" / "killed.json").read_text())
    assert record["status"] == "RUNNING"  # killed: the record says so until a rerun finishes it

    p = baton(argv, art)
    text = p.stderr + p.stdout
    m = re.search(r"\[vqa\] resumed from checkpoint at step (\d+)", text)
    assert m and int(m.group(1)) >= step, text[-3000:]
    assert done(text) == ["vqa", "vqa"], text[-3000:]  # the resumed one and the other member's; nothing upstream
    assert (killed / "result.json").exists()
    assert json.loads((art / "sweeps" / "killed.json").read_text())["status"] == "FINISHED"


def test_a_bad_variant_is_refused_naming_it_and_the_key_before_anything_runs(tmp_path):
    art = tmp_path / "art"
    p = baton(["sweep", CONFIG, "--variant", "ok=stages.vqa.train.lr=0.002",
               "--variant", "bad=stages.vqa.train.transfer.strategy=lp_ft"], art, check=False)
    assert p.returncode == 2
    assert "variant 'bad'" in p.stderr and "stages.vqa.train.transfer" in p.stderr and "lp_steps" in p.stderr
    assert not (art / "stages").exists() and not (art / "sweeps").exists()
    with pytest.raises(RecipeError, match=r"variant 'typo'.*stages\.vqa\.train\.lrr: unknown key; did you mean 'lr'"):
        load_sweep(Path(CONFIG), ["typo=stages.vqa.train.lrr=0.002"])


def test_sweep_file_can_say_a_variant_is_invalid(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(f"sweep: bad\nrecipe: {Path(CONFIG).resolve()}\nvariants:\n"
                 "  part: {stages.vqa.train.transfer.strategy: partial}\n")
    with pytest.raises(RecipeError, match=r"variant 'part'.*stages\.vqa\.train\.transfer.*freeze_blocks"):
        load_sweep(f)


def test_seeds_vary_the_swept_stages_and_downstream_only():
    spec = spec_from_options(Path(CONFIG), ["a=stages.vl.train.lr=0.002", "b="], [], "0,1", None, [], "t")
    sw = load_sweep(Path(CONFIG), ["a=stages.vl.train.lr=0.002", "b="], [], "0,1", None, [], "t")
    assert spec.seeds == [0, 1] and [m.name for m in sw.members] == ["a@s0", "a@s1", "b@s0", "b@s1"]
    assert sw.swept == ["vl"] and sw.seeded == ["vl", "caption", "vqa"]
    fps = {s: {m.plans[s].fingerprint for m in sw.members} for s in sw.members[0].wanted}
    assert all(len(fps[s]) == 1 for s in ("world", "cnn", "detector", "bert"))  # upstream: shared
    assert len(fps["vl"]) == 4 and len(fps["vqa"]) == 4
    moved = load_sweep(Path(CONFIG), ["a=stages.vl.train.lr=0.002"], [], "0,1", "bert", [], "t")
    assert moved.seeded == ["bert", "vl", "caption", "vqa"]
    assert len({m.plans["bert"].fingerprint for m in moved.members}) == 2
    with pytest.raises(RecipeError, match="seeds_from"):
        load_sweep(Path(CONFIG), ["a="], [], "0,1", None, [], "t")


@pytest.mark.slow
def test_4_variants_x_3_seeds_train_each_shared_stage_once(tmp_path):
    art = tmp_path / "artifacts"
    variants = ["ft=", LP_FT, "lp=stages.vqa.train.transfer.strategy=linear_probe",
                "part=stages.vqa.train.transfer.strategy=partial stages.vqa.train.transfer.freeze_blocks=1"]
    args = ["sweep", CONFIG, "--name", "s43", "--seeds", "0,1,2", "--json"]
    for v in variants:
        args += ["--variant", v]
    p = baton(args, art, timeout=1800)
    out, log = json.loads(p.stdout), p.stderr
    assert len(out["members"]) == 12 and out["seeded"] == ["vqa"]
    for s in SHARED + ["caption"]:
        assert done(log).count(s) == 1 and len(list((art / "stages" / s).iterdir())) == 1, s
    assert done(log).count("vqa") == 12
    numbers = json.loads((art / "reports/s43/numbers.json").read_text())
    assert {g: v["n"] for g, v in numbers["metrics"]["vqa/val/vqa_acc"].items()} == \
        {"ft": 3, "lp_ft": 3, "lp": 3, "part": 3}


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/sweeps/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates_and_shares_its_upstream(path):
    sw = load_sweep(path)
    assert len(sw.members) >= 12 and sw.spec.seeds == [0, 1, 2] and sw.spec.report.get("claim")
    assert sw.nodes[("world", sw.members[0].plans["world"].fingerprint)].members == [m.name for m in sw.members]
    for ref in sw.spec.report.get("metrics") or [sw.spec.report["x"], sw.spec.report["y"]]:
        assert ref.split("/")[0] in sw.members[0].wanted, ref
