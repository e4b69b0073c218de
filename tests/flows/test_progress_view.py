"""flows.progress: a stage's events as rich bars in a terminal, as log lines otherwise."""
import io
import logging

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
