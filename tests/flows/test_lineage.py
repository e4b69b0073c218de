"""flows.lineage: the DAG as planned and the upstream chain of a stage execution, from fake stores on disk."""
import json

import pytest
from fakestore import fake_recipe_store, fake_stage

from flows.lineage import find_node, lineage_chain, plan_dag, render_chain, render_dot, render_tree, scan_store
from stages.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def micro(root):
    return load_recipe(root / "configs" / "vlp-micro.yaml")


def test_dag_states_follow_the_store(tmp_path, micro):
    fake_recipe_store(tmp_path, micro, ["world", "bert"])
    fake_recipe_store(tmp_path, micro, ["cnn"], complete=False, checkpoint_steps=(5, 10))
    dag = plan_dag(micro, tmp_path)
    assert list(dag.nodes) == list(micro.stages)
    states = {n: node.state for n, node in dag.nodes.items()}
    assert states == {"world": "complete", "bert": "complete", "cnn": "partial", "detector": "not started",
                      "vl": "not started", "caption": "not started", "vqa": "not started"}
    assert dag.nodes["cnn"].step == 10 and dag.nodes["cnn"].described == "partial at step 10"
    assert "partial at step 10" in render_tree(dag)
    assert set(dag.nodes["vl"].upstream) == {"world", "detector", "bert"}
    assert ("detector", "vqa") in dag.edges() and ("world", "cnn") in dag.edges()
    assert dag.nodes["world"].run_id == "run-world" and dag.nodes["bert"].model_id == "m-bert"
    # upstream fingerprints are the upstream nodes' own
    assert dag.nodes["vl"].upstream["detector"] == dag.nodes["detector"].fingerprint


def test_dag_renders_as_tree_json_and_dot(tmp_path, micro):
    fake_recipe_store(tmp_path, micro, ["world"])
    dag = plan_dag(micro, tmp_path)
    tree = render_tree(dag)
    world_fp = dag.nodes["world"].fingerprint[:12]
    world_line = next(line for line in tree.splitlines() if line.strip().startswith("world"))
    assert world_line.split() == ["world", "world", world_fp, "complete"]
    assert "└ vqa" in tree and "<- detector, vl, world" in tree
    data = json.loads(json.dumps(dag.to_json()))
    assert data["nodes"][0]["stage"] == "world" and ["vl", "vqa"] in data["edges"]
    dot = render_dot(dag)
    assert dot.startswith('digraph "vlp-micro"') and '"vl" -> "caption";' in dot


def test_chain_walks_upstream_fingerprints_to_the_root(tmp_path, micro):
    dirs = fake_recipe_store(tmp_path, micro, list(micro.stages))
    chain = lineage_chain(tmp_path, "vqa", mlflow=False)
    assert [n.stage for n in chain][-1] == "vqa"
    assert {n.stage for n in chain} == {"world", "cnn", "detector", "bert", "vl", "vqa"}  # not caption
    order = [n.stage for n in chain]
    assert order.index("world") < order.index("cnn") < order.index("detector") < order.index("vl")
    assert chain[-1].path == dirs["vqa"].path
    text = render_chain(chain)
    assert "run run-vl" in text and "model m-detector" in text and "loss=1" in text


@pytest.mark.parametrize("ref", ["run-vl", "m-vl", "vl", "DIR"])
def test_chain_found_by_run_model_stage_or_dir(tmp_path, micro, ref):
    dirs = fake_recipe_store(tmp_path, micro, ["world", "cnn", "detector", "bert", "vl"])
    ref = str(dirs["vl"].path) if ref == "DIR" else ref
    assert find_node(tmp_path, ref).path == dirs["vl"].path
    assert [n.stage for n in lineage_chain(tmp_path, ref, mlflow=False)][-1] == "vl"


def test_stage_name_with_a_recipe_means_its_planned_dir(tmp_path, micro):
    fake_stage(tmp_path, "world", "a" * 64, {})  # an older world, complete, not what the recipe plans
    node = find_node(tmp_path, "world", recipe=micro)
    assert node.state == "not started" and node.fingerprint != "a" * 64
    assert find_node(tmp_path, "world").fingerprint == "a" * 64  # without a recipe: the newest complete dir


def test_a_removed_upstream_is_named_missing(tmp_path):
    fake_stage(tmp_path, "b", "b" * 64, {"a": "a" * 64}, run_id="r-b")
    chain = lineage_chain(tmp_path, "r-b", mlflow=False)
    assert [(n.stage, n.state, n.fingerprint) for n in chain] == [("a", "missing", "a" * 64),
                                                                  ("b", "complete", "b" * 64)]


def test_unknown_ref_says_what_it_tried(tmp_path):
    fake_stage(tmp_path, "a", "a" * 64, {})
    with pytest.raises(RecipeError, match="not a stage dir, a stage run id, a LoggedModel id"):
        find_node(tmp_path, "nope")


def test_scan_skips_temp_names_of_interrupted_removals(tmp_path):
    sd = fake_stage(tmp_path, "a", "a" * 64, {})
    sd.path.rename(sd.path.with_name(f".{sd.path.name}.old-123"))
    fake_stage(tmp_path, "a", "c" * 64, {})
    assert [n.fingerprint for n in scan_store(tmp_path)] == ["c" * 64]


def test_cli_dag_and_lineage_render_the_same_nodes(tmp_path, micro, capsys):
    from flows.cli import main

    fake_recipe_store(tmp_path, micro, ["world", "cnn", "detector", "bert", "vl"])
    art = ["--artifacts", str(tmp_path)]
    assert main(["dag", str(micro.path), *art, "--json"]) == 0
    dag = {n["stage"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert main(["lineage", "m-vl", *art, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["of"]["stage"] == "vl" and all(n == dag[n["stage"]] for n in doc["chain"])
    assert main(["dag", str(micro.path), *art, "--dot"]) == 0 and '"bert" -> "vl";' in capsys.readouterr().out
    assert main(["lineage", "vl", "--config", str(micro.path), *art]) == 0
    assert "lineage of vl" in capsys.readouterr().out
    assert main(["lineage", "no-such-run", *art]) == 2
    assert "not a stage dir, a stage run id" in capsys.readouterr().err
