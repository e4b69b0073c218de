"""flows.gc: nothing referenced, recent or locked is ever removed; the rest goes, atomically."""
import os
import shutil
import threading
import time

import pytest
from fakestore import fake_recipe_store, fake_stage

from flows.gc import collect, du, find_garbage
from flows.store import StageDir
from stages.recipe import load_recipe


@pytest.fixture(scope="module")
def micro(root):
    return load_recipe(root / "configs" / "vlp-micro.yaml")


def _paths(garbage):
    return {(g.what, g.path) for g in garbage}


def test_old_unreferenced_dir_goes_and_frees_its_bytes(tmp_path, micro):
    old = fake_stage(tmp_path, "world", "a" * 64, {}, checkpoint_steps=(5,), age_days=30)
    size = du(old.path)
    assert size > 1000
    removed, freed = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert _paths(removed) == {("stage dir", old.path)} and freed == size
    assert not old.path.exists() and os.listdir(old.path.parent) == []  # no temp name left behind


def test_referenced_dir_is_kept_but_its_finished_checkpoints_go(tmp_path, micro):
    dirs = fake_recipe_store(tmp_path, micro, ["world", "cnn"], age_days=30, checkpoint_steps=(5, 10))
    removed, _ = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert _paths(removed) == {("checkpoints", d.path / "checkpoints") for d in dirs.values()}
    for d in dirs.values():
        assert d.result() is not None and not (d.path / "checkpoints").exists()


def test_referenced_incomplete_stage_keeps_its_checkpoints(tmp_path, micro):
    dirs = fake_recipe_store(tmp_path, micro, ["cnn"], age_days=30, complete=False, checkpoint_steps=(5,))
    assert find_garbage(tmp_path, [micro], keep_days=7, mlflow=False) == []
    assert (dirs["cnn"].path / "checkpoints" / "00000005").is_dir()


def test_recent_unreferenced_dir_is_kept(tmp_path, micro):
    recent = fake_stage(tmp_path, "world", "a" * 64, {}, checkpoint_steps=(5,), age_days=2)
    old = fake_stage(tmp_path, "world", "b" * 64, {}, age_days=9)
    removed, _ = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert _paths(removed) == {("stage dir", old.path)}
    assert (recent.path / "checkpoints").is_dir()
    removed, _ = collect(tmp_path, [micro], keep_days=1, mlflow=False)
    assert _paths(removed) == {("stage dir", recent.path)}


def test_locked_dir_is_kept_and_gc_does_not_wait_for_it(tmp_path, micro):
    sd = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    locked, release = threading.Event(), threading.Event()

    def hold():
        with StageDir(tmp_path, "world", "a" * 64).lock():
            locked.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert locked.wait(10)
        assert find_garbage(tmp_path, [micro], keep_days=0, mlflow=False) == []
    finally:
        release.set()
        t.join(10)
    removed, _ = collect(tmp_path, [micro], keep_days=0, mlflow=False)
    assert _paths(removed) == {("stage dir", sd.path)}


def test_dir_locked_between_listing_and_removal_is_kept(tmp_path, micro, monkeypatch):
    sd = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    import flows.gc

    monkeypatch.setattr(flows.gc, "is_locked", lambda p: False)  # listed as unlocked...
    with sd.lock():  # ...then a run takes it
        removed, freed = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert removed == [] and freed == 0 and (sd.path / "result.json").exists()


def test_dry_run_lists_and_removes_nothing(tmp_path, micro):
    old = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    listed, would_free = collect(tmp_path, [micro], keep_days=7, dry_run=True, mlflow=False)
    assert _paths(listed) == {("stage dir", old.path)} and would_free == du(old.path) > 0
    assert (old.path / "result.json").exists()


def test_leftover_of_a_killed_gc_is_removed(tmp_path, micro):
    sd = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    dead = sd.path.with_name(f".{sd.path.name}.old-999999999")  # no such pid
    sd.path.rename(dead)
    removed, _ = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert _paths(removed) == {("temp", dead)} and not dead.exists()


def test_a_recipe_that_does_not_load_stops_gc(tmp_path, root):
    from flows.gc import recipes_for_gc
    from stages.recipe import RecipeError

    (tmp_path / "bad.yaml").write_text("recipe: bad\nstages: {a: {kind: nosuchkind}}\n")
    shutil.copy(root / "configs" / "vlp-micro.yaml", tmp_path / "micro.yaml")
    with pytest.raises(RecipeError, match="stops rather than skip"):
        recipes_for_gc([], configs_dir=tmp_path)
    (tmp_path / "bad.yaml").unlink()
    assert [r.name for r in recipes_for_gc([], configs_dir=tmp_path)] == ["vlp-micro"]


def test_report_names_bytes(tmp_path, micro):
    from flows.gc import render_garbage

    fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    listed, would_free = collect(tmp_path, [micro], keep_days=7, dry_run=True, mlflow=False)
    text = render_garbage(listed, would_free, dry_run=True)
    assert 0 < would_free < 1024 and f"would free {would_free} B ({would_free} bytes)" in text and "no recipe plans world@" in text


def test_dir_used_between_listing_and_removal_is_kept(tmp_path, micro, monkeypatch):
    import flows.gc

    sd = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    listing = flows.gc.find_garbage

    def listing_then_a_run(*args, **kwargs):
        out = listing(*args, **kwargs)
        with StageDir(tmp_path, "world", "a" * 64).lock():  # a run takes the lock and lets go of it
            pass
        return out

    monkeypatch.setattr(flows.gc, "find_garbage", listing_then_a_run)
    removed, freed = collect(tmp_path, [micro], keep_days=7, mlflow=False)
    assert removed == [] and freed == 0 and (sd.path / "result.json").exists()


def _opened(path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in os.listdir("/proc/self/fd"))


def test_a_run_waiting_for_the_lock_of_a_removed_dir_locks_the_new_dir(tmp_path):
    import fcntl

    sd = StageDir(tmp_path, "world", "a" * 64)
    sd.path.mkdir(parents=True)
    fd = os.open(sd.path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as gc holds it while it renames the dir away
    got = threading.Event()

    def run():
        with sd.lock(poll=0.05):
            got.set()
            assert "pid=" in (sd.path / ".lock").read_text()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while _opened(sd.path / ".lock") < 2 and time.monotonic() < deadline:  # the run waits on the lock
        time.sleep(0.01)
    gone = sd.path.with_name(f".{sd.path.name}.old-1")
    os.rename(sd.path, gone)
    os.close(fd)
    t.join(10)
    assert got.is_set() and not t.is_alive()
    # the run's lock is the one at the stage dir's path, so gc (or another run) sees it taken
    assert (sd.path / ".lock").exists() and not (gone / ".lock").read_text()


def test_cli_gc_dry_run_then_gc(tmp_path, micro, capsys):
    import json

    from flows.cli import main

    old = fake_stage(tmp_path, "world", "a" * 64, {}, age_days=30)
    kept = fake_recipe_store(tmp_path, micro, ["world"], age_days=30)["world"]
    art = ["--artifacts", str(tmp_path)]
    assert main(["gc", str(micro.path), "--dry-run", *art, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["path"] for i in doc["items"]] == [str(old.path)] and doc["bytes"] == du(old.path)
    assert main(["gc", str(micro.path), *art]) == 0
    out = capsys.readouterr().out
    assert f"freed {doc['bytes']} B" in out and not old.path.exists() and kept.result() is not None
