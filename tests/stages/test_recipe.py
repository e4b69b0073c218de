"""Recipe validation: every bad config is refused with a message naming the file and the key."""
from pathlib import Path

import pytest

from flows.cli import main
from stages.recipe import RecipeError, load_recipe

GOOD = """
recipe: t
seed: 3
runtime: {log_every: 7}
stages:
  world: {kind: world}
  cnn:
    kind: cnn
    needs: [world]
    train: {lr: 0.01}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def refused(tmp_path, text, *overrides) -> str:
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, list(overrides))
    assert str(p) in str(e.value)
    return str(e.value)


def test_good_recipe_resolves_defaults_and_order(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert list(r.stages) == ["world", "cnn"]
    assert r.stages["cnn"].seed == 3 and r.stages["cnn"].runtime.log_every == 7
    assert r.stages["cnn"].train.lr == 0.01


def test_override_sets_nested_value(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["stages.cnn.train.lr=3e-4", "stages.cnn.runtime.log_every=2"])
    assert r.stages["cnn"].train.lr == 3e-4 and r.stages["cnn"].runtime.log_every == 2


def test_override_with_wrong_type_or_unknown_key(tmp_path):
    assert "stages.cnn.train.steps" in refused(tmp_path, GOOD, "stages.cnn.train.steps=many")
    assert "stages.cnn.train.nope: unknown key" in refused(tmp_path, GOOD, "stages.cnn.train.nope=1")


def test_upstream_reference_must_be_in_needs(tmp_path):
    text = GOOD.replace("needs: [world]", "needs: []")
    msg = refused(tmp_path, text)
    assert "stages.cnn.data" in msg and "not in stages.cnn.needs" in msg


def test_unknown_kind(tmp_path):
    assert "stages.foo.kind: unknown stage kind" in refused(tmp_path, GOOD + "  foo: {}\n")


def test_runtime_validated(tmp_path):
    assert "runtime.log_every" in refused(tmp_path, GOOD.replace("log_every: 7", "log_every: 0"))


def test_cli_exit_code_and_message(tmp_path, capsys):
    p = write(tmp_path, GOOD.replace("lr: 0.01", "lr: fast"))
    assert main(["--artifacts", str(tmp_path / "a"), "status", str(p)]) == 2
    err = capsys.readouterr().err
    assert "stages.cnn.train.lr" in err and str(p) in err
    assert not (tmp_path / "a").exists(), "a refused recipe must leave nothing behind"


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    r = load_recipe(path)
    assert r.stages


def test_partial_train_block_keeps_stage_defaults(tmp_path):
    from stages.cnn import Config as CnnConfig

    r = load_recipe(write(tmp_path, GOOD))
    default = CnnConfig().train
    assert r.stages["cnn"].train.lr == 0.01
    assert r.stages["cnn"].train.steps == default.steps and r.stages["cnn"].train.batch_size == default.batch_size


def test_validating_and_fingerprinting_a_recipe_does_not_import_torch():
    """Every `baton` command reads the recipe first: that takes a fraction of a second, not the ~8 s of
    importing torch, torchvision and transformers (the stage processes import those)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from stages.recipe import load_recipe\n"
            "from flows.fingerprint import plan_fingerprints\n"
            "import flows.cli, flows.pipeline, flows.store\n"
            "for f in ('configs/vlp-tiny.yaml', 'configs/vlp-base.yaml'):\n"
            "    plan_fingerprints(load_recipe(f).stages)\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]


def test_each_kinds_config_is_the_one_its_module_exposes():
    from stages import KINDS, kind_config, kind_module

    for kind in KINDS:
        assert kind_config(kind) is kind_module(kind).Config, kind
