"""Small fake artifact stores on disk, laid out exactly as flows.store writes them (no training)."""
from __future__ import annotations

import os
from pathlib import Path

from flows.fingerprint import plan_fingerprints
from flows.store import StageDir
from stages.contract import StageResult
from stages.recipe import Recipe


def fake_stage(art: Path, stage: str, fp: str, upstream: dict[str, str], kind: str | None = None,
               complete: bool = True, checkpoint_steps: tuple[int, ...] = (), run_id: str | None = None,
               model_id: str | None = None, metrics: dict[str, float] | None = None,
               age_days: float = 0.0) -> StageDir:
    """A stage dir with config.json (+ run.json, checkpoints/<step>/, outputs/, result.json as asked),
    its files' mtimes ``age_days`` in the past."""
    sd = StageDir(art, stage, fp)
    payload = {"kind": kind or stage, "config": {}, "code": {}, "upstream": upstream, "data": {}, "store_format": 1}
    sd.write_config(payload, {"kind": kind or stage})
    if run_id:
        sd.save_run_id(run_id)
    for step in checkpoint_steps:
        d = sd.path / "checkpoints" / f"{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    if complete:
        (sd.path / "outputs").mkdir(exist_ok=True)
        (sd.path / "outputs" / "model.bin").write_bytes(b"w" * 100)
        info = {"mlflow_run_id": run_id} if run_id else {}
        if model_id:
            info["mlflow_model_id"] = model_id
        sd.write_result(StageResult(stage=stage, kind=kind or stage, outputs={"model": "outputs/model.bin"}, metrics=metrics or {"loss": 1.0},
                                    fingerprint=fp, info=info))
    age(sd.path, age_days)
    return sd


def age(path: Path, days: float) -> None:
    """Set the mtimes of ``path`` and everything under it ``days`` into the past."""
    t = os.stat(path).st_mtime - days * 86400
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (t, t))
    os.utime(path, (t, t))


def fake_recipe_store(art: Path, recipe: Recipe, upto: list[str], age_days: float = 0.0,
                      **kw) -> dict[str, StageDir]:
    """The recipe's planned stage dirs for the stages in ``upto``, complete unless ``kw`` says otherwise."""
    fps = plan_fingerprints(recipe.stages)
    return {name: fake_stage(art, name, p.fingerprint, dict(p.payload["upstream"]), kind=p.kind,
                             age_days=age_days, **({"run_id": f"run-{name}", "model_id": f"m-{name}"} | kw))
            for name, p in fps.items() if name in upto}
