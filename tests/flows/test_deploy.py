"""`baton serve`'s deployments (flows.deploy), without a server: which recipes are served, and the Run form's
parameter schema. The UI and a run from its form: tests/flows/test_ui.py."""
import shutil

import pytest
from conftest import ROOT

from flows.deploy import recipe_deployment, recipe_files
from stages.recipe import RecipeError, load_recipe

CONFIG = ROOT / "configs" / "vlp-micro.yaml"


def test_every_recipe_in_configs_and_each_named_one_is_served_and_a_sweep_file_is_skipped(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(CONFIG, configs)
    (configs / "study.yaml").write_text("sweep: {base: vlp-micro.yaml}\n")  # not a recipe
    mine = tmp_path / "mine.yaml"
    shutil.copy(CONFIG, mine)
    served, skipped = recipe_files([mine], configs)
    assert [p.name for p, _ in served] == ["vlp-micro.yaml", "mine.yaml"]
    assert len(skipped) == 1 and "study.yaml" in skipped[0]


def test_a_bad_named_recipe_or_a_clash_of_deployment_names_is_refused_before_serving(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe_files([tmp_path / "nope.yaml"], ROOT / "configs")
    (tmp_path / "vlp-micro.yaml").write_text(CONFIG.read_text())
    with pytest.raises(RecipeError, match=r"baton/vlp-micro.*rename one"):
        recipe_files([tmp_path / "vlp-micro.yaml"], ROOT / "configs")


def test_the_run_form_has_overrides_only_track_and_the_recipe_frozen(tmp_path):
    from flows.entry import baton_pipeline

    recipe = load_recipe(CONFIG)
    dep = recipe_deployment(baton_pipeline, CONFIG, recipe, tmp_path)
    schema = dep._parameter_openapi_schema.model_dump()
    props = schema["properties"]
    assert list(props) == ["recipe_path", "artifacts", "overrides", "only", "track", "cluster"]  # snapshot, force hidden
    assert props["recipe_path"]["readOnly"] and props["recipe_path"]["enum"] == [str(CONFIG)]
    assert props["artifacts"]["enum"] == [str(tmp_path)]
    assert props["only"]["items"]["enum"] == list(recipe.stages)
    assert props["overrides"]["default"] == [] and props["track"]["default"] is True
    assert dep.parameters == {"recipe_path": str(CONFIG), "artifacts": str(tmp_path), "overrides": [], "only": [],
                              "track": True, "cluster": ""}  # Quick Run: the recipe as shipped, on this machine
    assert props["cluster"]["default"] == "" and "Ray" in props["cluster"]["description"]
    assert dep.enforce_parameter_schema and dep.name == "vlp-micro"
