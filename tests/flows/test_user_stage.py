"""Stage kinds from the user's own package, and recipe-relative paths, through the real ``baton run``
started from a directory that is neither the checkout nor the recipe's folder.

The package (tests/fixtures/user_stage/src/my_project) adds a sixth stage after vqa to the micro recipe,
found through the recipe's ``python_path: [src]``; it is tracked, cached on rerun and resumed after an
interruption (it raises once after its first checkpoint) like the built-in kinds."""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "user_stage"


def run_baton(args: list[str], cwd: Path, art: Path, **env: str) -> subprocess.CompletedProcess:
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)} | env
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, check=False,
                          text=True, timeout=900)


def project(tmp_path: Path, stages: dict, **settings) -> Path:
    """A recipe at tmp_path/project/recipe.yaml (beside a copy of the user package in src/)."""
    folder = tmp_path / "project"
    shutil.copytree(FIXTURE / "src", folder / "src")
    recipe = {"recipe": "user", "seed": 0, "runtime": {"device": "cpu", "threads": 1, "log_every": 5, "checkpoint_every": 5},
              **settings, "stages": stages}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (tmp_path / "elsewhere").mkdir()
    return folder / "recipe.yaml"


def mlflow_runs(art: Path, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{art / 'mlflow.db'}")
    exp = client.get_experiment_by_name("user")
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith(name)]


def test_unknown_kind_names_the_key_and_the_module(tmp_path):
    recipe = project(tmp_path, {"probe": {"kind": "my_project.stages.nope"}}, python_path=["src"])
    p = run_baton(["status", str(recipe)], tmp_path / "elsewhere", tmp_path / "artifacts")
    assert p.returncode != 0
    err = p.stderr + p.stdout
    assert "stages.probe.kind" in err and "'my_project.stages.nope'" in err and "ModuleNotFoundError" in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_stage_from_the_users_package_is_tracked_cached_and_resumed(tmp_path):
    stages = yaml.safe_load((ROOT / "configs" / "vlp-micro.yaml").read_text())["stages"]
    stages["probe"] = {"kind": "my_project.stages.probe", "needs": ["vqa"], "train": {"steps": 12, "batch_size": 32}}
    recipe = project(tmp_path, stages, python_path=["src"])
    art, cwd, marker = tmp_path / "artifacts", tmp_path / "elsewhere", tmp_path / "failed-once"

    first = run_baton(["run", str(recipe)], cwd, art, MY_PROJECT_FAIL_ONCE=str(marker))
    assert first.returncode != 0 and marker.exists(), first.stderr[-3000:]
    (probe_dir,) = art.glob("stages/probe/*")
    assert not (probe_dir / "result.json").exists() and list(probe_dir.glob("checkpoints/*"))

    second = run_baton(["run", str(recipe)], cwd, art, MY_PROJECT_FAIL_ONCE=str(marker))
    out = second.stderr + second.stdout
    assert second.returncode == 0, out[-3000:]
    assert set(re.findall(r"\[(\w+)\] done in", out)) == {"probe"}, "only the interrupted stage runs"
    result = json.loads((probe_dir / "result.json").read_text())
    assert result["info"]["resumed_from"] >= 5, "continued from its checkpoint"
    (run,) = mlflow_runs(art, "probe")
    assert run.info.run_id == result["info"]["mlflow_run_id"] and run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics

    third = run_baton(["run", str(recipe)], cwd, art)
    assert third.returncode == 0 and "[probe] cached:" in third.stderr + third.stdout


def test_relative_dataset_path_in_a_tracked_world_stage(tmp_path):
    """issue 12 item 3: `paths.imagenet: data/imagenet` beside the recipe, run from elsewhere: the world
    stage reads that folder and logs it (no `Changing param values is not allowed`)."""
    recipe = project(tmp_path, {"world": {"kind": "world", "source": "real", "paths": {"imagenet": "data/imagenet"}}})
    shutil.copytree(ROOT / "tests" / "fixtures" / "imagenet", recipe.parent / "data" / "imagenet")
    art = tmp_path / "artifacts"
    p = run_baton(["run", str(recipe)], tmp_path / "elsewhere", art)
    assert p.returncode == 0, (p.stderr + p.stdout)[-3000:]
    (run,) = mlflow_runs(art, "world")
    assert run.data.params["paths.imagenet"] == str((recipe.parent / "data" / "imagenet").resolve())


def test_the_code_digest_follows_the_users_modules(tmp_path, monkeypatch):
    """The user kind's digest covers its module and the user modules it imports (my_project.heads): an
    edit of heads.py changes the stage's fingerprint, not the built-in stages'."""
    from flows import fingerprint
    from stages.recipe import load_recipe

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    recipe = project(tmp_path, {"world": {"kind": "world"}, "bert": {"kind": "bert", "needs": ["world"]},
                                "probe": {"kind": "my_project.stages.probe", "needs": ["bert"], "upstream": "bert"}},
                     python_path=["src"])
    r = load_recipe(recipe)
    assert str(recipe.parent / "src") in sys.path and r.raw["python_path"] == [str(recipe.parent / "src")]
    assert {"my_project.stages.probe", "my_project.heads", "stages.train.loop"} <= set(
        fingerprint.code_digest("my_project.stages.probe"))
    before = {n: sp.fingerprint for n, sp in fingerprint.plan_fingerprints(r.stages).items()}
    heads = recipe.parent / "src" / "my_project" / "heads.py"
    heads.write_text(heads.read_text().replace("nn.Linear(dim, 1)", "nn.Linear(dim, 1, bias=False)"))
    fingerprint._module_digest.cache_clear()
    after = {n: sp.fingerprint for n, sp in fingerprint.plan_fingerprints(r.stages).items()}
    assert {n for n in before if before[n] != after[n]} == {"probe"}


def test_a_kind_from_an_entry_point(tmp_path, monkeypatch):
    """`kind: probe` names an entry point of group baton.stages whose value is the module."""
    from importlib.metadata import EntryPoint

    from stages.recipe import load_recipe

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    ep = EntryPoint("probe", "my_project.stages.probe", "baton.stages")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [ep] if kw == {"group": "baton.stages",
                                                                                      "name": "probe"} else real(**kw))
    recipe = project(tmp_path, {"world": {"kind": "world"}, "bert": {"kind": "bert", "needs": ["world"]},
                                "p": {"kind": "probe", "needs": ["bert"], "upstream": "bert"}}, python_path=["src"])
    assert type(load_recipe(recipe).stages["p"]).__module__ == "my_project.stages.probe"
