"""stages.progress: ETAs past an hour, a smoothed rate, and the two ways out (lines alone, events under the flow)."""
import json
import logging

import pytest

from stages import progress
from stages.progress import PROGRESS_PREFIX, Progress, RateMeter, fmt_duration


def test_eta_is_formatted_past_an_hour_and_a_day():
    assert fmt_duration(41) == "00:41"
    assert fmt_duration(3700) == "1:01:40"  # was 01:40 (%M:%S wrapped at an hour)
    assert fmt_duration(26 * 3600 + 5) == "1d 2:00:05"
    assert fmt_duration(float("inf")) == fmt_duration(float("nan")) == "--:--"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_one_slow_interval_moves_the_eta_by_a_fraction(monkeypatch):
    """A steady 10 steps/s, then one interval 20x slower (a validation): the old per-line rate made the ETA
    jump 20x (00:41 -> 13:15); the smoothed one moves it by at most 1.6x and recovers; a lasting 4x slowdown
    shows within a few intervals."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    meter = RateMeter()
    meter.start(0)
    etas = []
    for step in range(10, 210, 10):
        clock.t += 1.0 if step != 100 else 20.0
        meter.update(step)
        etas.append(meter.eta(1000 - step))
    steady, after_slow = etas[8], etas[9]
    assert after_slow / steady < 1.65
    assert etas[-1] / etas[-2] < 1.0  # recovering
    assert meter.rate == pytest.approx(1 / meter.per_item)
    for step in range(210, 310, 10):  # now 4x slower for good
        clock.t += 4.0
        meter.update(step)
    assert meter.rate == pytest.approx(2.5, rel=0.15)


def test_progress_logs_lines_alone_and_emits_events_under_the_flow(monkeypatch, capsys, caplog):
    monkeypatch.delenv("BATON_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="baton"):
        bar = Progress("detector", "regions", 4, "images")
        for _ in range(4):
            bar.update()
    assert [r.getMessage() for r in caplog.records if "regions 4/4 images" in r.getMessage()]
    assert PROGRESS_PREFIX not in capsys.readouterr().err

    monkeypatch.setenv("BATON_PROGRESS", "events")
    monkeypatch.setenv("BATON_PROGRESS_INTERVAL", "0")
    bar = Progress("vqa", "eval", 3, "questions")
    bar.update(2)
    bar.update(1)
    events = [json.loads(line[len(PROGRESS_PREFIX):]) for line in capsys.readouterr().err.splitlines()
              if line.startswith(PROGRESS_PREFIX)]
    assert [(e["done"], e["total"], e["phase"]) for e in events] == [(0, 3, "eval"), (2, 3, "eval"), (3, 3, "eval")]
    assert events[-1]["line"].startswith("[vqa] eval 3/3 questions") and events[1]["rate"] > 0
