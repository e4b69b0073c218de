"""Bad recipes refused when the recipe is read (issue 12 items 2, 4, 5, 6): each error names the file
and the key (and the line where YAML knows it), and nothing is created. Fast: load_recipe level, plus
in-process CLI calls that fail before anything starts."""
from __future__ import annotations

import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flows.cli import main
from flows.store import StageDir
from stages import KINDS, kind_config
from stages.recipe import RecipeError, load_recipe

WORLD = "  world: {kind: world}\n"


def write(tmp_path: Path, text: str | bytes) -> Path:
    f = tmp_path / "recipe.yaml"
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    return f


def refused(tmp_path: Path, text: str | bytes, overrides: tuple[str, ...] = ()) -> str:
    f = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(f, overrides)
    msg = str(e.value)
    assert msg.startswith(f"{f}: "), msg
    return msg


# ---------------------------------------------------------------- item 2: stage names are not paths


@pytest.mark.parametrize("name", ["../../../escape", "a/b", "..", "x y", "1cnn", "cnn.v2", "/abs"])
def test_stage_name_must_be_an_identifier(tmp_path, name):
    msg = refused(tmp_path, f"recipe: x\nstages:\n{WORLD}  {name!r}: {{kind: cnn, needs: [world]}}\n")
    assert f"stages.{name}: a stage name is a plain identifier" in msg


def test_stage_name_escape_via_cli_creates_nothing(tmp_path, capsys):
    f = write(tmp_path, f"recipe: x\nstages:\n{WORLD}  '../../../escape': {{kind: cnn, needs: [world]}}\n")
    art = tmp_path / "a" / "b" / "artifacts"
    assert main(["--artifacts", str(art), "run", str(f)]) == 2
    assert "error: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["recipe.yaml"]


def test_store_refuses_a_stage_dir_outside_its_root(tmp_path):
    with pytest.raises(ValueError, match="leaves the artifact store"):
        StageDir(tmp_path / "art", "../../escape", "0" * 64)
    assert StageDir(tmp_path / "art", "cnn_2", "0" * 64).path == tmp_path / "art" / "stages" / "cnn_2" / ("0" * 16)


# ---------------------------------------------------------------- item 4: duplicate keys


def test_duplicate_key_in_a_stage(tmp_path):
    msg = refused(tmp_path, "recipe: x\nstages:\n" + WORLD + "  cnn:\n    kind: cnn\n    needs: [world]\n"
                            "    train: {steps: 5}\n    train: {steps: 7}\n")
    assert "line 8: stages.cnn.train: duplicate key (first at line 7)" in msg


def test_stage_name_used_twice(tmp_path):
    msg = refused(tmp_path, "recipe: x\nstages:\n" + WORLD + "  cnn: {kind: cnn, needs: [world]}\n"
                            "  cnn: {kind: cnn, needs: [world], image_size: 16}\n")
    assert "line 5: stages.cnn: duplicate key (first at line 4)" in msg


def test_duplicate_key_in_a_flow_mapping_and_at_top_level(tmp_path):
    assert "line 1: stages.world.seed: duplicate key" in refused(
        tmp_path, "stages: {world: {kind: world, seed: 1, seed: 2}}\nrecipe: x\n")
    assert "line 3: recipe: duplicate key (first at line 1)" in refused(
        tmp_path, "recipe: x\nstages: {world: {kind: world}}\nrecipe: y\n")


def test_anchors_and_merge_keys_still_work(tmp_path):
    f = write(tmp_path, "recipe: x\nstages:\n  world: {kind: world}\n  cnn: &c {kind: cnn, needs: [world]}\n"
                        "  cnn2:\n    <<: *c\n    image_size: 16\n")
    assert load_recipe(f).stages["cnn2"].image_size == 16


# ---------------------------------------------------------------- item 5: not UTF-8


def test_recipe_not_utf8(tmp_path):
    msg = refused(tmp_path, b"recipe: x\nstages:\n  world: {kind: world}  # caf\xe9\n")
    assert "not UTF-8 text (byte 0xe9 at line 3)" in msg


