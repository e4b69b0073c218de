"""Ctrl-C in the flow's process (flows.interrupt): the first one is passed on to the running stage
processes (each its own process group, so the terminal's SIGINT reaches only the flow); with none running
it is a plain KeyboardInterrupt; a second one kills everything and exits 130 at once."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import interrupt, worker

ROOT = Path(__file__).resolve().parents[2]
STAGE = textwrap.dedent("""
    import signal, sys, time
    if sys.argv[1:] == ["stubborn"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:  # as flows.worker.main does: a stage reacts to SIGINT even if it inherited it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def fake_stage(stubborn: bool = False) -> subprocess.Popen:
    """A stand-in stage process, leading its own process group as flows.worker's do; returns once it runs."""
    p = subprocess.Popen([sys.executable, "-c", STAGE, *(["stubborn"] if stubborn else [])], process_group=0,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_first_ctrl_c_is_passed_to_the_running_stage_processes():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a script's background job
    stage = fake_stage()
    try:
        with interrupt.handling():
            interrupt.add_stage_process(stage.pid)
            os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt here: the flow winds down itself
            time.sleep(0.2)
            assert interrupt.requested()
            assert stage.wait(timeout=10) == 130
    finally:
        interrupt.remove_stage_process(stage.pid)
        stage.kill()
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_ctrl_c_with_no_stage_running_is_a_keyboard_interrupt():
    with interrupt.handling(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert interrupt.requested()


def test_second_ctrl_c_kills_the_stage_processes_and_exits_at_once():
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from flows import interrupt
        from test_interrupt import fake_stage
        stage = fake_stage(stubborn=True)  # ignores SIGINT: a shutdown that takes long
        with interrupt.handling():
            interrupt.add_stage_process(stage.pid)
            print(stage.pid, flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage_pid = int(p.stdout.readline())
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == interrupt.EXIT_INTERRUPTED and time.monotonic() - t0 < 3, err
    assert "interrupted again: stopped at once" in err
    time.sleep(0.2)
    assert not alive(stage_pid)


def test_a_stage_process_stopped_by_ctrl_c_is_not_a_crash_and_names_its_step(monkeypatch):
    said = "stage 'vl' interrupted at step 5/300, last checkpoint at step 4"
    monkeypatch.setattr(worker, "launch_worker",
                        lambda *a: (130, ["[vl] step 5/300 loss 5.1", worker.INTERRUPTED_PREFIX + said]))
    with pytest.raises(interrupt.Interrupted, match=r"^stage 'vl' interrupted at step 5/300, last checkpoint at step 4$"):
        worker.run_stage_process("vl", Path("snap.json"), Path("art"), "", 1)
