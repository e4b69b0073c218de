"""The whole-stage items of tools/bench_gpu.py: the synthetic world, each training stage with its real loader
(flows.execute.execute_stage into an artifact store, no tracking), a CUDA stage forked from the fork server
(flows.worker: needs neither prefect nor mlflow without a parent run), and a kill/resume through
``python -m stages``. The recipe is configs/vlp-micro.yaml with overrides: base sizes on a GPU, micro on the CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flows.execute import execute_stage
from flows.fingerprint import StagePlan, plan_fingerprints
from flows.store import StageDir
from stages.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vlp-micro.yaml"

# base sizes (ResNet-50 224 px, Faster R-CNN R50-FPN 800 px, BERT-base len 128, VLP base K=100), few steps
BASE = [
    "runtime.device=cuda", "runtime.precision=bf16", "runtime.threads=8", "runtime.log_every=10",
    "runtime.checkpoint_every=1000",
    "stages.world.classification={train: 1024, val: 128, image_size: 224}",
    "stages.world.scenes={train: 64, val: 16, image_size: 800, max_objects: 8}",
    "stages.world.corpus={documents: 3000}",
    "stages.cnn.model={arch: resnet50, stem: imagenet}", "stages.cnn.image_size=224",
    "stages.cnn.runtime={channels_last: true}",
    "stages.cnn.train={steps: 30, batch_size: 256, lr: 0.1, optimizer: sgd, weight_decay: 0, grad_clip: null}",
    "stages.detector.model={returned_layers: [1, 2, 3, 4], fpn_channels: 256, anchor_sizes: [32, 64, 128, 256, 512], "
    "min_size: 800, max_size: 1333, representation_size: 1024, rpn_pre_nms_top_n: 2000, rpn_post_nms_top_n: 2000, "
    "rpn_batch_size_per_image: 256, box_batch_size_per_image: 512, attributes: {enabled: true, num_attributes_k: 8}}",
    "stages.detector.train={steps: 16, batch_size: 8, lr: 0.01, optimizer: sgd, weight_decay: 0, grad_clip: null}",
    "stages.detector.regions={k: 100, score_thresh: 0.0}",
    "stages.bert.model={hidden_size: 768, num_layers: 12, num_heads: 12, intermediate_size: 3072, max_position: 512}",
    "stages.bert.seq_len=128",
    "stages.bert.train={steps: 30, batch_size: 256, lr: 0.0001, grad_clip: null}",
    "stages.vl.max_caption_len=20",
    "stages.vl.train={steps: 20, batch_size: 256, lr: 0.0001, grad_clip: null}",
]
SMOKE = ["runtime.device=cpu", "runtime.log_every=2", "runtime.checkpoint_every=1000",
         "stages.cnn.train.steps=4", "stages.detector.train.steps=2", "stages.bert.train.steps=4",
         "stages.vl.train.steps=4"]
# the small cnn of the fork-server and kill/resume items (micro widths, 32 px), on the bench's world
SMALL_CNN = ["stages.cnn.model={widths: [8, 16, 16, 32]}", "stages.cnn.image_size=32", "stages.cnn.runtime={}",
             "stages.cnn.train={steps: 300, batch_size: 32, lr: 0.003}", "runtime.checkpoint_every=10"]


@dataclass
class Bench:
    recipe: Recipe
    plans: dict[str, StagePlan]
    artifacts: Path
    overrides: list[str]


def bench_recipe(smoke: bool, artifacts: Path, extra: list[str] = ()) -> Bench:
    overrides = (SMOKE if smoke else BASE) + list(extra)
    recipe = load_recipe(CONFIG, overrides)
    return Bench(recipe, plan_fingerprints(recipe.stages), artifacts, overrides)


def _run(b: Bench, name: str) -> tuple[dict, float]:
    t = time.perf_counter()
    res, _ = execute_stage(name, b.recipe.stages[name], b.plans, b.artifacts, None, "")
    return res, time.perf_counter() - t


def world_item(b: Bench) -> dict:
    res, secs = _run(b, "world")
    w = b.recipe.stages["world"]
    return {"seconds": round(secs, 1), "classification_images": w.classification.train + w.classification.val,
            "classification_px": w.classification.image_size, "scenes": w.scenes.train + w.scenes.val,
            "scenes_px": w.scenes.image_size, "corpus_documents": w.corpus.documents}


def stage_item(b: Bench, kind: str) -> dict:
    """One training stage, whole: examples/s of its training (steps x batch / train_seconds)."""
    cfg = b.recipe.stages[kind]
    res, secs = _run(b, kind)
    info = res["info"]
    t = cfg.train
    return {"examples_per_s": round(t.steps * t.batch_size / info["train_seconds"], 1), "steps": t.steps,
            "batch": t.batch_size, "train_seconds": round(info["train_seconds"], 2), "stage_s": round(secs, 1),
            "metrics": {k: round(v, 4) for k, v in list(res["metrics"].items())[:4]}}


def forkserver_item(b: Bench, smoke: bool) -> dict:
    """The small cnn on the bench's device, as ``baton run`` starts a stage: forked from the fork server."""
    from flows.worker import launch_worker, prewarm_workers, write_snapshot

    small = bench_recipe(smoke, b.artifacts, SMALL_CNN + ["stages.cnn.seed=1", f"stages.cnn.train.steps={10 if smoke else 60}"])
    os.environ.pop("BATON_WORKER_START", None)
    t = time.perf_counter()
    prewarm_workers(["cnn"])
    snapshot = write_snapshot(small.artifacts, small.recipe, small.plans)
    rc, tail = launch_worker("cnn", snapshot, small.artifacts, "", 4)
    secs = time.perf_counter() - t
    res = StageDir(small.artifacts, "cnn", small.plans["cnn"].fingerprint).result()
    out = {"exit_status": rc, "seconds": round(secs, 1), "completed": res is not None,
           "device": small.recipe.stages["cnn"].runtime.device}
    if res is not None:
        out["val_top1"] = round(res.metrics.get("val/top1", float("nan")), 4)
    else:
        out["tail"] = tail[-5:]
    return out


