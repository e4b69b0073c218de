"""flows.progress: a stage's events as rich bars in a terminal, as log lines otherwise."""
import io
import logging
import os
import pty
import re
import select
import sys
import time

import pytest
from rich.console import Console

from flows import progress

EV = {"stage": "vl", "phase": "train", "done": 120, "total": 300, "unit": "steps", "rate": 3.2, "eta_s": 3700.0,
      "loss": 4.2137, "line": "[vl] step 120/300 loss 4.2137"}


def test_bars_show_step_total_loss_rate_and_eta():
    out = io.StringIO()
    bars = progress.Bars(Console(file=out, force_terminal=True, width=160))
    with bars.progress:
        bars.update(EV)
        bars.update(EV | {"stage": "caption", "done": 5, "total": 60, "unit": "captions", "phase": "decode",
                          "loss": None, "eta_s": None})
        bars.progress.refresh()
        text = out.getvalue()
        assert "vl train" in text and "120/300" in text and "loss 4.2137" in text and "3.20/s" in text
        assert "ETA 1:01:40" in text and "caption decode" in text and "5/60" in text
        bars.finish("vl")
        assert list(bars.tasks) == ["caption"]


def test_without_a_terminal_the_events_line_is_logged(caplog):
    sp = progress.StageProgress("vl")
    with caplog.at_level(logging.INFO, logger="baton"):
        sp.handle(EV)
        sp.handle(EV | {"line": None, "done": 121})  # between lines: nothing printed
    assert [r.getMessage() for r in caplog.records] == ["[vl] step 120/300 loss 4.2137"]
    assert sp.failed  # no Prefect task run here: no artifact, and no retry of it
    assert progress.describe(EV) == "vl train 120/300 steps, loss 4.2137, 3.20 steps/s, ETA 1:01:40"


@pytest.mark.slow  # one CLI run of world + bert in a pseudo-terminal, ~20-50 s beside other jobs
def test_a_terminal_shows_live_bars_instead_of_step_lines(tmp_path, root):
    """`baton run` in a terminal: a rich bar for bert (step/total, loss, rate, ETA), log lines above it,
    no raw progress events and no plain step lines."""
    env = os.environ | {"BATON_ARTIFACTS": str(tmp_path / "art"), "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
                        "BATON_PROGRESS_INTERVAL": "0.2"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the pty as its terminal
        os.chdir(root)
        os.execvpe(sys.executable, [sys.executable, "-m", "flows.cli", "run", "configs/vlp-micro.yaml", "--only",
                                    "bert", "--no-track", "stages.bert.train.steps=40"], env)
    out = b""
    deadline = time.time() + 600
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        try:
            chunk = os.read(fd, 65536) if r else b""
        except OSError:  # the child closed the terminal
            break
        if r and not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert re.search(r"bert train\s+━+.*40/40 steps loss \d\.\d{4} [\d.]+/s ETA 00:00", text), text[-3000:]
    assert "[bert] done in" in text and "@baton-progress" not in text and "[bert] step 40/40" not in text
    from flows import server

    server.stop(tmp_path / "art")
