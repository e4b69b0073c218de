"""`baton advise` end to end on the micro recipe's cnn: a store holding the recipe's planned world and cnn
stage dirs (made by the stage code, laid out as flows.execute writes them), two target sets from the
`targets` kind, and the real CLI: it places them, prints its numbers, and refuses bad input by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.advise import advise as run_advise
from flows.advise import render
from flows.fingerprint import plan_fingerprints
from flows.store import StageDir
from stages import kind_module, targets
from stages.contract import NullTracker, StageContext, seed_stage
from stages.recipe import load_recipe
from tests.conftest import baton

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "vlp-micro.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    """(artifacts with the micro recipe's world + cnn complete, a targets stage dir)."""
    art = tmp_path_factory.mktemp("advise-art")
    recipe = load_recipe(MICRO, ["runtime.threads=1"])
    plans = plan_fingerprints(recipe.stages)
    dirs: dict[str, Path] = {}
    results = {}
    for name in ("world", "cnn"):
        cfg, sd = recipe.stages[name], StageDir(art, name, plans[name].fingerprint)
        sd.write_config(plans[name].payload, cfg.model_dump(mode="json"))
        ctx = StageContext(name=name, config=cfg, stage_dir=sd.path, upstream={n: results[n] for n in cfg.needs},
                           upstream_dirs={n: dirs[n] for n in cfg.needs}, fingerprint=sd.fingerprint,
                           tracker=NullTracker())
        seed_stage(cfg)
        results[name] = kind_module(cfg.kind).run(ctx)
        sd.write_result(results[name])
        dirs[name] = sd.path
    tdir = art / "targets"
    cfg = targets.Config(small_per_class=4, large_per_class=60, val_per_class=1, runtime={"threads": 1})
    targets.run(StageContext(name="targets", config=cfg, stage_dir=tdir, upstream={}, upstream_dirs={},
                             fingerprint="t", tracker=NullTracker()))
    return art, tdir / "outputs"


def advise(art: Path, *args: str, check: bool = True):
    return baton(["advise", "--from", "cnn", "--recipe", str(MICRO), *args], art, timeout=300, check=check)


def test_advise_places_targets_and_prints_its_numbers(store):
    art, out = store
    small = json.loads(advise(art, "--target", str(out / "different_small"), "--json").stdout)
    assert small["images"] == 8 * 4 and small["classes"] == 8 and small["size"] == "small"
    assert small["source"]["heldout_images"] == 36  # the micro world's val split
    assert small["domain"] == "different" and small["domain_distance"]["ratio"] > 2.0
    assert small["recommendation"]["strategy"] == "lp_ft" and "risky corner" in small["recommendation"]["warning"]
    assert small["logme"] < 0  # an evidence per sample of one-hot columns: finite, negative for weak features
    assert "quadrant: different & small" in render(small) and "WARNING: risky corner" in render(small)
    # the same code in-process (one CLI start is enough): the world's rendering sits closer than textures
    large = run_advise(art, "cnn", out / "similar_large", load_recipe(MICRO))
    assert large["size"] == "large" and large["per_class"] == {"min": 60.0, "median": 60.0, "max": 60.0}
    assert large["quadrant"] == "similar & large" and large["recommendation"]["strategy"] == "finetune"
    assert large["domain_distance"]["ratio"] < small["domain_distance"]["ratio"]
    text = render(large)
    assert "60 images per class (median; min 60, max 60)  -> large" in text and "recommend: finetune" in text
    assert "WARNING" not in text and "LogME" in text


def test_advise_refuses_bad_input_by_name(store):
    art, out = store
    p = advise(art, "--target", str(out / "nope"), check=False)
    assert p.returncode == 2 and "advise --target" in p.stderr and "nope" in p.stderr
    p = baton(["advise", "--from", "detector", "--recipe", str(MICRO), "--target", str(out / "similar_small")],
              art, check=False)
    assert p.returncode == 2 and "detector" in p.stderr, p.stderr
