"""Bad input: each gets a clear message naming the file, record or key, a non-zero exit, and nothing
half-written (no result.json for the stage that failed, no temp leftovers, earlier checkpoints intact).

Recipe errors are checked in-process (``flows.cli.main``: they fail before Prefect starts). Data errors
go through the real CLI in a subprocess: a recipe whose ``world`` stage points (``source: real``) at a
copy of a small synthetic world with one thing broken, and only the stages needed to reach it."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from stages.fsio import is_temp_name
from tools.faults import check_consistency

ROOT = Path(__file__).resolve().parents[2]

CNN = {"kind": "cnn", "needs": ["world"], "model": {"widths": [8, 8, 8, 8]}, "train": {"steps": 2, "batch_size": 8}}
DETECTOR = {"kind": "detector", "needs": ["world"], "backbone_from": None,
            "train": {"steps": 1, "batch_size": 4}, "regions": {"k": 4}}
BERT = {"kind": "bert", "needs": ["world"], "train": {"steps": 1, "batch_size": 4}}
VL = {"kind": "vl", "needs": ["world", "detector", "bert"], "train": {"steps": 1, "batch_size": 4}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small synthetic world in the real formats (ImageNet folders, VG, corpus, COCO, VQA)."""
    from stages.config.world import Config
    from stages.data.synthetic import generate

    out = tmp_path_factory.mktemp("world") / "data"
    cfg = Config.model_validate({"classification": {"train": 72, "val": 36}, "scenes": {"train": 12, "val": 6},
                                 "corpus": {"documents": 20}})
    generate(out, cfg, 0)
    return out


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect")  # one embedded Prefect database for all runs: migrated once


def copy_world(world: Path, dest: Path, *parts: str) -> dict[str, str]:
    """Copy the named datasets (imagenet, vg, corpus, coco, vqa) to ``dest``: {name: path}."""
    paths = {}
    for p in parts:
        shutil.copytree(world / p, dest / p)
        paths[p] = str(dest / p)
    return paths


def recipe(tmp: Path, stages: dict, name: str = "bad-input") -> Path:
    f = tmp / "recipe.yaml"
    f.write_text(yaml.safe_dump({"recipe": name, "runtime": {"device": "cpu", "checkpoint_every": 1},
                                 "stages": stages}, sort_keys=False))
    return f


