"""Stage 1 `cnn` learns: on a small synthetic ImageNet-layout world (colour x shape classes), a short
training run classifies val images well above chance and above the majority class."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages import cnn, kind_module, world
from stages.contract import NullTracker, StageContext, StageResult, seed_stage

# one thread: on a small shared CPU, torch's intra-op threads spin against each other (>10x the CPU time)
RUNTIME = {"device": "cpu", "threads": 1, "log_every": 25, "checkpoint_every": 1000}


def run(name: str, cfg, stage_dir: Path, upstream: dict[str, tuple[StageResult, Path]]) -> tuple[StageResult, NullTracker]:
    ctx = StageContext(name=name, config=cfg, stage_dir=stage_dir, upstream={n: r for n, (r, _) in upstream.items()},
                       upstream_dirs={n: d for n, (_, d) in upstream.items()}, fingerprint="t", tracker=NullTracker())
    seed_stage(cfg)
    return kind_module(cfg.kind).run(ctx), ctx.tracker


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[StageResult, Path]:
    root = tmp_path_factory.mktemp("cnn-world")
    cfg = world.Config(classification={"train": 720, "val": 144, "image_size": 24},
                       scenes={"train": 1, "val": 1, "image_size": 32}, corpus={"documents": 1}, runtime=RUNTIME)
    return run("world", cfg, root / "world", {})[0], root / "world"


def test_cnn_learns_well_above_chance(images, tmp_path):
    cfg = cnn.Config(model={"widths": [8, 16, 16, 32]}, image_size=24, eval_batch_size=144, runtime=RUNTIME,
                     train={"steps": 150, "batch_size": 32, "lr": 1e-2, "warmup_steps": 5})
    res, tracker = run("cnn", cfg, tmp_path / "cnn", {"world": images})
    top1, chance, majority = res.metrics["val/top1"], res.baselines["val/top1_chance"], res.baselines["val/top1_majority"]
    assert chance < 0.05  # many classes: the bar below means something
    assert top1 > max(5 * chance, majority + 0.1), (top1, chance, majority)  # 0.22 when written
    assert res.metrics["val/top5"] > top1
    losses = [m["train/loss"] for _, m in tracker.metrics if "train/loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
