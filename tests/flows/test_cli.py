"""The `baton` command line, in-process (``flows.cli.main``): options on either side of the command name,
`--json` documents, the shipped recipes (`ls`, `cp`), suggestions for mistyped commands, stages and keys,
and exit codes. Nothing here starts Prefect or trains anything."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main, run_summary
from flows.store import StageDir
from stages.contract import StageResult
from stages.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/vlp-micro.yaml")
STAGES = ["world", "cnn", "detector", "bert", "vl", "caption", "vqa"]


def status_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_artifacts_option_before_or_after_the_command_or_from_the_environment(tmp_path, capsys, monkeypatch):
    before = status_json(capsys, ["--artifacts", str(tmp_path / "a"), "status", CONFIG, "--json"])
    after = status_json(capsys, ["status", CONFIG, "--artifacts", str(tmp_path / "b"), "--json"])
    assert before["artifacts"] == str(tmp_path / "a") and after["artifacts"] == str(tmp_path / "b")
    monkeypatch.setenv("BATON_ARTIFACTS", str(tmp_path / "env"))
    assert status_json(capsys, ["status", CONFIG, "--json"])["artifacts"] == str(tmp_path / "env")
    # after the command wins over before it: the option nearest the command's arguments
    both = status_json(capsys, ["--artifacts", str(tmp_path / "a"), "status", CONFIG, "--artifacts", str(tmp_path / "c"),
                                "--json"])
    assert both["artifacts"] == str(tmp_path / "c")


def test_status_json_names_each_stage_with_kind_fingerprint_state_and_step(tmp_path, capsys):
    art = tmp_path / "art"
    doc = status_json(capsys, ["status", CONFIG, "--artifacts", str(art), "--json"])
    assert [s["name"] for s in doc["stages"]] == STAGES
    assert {s["state"] for s in doc["stages"]} == {"not started"}
    world = doc["stages"][0]
    assert world["kind"] == "world" and len(world["fingerprint"]) == 64 and world["step"] is None
    # a complete stage (its result.json) and a started one
    done = StageDir(art, "world", world["fingerprint"])
    done.path.mkdir(parents=True)
    done.write_result(StageResult(
        stage="world", kind="world", fingerprint=world["fingerprint"], info={"steps": 0}))
    StageDir(art, "cnn", doc["stages"][1]["fingerprint"]).path.mkdir(parents=True)
    states = {s["name"]: (s["state"], s["step"]) for s in status_json(
        capsys, ["status", CONFIG, "--artifacts", str(art), "--json"])["stages"]}
    assert states["world"] == ("complete", 0) and states["cnn"] == ("started", None)
    assert states["vqa"] == ("not started", None)
    assert main(["status", CONFIG, "--artifacts", str(art)]) == 0
    text = capsys.readouterr().out
    assert "world" in text and "complete" in text and "started, no checkpoint" in text


def test_run_summary_says_which_stages_ran_and_which_were_cached():
    recipe = load_recipe(CONFIG)
    out = {"parent_run_id": "p1", "results": {  # in completion order
        "cnn": {"fingerprint": "f1", "metrics": {"top1": 0.5}, "baselines": {"chance": 0.1},
                "info": {"seconds": 9.0, "mlflow_run_id": "r1", "mlflow_model_id": "m-1"}},
        "world": {"fingerprint": "f0", "metrics": {}, "info": {"seconds": 1.5, "mlflow_run_id": "r0"}}}}
    doc = run_summary(recipe, out, done_before={"world"}, seconds=12.345)
    json.dumps(doc)  # one JSON document
    assert doc["mlflow_parent_run_id"] == "p1" and doc["seconds"] == 12.35
    world, cnn = doc["stages"]  # in the recipe's order
    assert (world["name"], world["state"], world["seconds"], world["mlflow_run_id"]) == ("world", "cached", 1.5, "r0")
    assert (cnn["state"], cnn["kind"], cnn["metrics"], cnn["mlflow_model_id"]) == ("ran", "cnn", {"top1": 0.5}, "m-1")


def test_ls_lists_every_shipped_recipe_with_its_description(capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    micro = next(ln for ln in lines if ln.startswith("vlp-micro"))
    assert "micro size" in micro and "baton run" not in micro  # the description, not the command line


def test_cp_copies_a_shipped_recipe_that_then_validates(tmp_path, capsys):
    assert main(["cp", "vlp-micro", str(tmp_path)]) == 0
    copied = tmp_path / "vlp-micro.yaml"
    assert copied.read_bytes() == (ROOT / "configs/vlp-micro.yaml").read_bytes()
    assert load_recipe(copied).name == "vlp-micro"
    assert main(["cp", "vlp-micro", str(copied)]) == 2, "an existing file is not overwritten"
    assert "exists" in capsys.readouterr().err
    assert main(["cp", "vlp-tiny", str(copied), "--force"]) == 0
    assert load_recipe(copied).name == "vlp-tiny"


def test_cp_of_an_unknown_recipe_suggests_the_close_one(tmp_path, capsys):
    assert main(["cp", "vlp-mikro", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe 'vlp-mikro'" in err and "did you mean 'vlp-micro'" in err
    assert not list(tmp_path.iterdir())


def test_mistyped_command_suggests_the_right_one():
    p = subprocess.run([sys.executable, "-m", "flows.cli", "stauts", CONFIG], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 2
    assert "No such command 'stauts'" in p.stderr and "Did you mean 'status'?" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("cmd", ["run", "status", "ls", "cp", "resume", "retry", "serve", "submit", "ui", "dag", "lineage",
                                 "gc"])
def test_each_command_help_shows_an_example(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert f"Example: baton {cmd}" in capsys.readouterr().out


def test_misspelt_stage_in_an_override_names_it_and_suggests_the_stage():
    with pytest.raises(RecipeError) as e:
        load_recipe(CONFIG, ["stages.vqaa.train.lr=3e-4"])
    msg = str(e.value)
    assert "no stage 'vqaa' in the recipe" in msg and "did you mean 'vqa'?" in msg
    assert "kind" not in msg


def test_an_override_may_still_add_a_stage_by_naming_its_kind():
    r = load_recipe(CONFIG, ["stages.world2.kind=world", "stages.world2.captions_per_image=3"])
    assert r.stages["world2"].kind == "world"


@pytest.mark.parametrize("override, key, suggestion", [
    ("stages.cnn.train.lrr=0.1", "stages.cnn.train.lrr: unknown key", "'lr'"),
    ("stages.cnn.trian.lr=0.1", "stages.cnn.trian: unknown key", "'train'"),
    ("runtime.devce=cpu", "runtime.devce: unknown key", "'device'"),
])
def test_misspelt_key_suggests_the_field(override, key, suggestion):
    with pytest.raises(RecipeError) as e:
        load_recipe(CONFIG, [override])
    assert key in str(e.value) and f"did you mean {suggestion}?" in str(e.value)


def test_cli_refuses_a_misspelt_override_with_exit_2_and_no_traceback(tmp_path, capsys):
    assert main(["run", CONFIG, "stages.vqaa.train.lr=3e-4", "--artifacts", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'stages.vqaa.train.lr=3e-4': no stage 'vqaa'") and "Traceback" not in err
    assert not (tmp_path / "a").exists()
