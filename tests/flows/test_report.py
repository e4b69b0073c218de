"""flows.report on a store written by hand (no training): the statistics, the scatter's Pearson r and its
interval, the verdicts, n per group, and a stage that is not complete listed as missing (never run)."""
import json
import math

import pytest

from flows.report import make_report, pearson
from flows.store import StageDir
from stages.contract import StageResult


def test_pearson_and_its_fisher_interval_match_the_hand_computation():
    r, lo, hi = pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r == pytest.approx(0.8)
    z, half = math.atanh(0.8), 1.959964 / math.sqrt(2)
    assert (lo, hi) == (pytest.approx(math.tanh(z - half)), pytest.approx(math.tanh(z + half)))
    assert (round(lo, 3), round(hi, 3)) == (-0.28, 0.986)
    assert pearson([1, 2, 3], [1, 2, 4])[1:] == (None, None)  # n <= 3: no interval


def _member(art, name, variant, seed, x, y):
    fps = {"cnn": f"{name}-cnn".ljust(64, "0"), "detector": f"{name}-det".ljust(64, "0")}
    for stage, metric, v in (("cnn", "val/top1", x), ("detector", "val/map50", y)):
        if v is not None:
            sd = StageDir(art, stage, fps[stage])
            sd.path.mkdir(parents=True)
            sd.write_result(StageResult(stage=stage, kind=stage, fingerprint=fps[stage], metrics={metric: v}))
    return {"name": name, "variant": variant, "seed": seed, "overrides": [], "stages": ["cnn", "detector"],
            "fingerprints": fps}


def test_scatter_report_numbers_verdicts_and_missing(tmp_path):
    art = tmp_path / "art"
    pts = {"a": [(0.1, 0.20), (0.12, 0.25), (0.11, 0.22)], "b": [(0.5, 0.40), (0.55, 0.45), (0.52, None)]}
    members = [_member(art, f"{v}@s{i}", v, i, x, y) for v, xy in pts.items() for i, (x, y) in enumerate(xy)]
    record = {"sweep": "toy", "recipe": "r.yaml", "recipe_name": "r", "swept_stages": ["cnn"],
              "seeded_stages": ["cnn", "detector"], "members": members, "spec": {"only": ["detector"], "report": {
                  "kind": "scatter", "x": "cnn/val/top1", "y": "detector/val/map50", "expect": [
                      {"r_above": 0}, {"metric": "detector/val/map50", "better": "b", "than": "a"}],
                  "ceiling": {"detector/val/map50": 0.44}}}}
    (art / "sweeps").mkdir(parents=True)
    (art / "sweeps" / "toy.json").write_text(json.dumps(record))
    rep = make_report(art, "toy", publish=False)
    y = rep.numbers["metrics"]["detector/val/map50"]
    assert y["a"]["n"] == 3 and y["b"]["n"] == 2 and y["b"]["mean"] == pytest.approx(0.425)
    assert y["a"]["sd"] == pytest.approx(0.025166, abs=1e-5)
    corr = rep.numbers["correlation"]
    xs = [0.1, 0.12, 0.11, 0.5, 0.55]
    ys = [0.20, 0.25, 0.22, 0.40, 0.45]
    assert corr["n"] == 5 and corr["r"] == pytest.approx(pearson(xs, ys)[0]) and corr["r"] > 0.9
    assert [v["held"] for v in rep.verdicts] == [True, True]
    assert rep.verdicts[1]["diff"] == pytest.approx(0.425 - 0.22333, abs=1e-4)
    assert rep.missing == ["b@s2: detector (" + "b@s2-det".ljust(16, "0") + ")"]
    assert "NEAR the ceiling" in rep.numbers["ceilings"][0]
    html = rep.index.read_text()
    assert "scatter.png" in html and "bars.png" in html and "Pearson r = " in html and "<th>n</th>" in html
    assert (rep.dir / "scatter.png").stat().st_size > 5000


def test_gc_keeps_the_stage_dirs_of_a_recorded_sweep(tmp_path):
    from flows.gc import find_garbage

    art = tmp_path / "art"
    members = [_member(art, "a@s0", "a", 0, 0.1, 0.2)]
    (art / "sweeps").mkdir(parents=True)
    (art / "sweeps" / "toy.json").write_text(json.dumps({"sweep": "toy", "members": members}))
    assert find_garbage(art, [], keep_days=-1, mlflow=False) == []
    (art / "sweeps" / "toy.json").unlink()
    assert {g.path.parent.name for g in find_garbage(art, [], keep_days=-1, mlflow=False)} == {"cnn", "detector"}