def run(args: list[str], art: Path, prefect_home: Path, env: dict | None = None,
        timeout: int = 600) -> tuple[int, str]:
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(prefect_home)} \
        | (env or {})
    p = subprocess.run([sys.executable, "-m", "flows.cli"] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr + p.stdout


def last_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert lines, out[-3000:]
    return lines[-1]


def stage_dir(art: Path, stage: str) -> Path:
    dirs = [d for d in (art / "stages" / stage).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_nothing_half_written(art: Path, failed: str, complete: tuple[str, ...] = ("world",)) -> None:
    """The failed stage has no result.json and no temp leftovers; the upstream stages are complete."""
    if (art / "stages" / failed).exists():
        d = stage_dir(art, failed)
        assert not (d / "result.json").exists()
        assert not [p for p in d.rglob("*") if is_temp_name(p.name)]
    for s in complete:
        assert (stage_dir(art, s) / "result.json").exists(), s
    assert check_consistency(art) == []


# ----------------------------------------------------------------------------------------------
# the recipe (in-process: these fail before anything starts)


def cli(tmp_path, capsys, text: str) -> tuple[int, str, Path, Path]:
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    art = tmp_path / "artifacts"
    code = main(["--artifacts", str(art), "run", str(f)])
    return code, capsys.readouterr().err, f, art


def test_malformed_yaml(tmp_path, capsys):
    code, err, f, art = cli(tmp_path, capsys, "recipe: x\nstages:\n  world: {kind: world\n  cnn: [\n")
    assert code == 2
    assert f"error: {f}: malformed YAML at line 4" in err
    assert not art.exists()


def test_unknown_key(tmp_path, capsys):
    code, err, f, art = cli(tmp_path, capsys, "recipe: x\nstages:\n  world: {kind: world}\n"
                                              "  cnn: {kind: cnn, needs: [world], train: {lrr: 0.1}}\n")
    assert code == 2
    assert f"error: {f}: stages.cnn.train.lrr: unknown key" in err
    assert not art.exists()


def test_wrong_type(tmp_path, capsys):
    code, err, f, art = cli(tmp_path, capsys, "recipe: x\nstages:\n  world: {kind: world}\n"
                                              "  cnn: {kind: cnn, needs: [world], train: {steps: ten}}\n")
    assert code == 2
    assert f"{f}: stages.cnn.train.steps: Input should be a valid integer" in err and "(got 'ten')" in err
    assert not art.exists()


def test_unknown_stage_in_needs(tmp_path, capsys):
    code, err, f, art = cli(tmp_path, capsys, "recipe: x\nstages:\n  world: {kind: world}\n"
                                              "  cnn: {kind: cnn, needs: [wrld]}\n")
    assert code == 2
    assert f"error: {f}: stages.cnn.needs[0]: unknown stage 'wrld' (stages: world, cnn)" in err
    assert not art.exists()


def test_dependency_cycle(tmp_path, capsys):
    code, err, f, art = cli(tmp_path, capsys, "recipe: x\nstages:\n  a: {kind: world, needs: [c]}\n"
                                              "  b: {kind: world, needs: [a]}\n  c: {kind: world, needs: [b]}\n")
    assert code == 2
    assert f"error: {f}: stages.a.needs: dependency cycle a -> c -> b -> a" in err
    assert not art.exists()


def _unwritable_dir(tmp_path: Path) -> Path:
    """An artifacts path this process cannot create files in. chmod 555 does not stop root (CI runs as
    root): then use a path below a regular file, which nobody can create."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("")
    except OSError:
        return d / "artifacts"
    (d / "probe").unlink()
    d.chmod(0o755)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "artifacts"


def test_unwritable_artifacts_dir(tmp_path, capsys):
    f = tmp_path / "recipe.yaml"
    f.write_text("recipe: x\nstages:\n  world: {kind: world}\n")
    art = _unwritable_dir(tmp_path)
    code = main(["--artifacts", str(art), "run", str(f)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: artifacts directory {art} is not writable" in err
    assert not art.exists()


# ----------------------------------------------------------------------------------------------
# the data (subprocess: the real CLI, Prefect, the stages)


def test_missing_dataset_path(tmp_path, prefect_home):
    missing = tmp_path / "no-such-imagenet"
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": {"imagenet": str(missing)}},
                          "cnn": CNN})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    err = last_error(out)
    assert "paths.imagenet" in err and str(missing) in err and "does not exist" in err
    assert_nothing_half_written(art, "world", complete=())
    assert not (art / "stages" / "cnn").exists()


def test_corrupt_image(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "imagenet")
    bad = sorted((tmp_path / "data" / "imagenet" / "train" / "n00000003").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:300])  # a JPEG cut off after its headers
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths}, "cnn": CNN})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    assert last_error(out).startswith(f"error: {bad}: cannot read image")
    assert_nothing_half_written(art, "cnn")
    assert not (stage_dir(art, "cnn") / "checkpoints").exists()


def test_json_record_missing_a_key(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "vg")
    objects = tmp_path / "data" / "vg" / "objects.json"
    recs = json.loads(objects.read_text())
    image_id = recs[3]["image_id"]
    del recs[3]["objects"]
    objects.write_text(json.dumps(recs))
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths}, "detector": DETECTOR})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    assert last_error(out) == f"error: {objects}: record 3 (image_id {image_id}): missing key 'objects'"
    assert_nothing_half_written(art, "detector")


def test_empty_dataset(tmp_path, world, prefect_home):
    """(also: a data error is final: `retries: 2` does not retry it)"""
    paths = copy_world(world, tmp_path / "data", "corpus")
    train = tmp_path / "data" / "corpus" / "train.txt"
    train.write_text("\n\n")
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths}, "bert": BERT})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "retries=2", "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    assert last_error(out) == f"error: {train}: empty corpus (no documents in 1 .txt file(s))"
    assert "Retry 1/2" not in out and "Retries are exhausted" not in out, out[-3000:]
    assert_nothing_half_written(art, "bert")


def test_box_outside_the_image(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "vg")
    vg = tmp_path / "data" / "vg"
    objects = vg / "objects.json"
    recs = json.loads(objects.read_text())
    width = {r["image_id"]: r["width"] for r in json.loads((vg / "image_data.json").read_text())}
    rec = recs[2]
    obj = rec["objects"][0]
    obj["x"] = width[rec["image_id"]] + 10  # entirely right of the image
    objects.write_text(json.dumps(recs))
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths}, "detector": DETECTOR})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    err = last_error(out)
    assert str(objects) in err and "record 2" in err and f"object_id {obj['object_id']}" in err
    assert_nothing_half_written(art, "detector")


def test_empty_caption(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "vg", "corpus", "coco")
    caps = tmp_path / "data" / "coco" / "captions_train.json"
    data = json.loads(caps.read_text())
    data["annotations"][5]["caption"] = "   "
    ann_id = data["annotations"][5]["id"]
    caps.write_text(json.dumps(data))
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths}, "detector": DETECTOR,
                          "bert": BERT, "vl": VL})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    assert last_error(out) == f"error: {caps}: annotation id {ann_id} (annotations[5]): empty caption"
    assert_nothing_half_written(art, "vl", complete=("world", "detector", "bert"))


def _cnn_weights(path: Path, widths: list[int], classes: int = 36) -> None:
    from stages.config.cnn import ModelConfig
    from stages.models.resnet import build_classifier
    from stages.train.checkpoint import save_weights

    save_weights(build_classifier(ModelConfig(widths=widths), classes).state_dict(), path)


def test_checkpoint_from_another_architecture(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "imagenet")
    init = tmp_path / "wide.safetensors"
    _cnn_weights(init, [16, 16, 16, 16])  # the recipe's cnn has widths [8, 8, 8, 8]
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths},
                          "cnn": CNN | {"model": {"widths": [8, 8, 8, 8], "init": str(init)}}})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    err = last_error(out)
    assert f"weights from {init} do not fit the model" in err
    assert "conv1.weight: checkpoint (16, 3, 3, 3) vs model (8, 3, 3, 3)" in err  # names the tensors and shapes
    assert_nothing_half_written(art, "cnn")


def test_truncated_safetensors(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "imagenet")
    init = tmp_path / "cut.safetensors"
    _cnn_weights(init, [8, 8, 8, 8])
    init.write_bytes(init.read_bytes()[: init.stat().st_size // 2])
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths},
                          "cnn": CNN | {"model": {"widths": [8, 8, 8, 8], "init": str(init)}}})
    art = tmp_path / "artifacts"
    code, out = run(["run", str(f), "--no-track"], art, prefect_home)
    assert code == 1, out[-3000:]
    err = last_error(out)
    assert err.startswith(f"error: cannot read weights {init}:") and "truncated" in err
    assert_nothing_half_written(art, "cnn")


DISK_FULL = """
# sitecustomize: in whichever process imports stages.train.checkpoint (the CLI, or the stage's own process),
# its N-th safetensors write runs out of space halfway
import errno, importlib.abc, importlib.util, os, sys

AT = int(os.environ["BATON_FAKE_ENOSPC_AT"])


class _DiskFull(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != "stages.train.checkpoint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.inner.exec_module(module)
        real, calls = module.save_file, []

        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == AT:
                with open(filename, "wb") as f:
                    f.write(bytes(1000))
                raise OSError(errno.ENOSPC, "No space left on device", filename)
            return real(tensors, filename, metadata=metadata)

        module.save_file = save_file


if AT:
    sys.meta_path.insert(0, _DiskFull())
"""


def test_disk_full_during_a_checkpoint_write(tmp_path, world, prefect_home):
    paths = copy_world(world, tmp_path / "data", "imagenet")
    f = recipe(tmp_path, {"world": {"kind": "world", "source": "real", "paths": paths},
                          "cnn": CNN | {"train": {"steps": 4, "batch_size": 8}}})
    art = tmp_path / "artifacts"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DISK_FULL)
    env = {"PYTHONPATH": str(site), "BATON_FAKE_ENOSPC_AT": "2"}
    code, out = run(["run", str(f), "--no-track"], art, prefect_home, env=env)
    assert code == 1, out[-3000:]
    d = stage_dir(art, "cnn")
    assert (f"[Errno {errno.ENOSPC}] cannot write checkpoint step 2 into {d / 'checkpoints'}: "
            "No space left on device (kept: steps [1])") in out, out[-3000:]
    from stages.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(d / "checkpoints")
    assert mgr.steps() == [1]
    assert mgr.verify(d / "checkpoints" / "00000001") is None  # the previous checkpoint is intact
    assert mgr.latest().step == 1
    assert_nothing_half_written(art, "cnn")  # the half-written .tmp-00000002-<pid> dir is gone

    code, out = run(["run", str(f), "--no-track"], art, prefect_home)  # space again: resumes from step 1
    assert code == 0, out[-3000:]
    assert "[cnn] resumed from checkpoint at step 1/4" in out
    assert (d / "result.json").exists()
