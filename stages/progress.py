"""Progress events and lines, torch-free (the flow's process reads them without importing torch).

Two ways out, chosen by the environment (stage code imports no orchestration library):
- alone (``python -m stages``, tests): a plain log line per tick;
- under the flow (flows.worker sets ``BATON_PROGRESS=events``): one structured event per tick on stderr,
  ``PROGRESS_PREFIX`` + JSON ({stage, phase, done, total, unit, rate, eta_s, loss?, line?}). The flow's end
  (flows.progress) renders them: rich bars in a terminal, the lines otherwise, Prefect progress artifacts.

Rates are smoothed (an exponential moving average of seconds per item) and ETAs print as H:MM:SS past an hour.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

log = logging.getLogger("baton")
PROGRESS_PREFIX = "@baton-progress "  # a line that starts so is an event, not text (flows.worker reads it)


def events_on() -> bool:
    return os.environ.get("BATON_PROGRESS") == "events"


def event_interval() -> float:
    """Seconds between two events (bars and Prefect artifacts stay live without flooding the pipe)."""
    return float(os.environ.get("BATON_PROGRESS_INTERVAL", "1.0"))


def fmt_duration(seconds: float) -> str:
    """``MM:SS`` under an hour, ``H:MM:SS`` past it, ``Nd H:MM:SS`` past a day; ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if days:
        return f"{days}d {h}:{m:02d}:{s:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RateMeter:
    """Items per second, smoothed: an exponential moving average of the seconds per item over the intervals
    between updates (tqdm's smoothing), each interval clipped to within ``clip`` x the estimate, so one slow
    interval (a validation, a checkpoint) moves the ETA by at most 1.6x instead of multiplying it; a lasting
    change of pace still shows within a few lines."""

    def __init__(self, smoothing: float = 0.3, clip: float = 3.0):
        self.smoothing, self.clip = smoothing, clip
        self.per_item: float | None = None
        self.last_t, self.last_n = time.perf_counter(), 0

    def start(self, n: int) -> None:
        self.last_t, self.last_n = time.perf_counter(), n

    def update(self, n: int) -> float:
        """Record that ``n`` items are done now; returns the smoothed rate (items/s)."""
        now = time.perf_counter()
        if n > self.last_n:
            dt = (now - self.last_t) / (n - self.last_n)
            if self.per_item is not None:  # one interval moves the estimate at most 1 + smoothing * (clip - 1) x
                dt = min(max(dt, self.per_item / self.clip), self.per_item * self.clip)
            self.per_item = dt if self.per_item is None else \
                self.smoothing * dt + (1 - self.smoothing) * self.per_item
            self.last_t, self.last_n = now, n
        return self.rate

    @property
    def rate(self) -> float:
        return 1.0 / self.per_item if self.per_item else 0.0

    def eta(self, remaining: int) -> float:
        return remaining * self.per_item if self.per_item is not None else float("nan")


def report(stage: str, phase: str, done: int, total: int, unit: str, meter: RateMeter, line: str | None = None,
           **fields) -> None:
    """One tick: an event under the flow, else ``line`` (when given) as a log line."""
    if events_on():
        eta = meter.eta(total - done)
        ev = {"stage": stage, "phase": phase, "done": done, "total": total, "unit": unit, "rate": meter.rate,
              "eta_s": eta if math.isfinite(eta) else None, **fields}
        if line is not None:
            ev["line"] = line
        sys.stderr.write(PROGRESS_PREFIX + json.dumps(ev) + "\n")
        sys.stderr.flush()
    elif line is not None:
        log.info("%s", line)


class Progress:
    """The progress of a pass over ``total`` items (images, batches): ``update(n)`` after each chunk. An event
    at most every ``event_interval()`` s, a line at most every ``line_every`` s, and both at the end.

        bar = Progress(ctx.name, "regions", len(images), "images")
        for chunk in ...: ...; bar.update(len(chunk))
    """

    def __init__(self, stage: str, phase: str, total: int, unit: str, line_every: float = 30.0):
        self.stage, self.phase, self.total, self.unit = stage, phase, total, unit
        self.line_every, self.done, self.meter = line_every, 0, RateMeter()
        self.t0 = self.last_event = self.last_line = time.perf_counter()
        report(stage, phase, 0, total, unit, self.meter)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.meter.update(self.done)
        now, end = time.perf_counter(), self.done >= self.total
        if not end and now - self.last_event < event_interval():
            return
        self.last_event = now
        line = None
        if end or now - self.last_line >= self.line_every:
            self.last_line = now
            line = (f"[{self.stage}] {self.phase} {self.done}/{self.total} {self.unit} "
                    f"{self.meter.rate:.1f} {self.unit}/s " + (f"in {fmt_duration(now - self.t0)}" if end else
                                                           f"ETA {fmt_duration(self.meter.eta(self.total - self.done))}"))
        report(self.stage, self.phase, self.done, self.total, self.unit, self.meter, line)