def _stages_cmd(b: Bench, out: Path, world: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "stages", str(CONFIG), "cnn", "--out", str(out), "--upstream", f"world={world}",
            *b.overrides, *overrides]


def kill_resume_item(b: Bench, smoke: bool, work: Path) -> dict:
    """``python -m stages`` cnn, SIGKILLed once its first checkpoint (step 10) is on disk, then run again: the
    rerun must resume from that checkpoint (resumed_from > 0) and finish."""
    world = StageDir(b.artifacts, "world", b.plans["world"].fingerprint).path
    out = work / "kill-resume-cnn"
    extra = SMALL_CNN + ["stages.cnn.seed=2"] + (["stages.cnn.train.steps=30"] if smoke else [])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    p = subprocess.Popen(_stages_cmd(b, out, world, extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    killed_at = None
    while p.poll() is None and time.perf_counter() - t < 300:
        ckpts = sorted((out / "checkpoints").glob("0*")) if (out / "checkpoints").exists() else []
        if ckpts:
            killed_at = int(ckpts[-1].name)
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    first = p.communicate()[0].decode(errors="replace")
    if killed_at is None:
        return {"error": f"not killed: the first run ended (status {p.returncode}) before a checkpoint appeared",
                "tail": first[-800:]}
    again = subprocess.run(_stages_cmd(b, out, world, extra), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    if again.returncode != 0:
        return {"error": f"rerun failed with status {again.returncode}", "tail": (again.stdout + again.stderr)[-800:]}
    info = json.loads(again.stdout[again.stdout.index("{"):])["info"]
    return {"killed_after_checkpoint": killed_at, "resumed_from": info["resumed_from"],
            "resumed": info["resumed_from"] > 0, "seconds": round(time.perf_counter() - t, 1),
            "device": b.recipe.stages["cnn"].runtime.device}
