"""The flow's end of stage progress: events from stage processes (stages.train.progress) to the people watching.

flows.worker hands every event line of a stage process to :func:`handle` (in that stage's task thread), which
- keeps a Prefect progress artifact per stage up to date (``progress-<stage>``, on the task run), and
- passes the event to the view: :class:`Bars` (rich, one live bar per running stage and phase: done/total,
  loss, smoothed rate, ETA) while the CLI runs in a terminal, else the event's line goes to the log as
  before.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from stages.progress import fmt_duration

log = logging.getLogger("baton")
_view: Bars | None = None  # the live bars, while `baton run` shows them


class StageProgress:
    """One stage process's progress, as its task thread sees it: the Prefect artifact it updates."""

    def __init__(self, stage: str, min_interval: float = 2.0):
        self.stage, self.min_interval = stage, min_interval
        self.artifact_id = None
        self.last_update = 0.0
        self.failed = False

    def handle(self, ev: dict[str, Any]) -> None:
        if _view is not None:
            _view.update(ev)
        if ev.get("line"):  # to the Prefect run's logs always; to the console only without bars (live_bars)
            log.info("%s", ev["line"], extra={"baton_progress": True})
        self._artifact(ev)

    def _artifact(self, ev: dict[str, Any]) -> None:
        total = max(int(ev.get("total") or 0), 1)
        pct = min(100.0, 100.0 * int(ev.get("done") or 0) / total)
        now = time.monotonic()
        if self.failed or (self.artifact_id is not None and now - self.last_update < self.min_interval
                           and pct < 100.0):
            return
        self.last_update = now
        desc = describe(ev)
        if "prefect.context" not in sys.modules:  # not under the flow (a test, a script): no artifact
            self.failed = True
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:  # not under a Prefect task (a stage run from a test or a script)
                self.failed = True
                return
            if self.artifact_id is None:
                key = "progress-" + re.sub(r"[^a-z0-9-]+", "-", self.stage.lower()).strip("-")
                self.artifact_id = create_progress_artifact(pct, key=key, description=desc)
            else:
                update_progress_artifact(self.artifact_id, pct, description=desc)
        except Exception as e:  # noqa: BLE001 - the stage's progress is not worth failing it
            log.debug("[%s] progress artifact: %s", self.stage, e)
            self.failed = True

    def finish(self) -> None:
        if _view is not None:
            _view.finish(self.stage)


def describe(ev: dict[str, Any]) -> str:
    """``vl train 120/300 steps, loss 4.21, 3.2 steps/s, ETA 00:56``."""
    parts = [f"{ev['stage']} {ev['phase']} {ev['done']}/{ev['total']} {ev['unit']}"]
    if ev.get("loss") is not None:
        parts.append(f"loss {ev['loss']:.4f}")
    if ev.get("rate"):
        parts.append(f"{ev['rate']:.2f} {ev['unit']}/s")
    if ev.get("eta_s") is not None and ev["done"] < ev["total"]:
        parts.append(f"ETA {fmt_duration(ev['eta_s'])}")
    return ", ".join(parts)


class Bars:
    """rich's live progress display: a bar per running stage (its current phase), removed when it ends."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[loss]}"),
                                 TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                                 TimeElapsedColumn(), console=console, transient=True, refresh_per_second=4)
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()

    def update(self, ev: dict[str, Any]) -> None:
        fields = {"unit": ev["unit"], "loss": f"loss {ev['loss']:.4f}" if ev.get("loss") is not None else "",
                  "rate": f"{ev['rate']:.2f}/s" if ev.get("rate") else "",
                  "eta": fmt_duration(ev["eta_s"]) if ev.get("eta_s") is not None else "--:--"}
        with self.lock:
            task = self.tasks.get(ev["stage"])
            desc = f"{ev['stage']} {ev['phase']}"
            if task is None:
                self.tasks[ev["stage"]] = self.progress.add_task(desc, total=ev["total"], completed=ev["done"],
                                                                 **fields)
            else:
                self.progress.update(task, description=desc, total=ev["total"], completed=ev["done"], **fields)
            if ev["done"] >= ev["total"]:  # draw the full bar now: the stage may end (its bar removed) before the
                self.progress.refresh()    # next 1/4 s refresh, and the last frame would be short of the total

    def finish(self, stage: str) -> None:
        with self.lock:
            task = self.tasks.pop(stage, None)
            if task is not None:
                self.progress.remove_task(task)


@contextmanager
def live_bars(enabled: bool) -> Iterator[None]:
    """While the block runs, stage progress shows as rich bars (when ``enabled``: a terminal). The bars draw
    through the console of Prefect's console log handler when there is one, so log lines print above them."""
    global _view
    if not enabled:
        yield
        return
    handlers = [h for lg in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
                for h in getattr(lg, "handlers", []) if type(h).__name__ == "PrefectConsoleHandler"]
    consoles = [h.console for h in handlers]
    from rich.default_styles import DEFAULT_STYLES
    from rich.theme import Theme

    bars = Bars(consoles[0] if consoles else None)
    console = bars.progress.console
    console.push_theme(Theme(DEFAULT_STYLES))  # Prefect's console theme (inherit=False) lacks the bars' styles
    _view = bars
    for h in handlers:  # the bars show what the periodic progress lines would say
        h.addFilter(_no_progress_lines)
    try:
        with bars.progress:
            yield
    finally:
        _view = None
        console.pop_theme()
        for h in handlers:
            h.removeFilter(_no_progress_lines)


def _no_progress_lines(record: logging.LogRecord) -> bool:
    return not getattr(record, "baton_progress", False)


@contextmanager
def tracking(stage: str) -> Iterator[StageProgress]:
    sp = StageProgress(stage)
    try:
        yield sp
    finally:
        sp.finish()


def flow_run_summary(client, flow_run_id) -> tuple[Any, str]:
    """(the flow run, one line: its state and each stage's task-run state, with the stage's progress artifact's
    description while it runs), read from the Prefect API."""
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

    fr = client.read_flow_run(flow_run_id)
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [flow_run_id]},
                                                                type={"any_": ["progress"]}))
    desc = {str(a.task_run_id): a.description for a in arts if a.task_run_id}
    parts = []
    for tr in sorted(runs, key=lambda t: t.expected_start_time or t.created):
        state = tr.state.name if tr.state else "?"
        parts.append(f"{tr.name} {state}" + (f" ({desc[str(tr.id)]})" if state == "Running" and str(tr.id) in desc
                                              else ""))
    return fr, f"{fr.state.name if fr.state else '?'}: " + ("; ".join(parts) or "no stage started yet")


def watch_flow_run(client, flow_run_id, every: float = 2.0, quiet_for: float = 10.0, out=print) -> Any:
    """Poll a flow run until it is final, printing its summary line whenever it changes (at most every
    ``quiet_for`` seconds while only progress moves) and a last one; returns the final flow run."""
    last, last_t = None, 0.0
    while True:
        fr, line = flow_run_summary(client, flow_run_id)
        final = fr.state is not None and fr.state.is_final()
        states_only = re.sub(r" \(.*?\)(?=;|$)", "", line)
        changed = last is None or states_only != re.sub(r" \(.*?\)(?=;|$)", "", last)
        if final or changed or (line != last and time.monotonic() - last_t >= quiet_for):
            out(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last, last_t = line, time.monotonic()
        if final:
            return fr
        time.sleep(every)
