"""`baton run --dry-run` (flows.plan: why each stale stage is stale) and `--force` (flows.execute._force:
a complete stage reruns into a temp directory that is swapped in only once its result.json exists)."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, baton

from flows.fingerprint import plan_fingerprints
from flows.plan import Change, downstream_of, dry_run, last_complete, payload_changes, render
from flows.store import StageDir
from stages.contract import StageResult
from stages.fsio import pid_alive, temp_path, temps_of
from stages.recipe import load_recipe

CONFIG = str(ROOT / "configs/vlp-micro.yaml")


def payload(**over):
    base = {"kind": "bert", "config": {"train": {"lr": 0.001, "steps": 10}, "model": {"layers": 2}},
            "code": {"stages.bert": "a" * 64, "stages.train.loop": "b" * 64},
            "upstream": {"world": "c" * 64}, "data": {"corpus": {"digest": "d1"}}, "store_format": 1}
    for k, v in over.items():
        base[k] = v
    return base


def test_identical_payloads_have_no_changes():
    assert payload_changes(payload(), payload()) == []


def test_config_change_names_the_dotted_key_with_old_and_new_value():
    new = payload(config={"train": {"lr": 0.003, "steps": 10}, "model": {"layers": 2, "heads": 4}})
    changes = payload_changes(payload(), new)
    assert changes == [Change("config", "model.heads", "<absent>", 4), Change("config", "train.lr", 0.001, 0.003)]
    assert str(changes[1]) == "config train.lr: 0.001 -> 0.003"


def test_code_upstream_and_data_changes_name_module_stage_and_input():
    new = payload(code={"stages.bert": "a" * 64, "stages.train.loop": "e" * 64, "stages.metrics": "f" * 64},
                  upstream={"world": "9" * 64}, data={"corpus": {"digest": "d2"}})
    got = {(c.what, c.key): str(c) for c in payload_changes(payload(), new)}
    assert got == {("code", "stages.metrics"): "code stages.metrics added",
                   ("code", "stages.train.loop"): "code stages.train.loop changed",
                   ("upstream", "world"): f"upstream world changed (fingerprint {'c' * 16} -> {'9' * 16})",
                   ("data", "corpus"): "data input corpus changed"}


def fake_complete(art: Path, stage: str, fp: str, pl: dict, mtime: float | None = None) -> Path:
    sd = StageDir(art, stage, fp)
    sd.write_config(pl, {})
    sd.write_result(StageResult(stage=stage, kind=pl.get("kind", "x"), fingerprint=fp, info={"mlflow_run_id": fp[:8]}))
    if mtime is not None:
        os.utime(sd.path / "result.json", (mtime, mtime))
    return sd.path


@pytest.fixture(scope="module")
def micro():
    recipe = load_recipe(CONFIG)
    return recipe, plan_fingerprints(recipe.stages)


def test_stale_stage_is_diffed_against_the_newest_complete_directory(tmp_path, micro):
    recipe, plans = micro
    bert = plans["bert"]
    older = json.loads(json.dumps(bert.payload))
    older["config"]["train"]["lr"] = 0.5
    newest = json.loads(json.dumps(bert.payload))
    newest["config"]["train"]["lr"] = 0.25
    fake_complete(tmp_path, "bert", "1" * 64, older, mtime=time.time() - 100)
    fake_complete(tmp_path, "bert", "2" * 64, newest, mtime=time.time() - 10)
    running = temp_path(tmp_path / "stages/bert" / ("2" * 16), pid=os.getpid())  # a forced rerun, not swapped in
    shutil.copytree(tmp_path / "stages/bert" / ("2" * 16), running)
    assert last_complete(tmp_path, "bert")[0].name == "2" * 16
    (v,) = dry_run(recipe, tmp_path, plans, {"bert"})
    assert v.state == "stale" and v.runs and v.previous == "2" * 16
    assert v.reasons() == [f"config train.lr: 0.25 -> {bert.payload['config']['train']['lr']}"]


def test_plan_says_cached_never_run_partial_forced_and_upstream_changed(tmp_path, micro):
    recipe, plans = micro
    fake_complete(tmp_path, "world", plans["world"].fingerprint, plans["world"].payload)
    fake_complete(tmp_path, "cnn", plans["cnn"].fingerprint, plans["cnn"].payload)
    old_det = dict(plans["detector"].payload, upstream={**plans["detector"].payload["upstream"], "cnn": "7" * 64})
    fake_complete(tmp_path, "detector", "3" * 64, old_det)
    (StageDir(tmp_path, "bert", plans["bert"].fingerprint).path / "checkpoints" / "00000012").mkdir(parents=True)
    got = {v.name: v for v in dry_run(recipe, tmp_path, plans, set(recipe.stages))}
    assert [got[n].state for n in ("world", "cnn", "detector", "bert", "vl")] == \
        ["cached", "cached", "stale", "partial", "never run"]
    cnn_fp = plans["cnn"].fingerprint[:16]
    assert got["detector"].reasons() == [f"upstream cnn changed (fingerprint {'7' * 16} -> {cnn_fp})"]
    assert got["bert"].reasons() == ["partial at step 12 (resumes)"]
    forced = {v.name: v.state for v in dry_run(recipe, tmp_path, plans, set(recipe.stages), force=["cnn"])}
    assert forced["world"] == "cached" and forced["cnn"] == "forced"
    text = render(list(got.values()))
    assert "5 of 7 stages will run" in text and "never run" in text


def test_force_reaches_every_downstream_stage(micro):
    recipe, _ = micro
    assert downstream_of(recipe, ["vl"]) == {"vl", "caption", "vqa"}
    assert downstream_of(recipe, ["cnn"]) == {"cnn", "detector", "vl", "caption", "vqa"}


# ------------------------------------------------------------------------------------------------ --force


class _Kind:
    """A stage kind that writes one output; ``fail`` makes it die half-way (after writing a file)."""

    def __init__(self):
        self.calls, self.fail = 0, False

    def run(self, ctx):
        self.calls += 1
        out = Path(ctx.stage_dir) / "outputs"
        out.mkdir(parents=True, exist_ok=True)
        (out / "w.txt").write_text(f"call {self.calls}")
        if self.fail:
            raise KeyboardInterrupt("killed during the forced rerun")
        return ctx.result(outputs={"w": "outputs/w.txt"}, metrics={"call": self.calls})


def test_forced_rerun_keeps_the_old_dir_until_done_and_then_swaps_it_in(tmp_path, micro, monkeypatch):
    import flows.execute as ex

    recipe, plans = micro
    kind = _Kind()
    monkeypatch.setattr(ex, "kind_module", lambda _: kind)
    cfg = recipe.stages["world"]
    res, cached = ex.execute_stage("world", cfg, plans, tmp_path, None, "")
    sd = StageDir(tmp_path, "world", plans["world"].fingerprint)
    assert not cached and res["metrics"]["call"] == 1

    kind.fail = True
    with pytest.raises(KeyboardInterrupt):
        ex.execute_stage("world", cfg, plans, tmp_path, None, "", force=True)
    assert sd.result().metrics["call"] == 1 and (sd.path / "outputs/w.txt").read_text() == "call 1"
    (left,) = temps_of(sd.path)  # the dead rerun's temp dir, beside the intact old one
    left.rename(temp_path(sd.path, pid=dead_pid()))  # as if its process had been killed
    res, cached = ex.execute_stage("world", cfg, plans, tmp_path, None, "")  # a plain run: cached, cleans up
    assert cached and res["metrics"]["call"] == 1 and temps_of(sd.path) == []

    kind.fail = False
    res, cached = ex.execute_stage("world", cfg, plans, tmp_path, None, "", force=True)
    assert not cached and res["metrics"]["call"] == 3
    assert sd.result().metrics["call"] == 3 and (sd.path / "outputs/w.txt").read_text() == "call 3"
    assert sorted(p.name for p in sd.path.parent.iterdir()) == [sd.path.name]  # no temp or old dir left
    res, cached = ex.execute_stage("world", cfg, plans, tmp_path, None, "")
    assert cached and kind.calls == 3


def dead_pid() -> int:
    pid = 4_000_000
    while pid_alive(pid):
        pid += 1
    return pid


def test_cli_dry_run_explains_an_override(tmp_path, micro):
    _, plans = micro
    for n, p in plans.items():
        fake_complete(tmp_path, n, p.fingerprint, p.payload)
    lr = plans["bert"].payload["config"]["train"]["lr"]
    p = baton(["run", "--dry-run", CONFIG, "stages.bert.train.lr=0.0123"], tmp_path)
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith("  ")}
    assert all("cached" in lines[n] for n in ("world", "cnn", "detector"))
    assert f"will run: config train.lr: {lr} -> 0.0123" in lines["bert"]
    assert "will run: upstream bert changed" in lines["vl"] and "upstream vl changed" in lines["vqa"]
    assert "4 of 7 stages will run" in p.stdout
    p = baton(["run", "--dry-run", "--json", CONFIG, "--force", "vl"], tmp_path)
    got = {s["name"]: s for s in json.loads(p.stdout)["stages"]}
    assert [n for n, s in got.items() if s["will_run"]] == ["vl", "caption", "vqa"]
    assert got["vl"]["reasons"] == ["--force"] and got["bert"]["state"] == "cached"
    assert not any(StageDir(tmp_path, n, q.fingerprint).path.joinpath(".lock").exists() for n, q in plans.items())
