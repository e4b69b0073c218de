"""flows.lineage / flows.gc against a real (SQLite) MLflow store, with runs and LoggedModels logged the way
flows.pipeline logs them; the stage dirs are fakes (no training)."""
import shutil

import pytest
from fakestore import age, fake_stage

from flows.gc import find_garbage
from flows.lineage import find_node, lineage_chain
from flows.store import StageDir
from flows.tracking import Tracking
from stages.recipe import load_recipe


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Store with stages a -> b, each with a stage run under one parent run and a LoggedModel."""
    art = tmp_path_factory.mktemp("art")
    tr = Tracking(art, "lineage-test")
    parent = tr.start_parent("p", {})
    ids = {}
    for stage, fp, up in (("a", "a" * 64, {}), ("b", "b" * 64, {"a": "a" * 64})):
        run = tr.start_stage_run(parent, stage, fp, {"kind": stage})
        model_dir = art / f"model-{stage}"
        model_dir.mkdir()
        (model_dir / "w.safetensors").write_bytes(b"0")
        model = tr.log_model(run, stage, fp, model_dir, 1, {})
        tr.end_run(run)
        fake_stage(art, stage, fp, up, run_id=run, model_id=model, age_days=30)
        ids[stage] = (run, model)
    tr.end_run(parent)
    return art, ids


def test_chain_carries_mlflow_run_and_model_state(tracked):
    art, ids = tracked
    chain = lineage_chain(art, ids["b"][1])  # by LoggedModel id
    assert [(n.stage, n.run_id, n.model_id) for n in chain] == [("a", *ids["a"]), ("b", *ids["b"])]
    assert all(n.mlflow.status == "FINISHED" and "READY" in n.mlflow.model_status for n in chain)


def test_run_id_found_through_mlflow_tags_when_run_json_is_gone(tracked):
    art, ids = tracked
    (StageDir(art, "b", "b" * 64).path / "run.json").rename(art / "run.json.away")
    res = StageDir(art, "b", "b" * 64).path / "result.json"
    shutil.copy(res, art / "result.json.away")
    res.write_text(res.read_text().replace(ids["b"][0], "other"))
    try:
        assert find_node(art, ids["b"][0]).fingerprint == "b" * 64
    finally:
        (art / "run.json.away").rename(StageDir(art, "b", "b" * 64).path / "run.json")
        shutil.copy(art / "result.json.away", res)


def test_gc_keeps_a_dir_whose_mlflow_run_is_recent(tracked, root):
    art, _ = tracked  # files 30 days old, the runs started seconds ago; no recipe references a or b
    micro = load_recipe(root / "configs" / "vlp-micro.yaml")
    for stage in "ab":
        age(StageDir(art, stage, stage * 64).path, 30)  # whatever the other tests touched
    assert find_garbage(art, [micro], keep_days=7, mlflow=True) == []
    assert {g.path.parent.name for g in find_garbage(art, [micro], keep_days=7, mlflow=False)} == {"a", "b"}
