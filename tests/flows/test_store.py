"""The artifact store's lock: one writer per stage directory; a lock left by a killed process
is broken automatically (flock dies with its process)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from flows.store import StageDir


def test_second_locker_waits_for_the_first(tmp_path):
    sd = StageDir(tmp_path, "s", "f" * 64)
    order = []

    def second():
        with sd.lock(poll=0.05):
            order.append("second")

    with sd.lock():
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first-done")
    t.join(5)
    assert order == ["first-done", "second"]


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from flows.store import StageDir
        with StageDir({str(tmp_path)!r}, "s", "f" * 64).lock():
            print("locked", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert p.stdout.readline().strip() == "locked"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    sd = StageDir(tmp_path, "s", "f" * 64)
    assert "pid=" in (sd.path / ".lock").read_text()  # the file is still there...
    t0 = time.perf_counter()
    with sd.lock(poll=0.05):  # ...but the lock is not
        pass
    assert time.perf_counter() - t0 < 1


def test_temps_of_killed_writers_are_removed_and_weights_writes_leave_none(tmp_path):
    """A kill during an outputs write leaves temp names behind: ours (pid-tagged) and the Rust tempfile
    crate's (.tmpXXXXXX, which safetensors writes through). The next holder of the lock removes both;
    finished files stay. save_weights confines safetensors' temp file to its own pid-tagged temp dir."""
    import torch

    from stages.train.checkpoint import load_weights, save_weights

    sd = StageDir(tmp_path, "s", "f" * 64)
    model = sd.path / "outputs" / "model"
    model.mkdir(parents=True)
    save_weights({"w": torch.ones(3)}, model / "model.safetensors")
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_weights(model / "model.safetensors")["w"], torch.ones(3))
    leftovers = [model / ".tmpRJfnKa", model / ".model.safetensors.tmp-999999", sd.path / ".result.json.tmp-999999"]
    for p in leftovers:
        p.write_text("half")
    (model / "config.json").write_text("{}")
    with sd.lock():
        removed = sd.remove_stale_temps()
    assert sorted(removed) == sorted(leftovers)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_one_temp_name_rule_for_every_writer_and_the_names_already_on_disk(tmp_path):
    """stages.fsio owns the rule: the names its writers make, the names earlier versions wrote, and
    the Rust tempfile crate's are all temp names; the pid-tagged ones name their writer."""
    from stages.fsio import is_temp_name, temp_owner, temp_path, temp_target, temps_of

    pid = os.getpid()
    made = [temp_path(tmp_path / "result.json"), temp_path(tmp_path / "checkpoints" / "00000004"),
            temp_path(tmp_path / "outputs"), temp_path(tmp_path / "regions", "old")]
    for p in made:
        assert is_temp_name(p.name) and temp_owner(p.name) == pid, p.name
    assert temp_target(made[1].name) == "00000004" and temp_target(".tmp-00000004-4242") == "00000004"
    on_disk = {".result.json.tmp-4242": 4242, ".tmp-00000004-4242": 4242, "outputs.tmp-4242": 4242,
               "regions.old-4242": 4242, ".model.safetensors.tmp-4242": 4242, ".tmpRJfnKa": None}
    for name, owner in on_disk.items():
        assert is_temp_name(name) and temp_owner(name) == owner, name
    for name in ("result.json", "00000004", "outputs", "model.safetensors", "tmp", "regions", "run.json"):
        assert not is_temp_name(name) and temp_owner(name) is None, name
    (tmp_path / "regions").mkdir()
    for name in (".regions.tmp-5", "regions.tmp-1", "regions.old-2", "regionsX.tmp-3", "other.tmp-4"):
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in temps_of(tmp_path / "regions")) == [".regions.tmp-5", "regions.old-2",
                                                                       "regions.tmp-1"]
    assert temp_path(tmp_path / "regions").name.startswith(".")  # hidden: a reader's glob never sees it