def test_recipe_not_utf8_via_cli(tmp_path, capsys):
    f = write(tmp_path, "recipe: x\nstages:\n  world: {kind: world}  # café\n".encode("latin-1"))
    art = tmp_path / "artifacts"
    assert main(["--artifacts", str(art), "run", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: not UTF-8 text") and "Traceback" not in err
    assert not art.exists()


# ---------------------------------------------------------------- item 6: ranges


# Numeric fields that may take any value, with the reason. Every other int/float field of every kind's
# Config (nested blocks and list items included) has a bound (ge/gt/le/lt).
UNBOUNDED: dict[str, str] = {}


def _bounded(metadata: list) -> bool:
    flat = []
    for m in metadata:
        flat += m.metadata if isinstance(m, FieldInfo) else [m]
    return any(isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)) for m in flat)


def _numeric_fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield from _walk(f.annotation, list(f.metadata), f"{prefix}{name}")


def _walk(tp, metadata: list, path: str):
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        yield from _walk(base, metadata + meta, path)
    elif origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            yield from _walk(a, metadata, path)
    elif origin in (list, tuple, set):
        for a in typing.get_args(tp):
            yield from _walk(a, [], f"{path}[]")
    elif origin is dict:
        yield from _walk(typing.get_args(tp)[1], [], f"{path}{{}}")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        yield from _numeric_fields(tp, f"{path}.")
    elif tp in (int, float):
        yield path, _bounded(metadata)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_numeric_field_has_a_range(kind):
    fields = list(_numeric_fields(kind_config(kind)))
    assert len(fields) > 5
    unbounded = [p for p, ok in fields if not ok and f"{kind}.{p}" not in UNBOUNDED]
    assert not unbounded, f"{kind}: numeric fields without ge/gt/le/lt: {unbounded}"


# Values that crashed (or trained and then failed) before the ranges existed; each is now refused
# when the recipe is read, naming the key.
CRASHERS = [
    ("cnn", "image_size=0", "stages.cnn.image_size"),                     # PIL ZeroDivisionError
    ("cnn", "eval_batch_size=0", "stages.cnn.eval_batch_size"),           # DataLoader ValueError after training
    ("cnn", "model.arch=alexnet", "image_size=32 is too small"),          # max-pool: output size too small
    ("cnn", "model.widths=[0,8,8,8]", "stages.cnn.model.widths.0"),       # zero-channel convolution
    ("cnn", "model.widths=[8,8]", "stages.cnn.model.widths"),             # StageError when the stage starts
    ("cnn", "model.blocks=[0,1,1,1]", "stages.cnn.model.blocks.0"),       # silently one block
    ("cnn", "train.momentum=-0.5", "stages.cnn.train.momentum"),          # torch.optim.SGD ValueError
    ("cnn", "train.grad_accum=3", "train.batch_size=64 is not divisible by train.grad_accum=3"),
    ("cnn", "seed=1180591620717411303424", "stages.cnn.seed"),            # torch.manual_seed overflow
    ("detector", "model.anchor_sizes=[0,16,32,64]", "stages.detector.model.anchor_sizes.0"),  # zero-area anchors
    ("detector", "model.aspect_ratios=[0.0]", "stages.detector.model.aspect_ratios.0"),       # infinite anchors
    ("detector", "model.returned_layers=[0,2]", "stages.detector.model.returned_layers.0"),
]


@pytest.mark.parametrize("kind, override, expect", CRASHERS)
def test_values_that_crashed_are_refused(tmp_path, kind, override, expect):
    block = {"kind": kind, "needs": ["world"]} | ({"backbone_from": None} if kind == "detector" else {})
    f = write(tmp_path, yaml.safe_dump({"recipe": "x", "stages": {"world": {"kind": "world"}, kind: block}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(f, [f"stages.{kind}.{override}"])
    assert str(e.value).startswith(f"{f}: ") and expect in str(e.value), str(e.value)
