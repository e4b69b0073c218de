"""ONE contract suite over every stage kind (DESIGN.md "The stage contract", STYLE.md 10).

The micro recipe (configs/vlp-micro.yaml) runs once, stage by stage, by plain Python calls: no Prefect,
no MLflow, a NullTracker per stage. Then, for each kind: the outputs its config declares are the ones its
result names and they exist, result.json round-trips, the training loss went down, and a run killed right
after a checkpoint resumes from it when rerun and ends with the unbroken run's weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stages import KINDS, kind_module
from stages.contract import NullTracker, StageContext, StageResult, seed_stage
from stages.fsio import write_json_atomic
from stages.recipe import Recipe, load_recipe
from stages.train.checkpoint import CheckpointManager, load_weights

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "vlp-micro.yaml"
# one thread: on a small shared CPU, torch's intra-op threads spin against each other (>10x the CPU time)
OVERRIDES = ["runtime.threads=1",
             # the `targets` kind is off the micro recipe (its pipeline tests list its stages): added here, tiny
             "stages.targets.kind=targets", "stages.targets.small_per_class=1", "stages.targets.large_per_class=2",
             "stages.targets.val_per_class=1", "stages.targets.image_size=16"]
TRAINING = [k for k in KINDS if k not in ("world", "targets")]


@dataclass
class Ran:
    ctx: StageContext
    result: StageResult


@dataclass
class Micro:
    recipe: Recipe
    ran: dict[str, Ran]  # by stage name

    def stage_of(self, kind: str) -> str:
        names = [n for n, cfg in self.recipe.stages.items() if cfg.kind == kind]
        assert names, f"{RECIPE.name} has no stage of kind {kind!r}: the contract suite cannot check it"
        return names[0]


def context(micro: Micro, name: str, stage_dir: Path, checkpoints: CheckpointManager | None = None) -> StageContext:
    cfg = micro.recipe.stages[name]
    return StageContext(name=name, config=cfg, stage_dir=stage_dir,
                        upstream={n: micro.ran[n].result for n in cfg.needs},
                        upstream_dirs={n: micro.ran[n].ctx.stage_dir for n in cfg.needs},
                        fingerprint=f"contract-{name}", tracker=NullTracker(), checkpoints=checkpoints)


def run_stage(ctx: StageContext) -> StageResult:
    """What the stage process does around ``run``: seed, run, write result.json last."""
    seed_stage(ctx.config)
    result = kind_module(ctx.config.kind).run(ctx)
    write_json_atomic(ctx.stage_dir / "result.json", result.model_dump(mode="json"))
    return result


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Micro:
    root = tmp_path_factory.mktemp("micro")
    m = Micro(load_recipe(RECIPE, OVERRIDES), {})
    for name in m.recipe.stages:  # topological order
        ctx = context(m, name, root / name)
        m.ran[name] = Ran(ctx, run_stage(ctx))
    return m


def weights(stage_dir: Path, result: StageResult) -> dict[str, torch.Tensor]:
    return load_weights(stage_dir / result.outputs["model"] / "model.safetensors")


def train_losses(tracker: NullTracker) -> list[tuple[int, float]]:
    return [(step, m["train/loss"]) for step, m in tracker.metrics if "train/loss" in m]


def test_the_micro_recipe_has_every_kind():
    kinds = {cfg.kind for cfg in load_recipe(RECIPE, OVERRIDES).stages.values()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_declared_outputs_are_produced_and_exist(micro, kind):
    ran = micro.ran[micro.stage_of(kind)]
    declared = ran.ctx.config.declared_outputs()
    assert declared is not None, f"{kind}: Config.declared_outputs() must name the outputs the stage writes"
    assert set(ran.result.outputs) == declared
    for key, rel in ran.result.outputs.items():
        path = Path(rel) if Path(rel).is_absolute() else ran.ctx.stage_dir / rel
        assert path.exists(), f"{kind}: output {key!r} -> {path} does not exist"


@pytest.mark.parametrize("kind", list(KINDS))
def test_result_json_round_trips(micro, kind):
    ran = micro.ran[micro.stage_of(kind)]
    assert StageResult.model_validate_json((ran.ctx.stage_dir / "result.json").read_text()) == ran.result
    assert StageResult.model_validate_json(ran.result.model_dump_json()) == ran.result
    assert ran.result.kind == kind and ran.result.stage == micro.stage_of(kind)
    assert ran.result.metrics, f"{kind}: a result reports metrics"


@pytest.mark.parametrize("kind", TRAINING)
def test_the_training_loss_went_down(micro, kind):
    losses = train_losses(micro.ran[micro.stage_of(kind)].ctx.tracker)
    assert len(losses) >= 2, f"{kind}: train/loss logged {len(losses)} times"
    (_, first), (_, last) = losses[0], losses[-1]
    assert last < first, f"{kind}: train/loss {first:.4f} -> {last:.4f}"


class Killed(BaseException):
    """Not an Exception: nothing in the stage may catch it, like a SIGKILL."""


class KillAfter(CheckpointManager):
    """Kills the stage right after it wrote the checkpoint of step ``at``."""

    def __init__(self, root: Path, keep: int, at: int):
        super().__init__(root, keep)
        self.at = at

    def save(self, step, model_state, train_state):
        path = super().save(step, model_state, train_state)
        if step == self.at:
            raise Killed(step)
        return path


@pytest.mark.parametrize("kind", TRAINING)
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_like_the_unbroken_run(micro, kind, tmp_path):
    name = micro.stage_of(kind)
    cfg, unbroken = micro.recipe.stages[name], micro.ran[name]
    at = cfg.runtime.checkpoint_every
    assert at < cfg.train.steps, f"{kind}: no checkpoint before the last step"
    stage_dir = tmp_path / name

    with pytest.raises(Killed):
        run_stage(context(micro, name, stage_dir, KillAfter(stage_dir / "checkpoints", cfg.runtime.keep_checkpoints, at)))
    assert not (stage_dir / "result.json").exists()

    ctx = context(micro, name, stage_dir)
    result = run_stage(ctx)
    assert result.info["resumed_from"] == at
    assert min(step for step, _ in train_losses(ctx.tracker)) > at, "the resumed run trained the first steps again"
    assert train_losses(ctx.tracker) == [(s, v) for s, v in train_losses(unbroken.ctx.tracker) if s > at], \
        f"{kind}: the resumed run's train/loss history differs from the unbroken run's after step {at}"
    want, got = weights(unbroken.ctx.stage_dir, unbroken.result), weights(stage_dir, result)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{kind}: resumed weights differ from the unbroken run's: {differ[:5]}"
