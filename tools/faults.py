"""Fault injection: SIGKILL ``baton run`` inside every stage, rerun, and check nothing was lost.

    python -m tools.faults configs/vlp-micro.yaml [dotted.key=value ...] --kills-per-stage 20 --out report.json

1. A reference run, uninterrupted, in its own artifacts dir. A watcher records when each stage
   takes its lock, writes each checkpoint and ``result.json``: the windows the kills aim at.
2. In a second artifacts dir, ``python -m flows.cli run CONFIG`` again and again, each time SIGKILLed
   (its whole process group: the CLI, its stage processes and Prefect's server; a SIGSTOP first freezes
   it at that instant while the harness notes what was executing) while the *target* stage executes:
   the first stage (recipe order) of the run that starts executing, is not complete and has had fewer
   than N kills aimed at it. Each kill aims at one phase of the stage, chosen in rotation (seeded delays):
     startup     a random moment before anything is written
     train       a random moment between checkpoints (after 0-2 new ones)
     checkpoint  while ``checkpoints/.<step>.tmp-<pid>/`` exists (a checkpoint write)
     regions     while ``outputs/.regions.tmp-<pid>/`` exists (the region-feature store write)
     outputs     as soon as this run writes into ``outputs/`` (world: ``.outputs.tmp-<pid>/``)
     eval        a random moment after the last checkpoint (evaluation, outputs, MLflow model)
     result      while ``.result.json.tmp-<pid>`` exists (the final result write)
   After the kill the stage directory says what was really hit (the phase recorded in the report).
   A stage that completes before it has had its N kills (a kill that came too late for a millisecond
   window lets it finish) is reopened: its directory is removed and it runs again from scratch.
   Every stage working in the killed process counts a kill (``kills_per_stage``); a stage is the
   target until N kills aimed at it landed (``aimed_kills_per_stage``), so concurrent stages' kills
   (mostly in their startup) come on top.
3. A last run to completion. Then: every stage's result.json has the reference's fingerprint,
   metrics and baselines (exactly: the runs are deterministic on CPU) and the same output files
   (sha256); no stage directory is inconsistent (result.json with every output present, no temp
   leftovers, every checkpoint verifies); every stage's MLflow run is FINISHED.

The children run from a snapshot of ``flows/``, ``stages/`` and the config (``snapshot=True``), so
edits to the working tree during a long run do not change fingerprints halfway through. The harness
reads the store only through its public views (flows.store, stages.fsio's temp-name rule,
stages.train.checkpoint); it is a developer tool, not shipped in the wheel.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.store import lock_holder, read_result, resolved_config, stage_paths, temp_dirs
from stages.fsio import is_temp_name, sha256_file, temp_owner, temp_path, temp_target

ROOT = Path(__file__).resolve().parents[1]
TRAINING_AIMS = ("startup", "train", "checkpoint")
MENUS = {  # rotation order: with one kill per stage, the stages of a group hit different phases
    "world": ("outputs", "result", "startup"),
    "detector": ("regions", "checkpoint", "train", "result", "eval", "outputs", "startup"),
    "*": ("checkpoint", "train", "result", "eval", "outputs", "startup"),
}


# ----------------------------------------------------------------------------------------------
# a stage directory, seen from outside


@dataclass
class Watch:
    """Read-only probes of ``artifacts/stages/<stage>/<fp16>/`` (no imports of the project code)."""

    stage: str
    path: Path
    steps: int | None  # train.steps, None for stages without training

    def lock_pid(self) -> int | None:
        return lock_holder(self.path)

    def writer(self, run_pid: int) -> int | None:
        """Pid of the process of run ``run_pid`` (the CLI, or a stage process it started: same process
        group) that holds or last held this stage's lock; None if no process of that run did."""
        pid = self.lock_pid()
        return pid if in_run(pid, run_pid) else None

    def executing(self, run_pid: int, workers: bool) -> int | None:
        """Pid of the process of run ``run_pid`` that executes this stage now (or did last): with stage
        processes (flows.worker) the lock holder other than the CLI, which only takes the lock for a
        moment to look for result.json; without them the CLI itself."""
        pid = self.writer(run_pid)
        if pid is None or (workers and pid == run_pid):
            return None
        return pid

    def complete(self) -> bool:
        return (self.path / "result.json").exists()

    def temps(self, pid: int) -> list[Path]:
        """Temp entries of writer ``pid`` (relative paths) wherever writers put them in the stage dir."""
        out = []
        for d in temp_dirs(self.path):
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            out += [Path(e.path).relative_to(self.path) for e in entries if temp_owner(e.name) == pid]
        return out

    def checkpoint_writes(self, run_pid: int) -> dict[str, int]:
        """{temp name: step} of the checkpoint writes in progress by processes of run ``run_pid``: the
        cheap probe the harness busy-polls while waiting for a write that lasts milliseconds."""
        try:
            names = [e.name for e in os.scandir(self.path / "checkpoints")]
        except OSError:
            return {}
        return {n: int(temp_target(n)) for n in names
                if is_temp_name(n) and in_run(temp_owner(n), run_pid) and (temp_target(n) or "").isdigit()}

    def checkpoints(self) -> dict[int, int]:
        """{step: mtime_ns} of the published checkpoint dirs."""
        from stages.train.checkpoint import CheckpointManager

        mgr, out = CheckpointManager(self.path / "checkpoints"), {}
        try:
            for step in mgr.steps():
                out[step] = mgr.path_of(step).stat().st_mtime_ns
        except OSError:  # pruned while we looked
            pass
        return out

    def outputs_touched_since(self, t_ns: int) -> bool:
        try:
            for e in os.scandir(self.path / "outputs"):
                if e.stat().st_mtime_ns >= t_ns:
                    return True
                if e.is_dir():
                    if any(f.stat().st_mtime_ns >= t_ns for f in os.scandir(e.path)):
                        return True
        except OSError:
            return False
        return False


def in_run(pid: int | None, run_pid: int) -> bool:
    """``pid`` is the run's CLI process or one of its descendants. The run is started with
    start_new_session, so its session id is the CLI's pid; stage processes lead process groups of their
    own (a terminal's Ctrl-C goes to the flow, which passes it on) but stay in that session."""
    if pid is None:
        return False
    if pid == run_pid:
        return True
    try:
        return os.getsid(pid) == run_pid
    except OSError:
        return False


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (the CLI, the fork server, the stage processes' groups)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def signal_run(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to every process group of the run's session (as a crash of the machine would); again
    while a stage process forked between the scan and the signal shows up as a new group."""
    done: set[int] = set()
    for _ in range(3):
        groups = {_pgid(p) for p in session_pids(proc.pid)} - {None} - done or ({proc.pid} - done)
        if not groups:
            return
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        done |= groups


def freeze_first(*pids: int | None) -> None:
    """SIGSTOP the process groups of ``pids`` right away: one syscall each, before the slower scan of the
    whole session in :func:`signal_run` (a stage's result.json write lasts well under a millisecond)."""
    for pid in pids:
        pgid = _pgid(pid) if pid else None
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGSTOP)
            except ProcessLookupError:
                pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _in_outputs(t: Path) -> bool:
    """Temp entry ``t`` (relative to the stage dir) belongs to an outputs write (world: all of outputs/)."""
    return t.parts[0] == "outputs" or temp_target(t.name) == "outputs"


def classify(w: Watch, pid: int, active_ns: int, log_text: str) -> str:
    """What the kill interrupted, from what the stage directory shows afterwards (``pid``: the writer)."""
    if w.complete():
        return "complete"
    temps = w.temps(pid)
    targets = {temp_target(t.name) for t in temps}
    if any(t.parent == Path(".") and temp_target(t.name) == "result.json" for t in temps):
        return "result-write"
    if any(t.parts[0] == "checkpoints" for t in temps):
        return "checkpoint-write"
    if "regions" in targets:
        return "regions-write"
    if any(_in_outputs(t) for t in temps) or w.outputs_touched_since(active_ns):
        return "outputs-write"
    if temps:  # config.json / run.json of the stage start
        return "startup"
    ck = w.checkpoints()
    if w.steps is not None and ck and max(ck) >= w.steps:
        return "eval"
    if any(t >= active_ns for t in ck.values()) or re.search(rf"\[{re.escape(w.stage)}\] step \d+/", log_text):
        return "train"
    return "startup"


# ----------------------------------------------------------------------------------------------
# running the CLI


def snapshot_code(dest: Path, config: Path) -> tuple[Path, str]:
    """Copy flows/, stages/ and the config into ``dest``; returns (cwd for the children, config path there)."""
    for pkg in ("flows", "stages"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(config, dest / "configs" / config.name)
    return dest, f"configs/{config.name}"


@dataclass
class Runner:
    cwd: Path
    config: str
    overrides: list[str]
    prefect_home: Path
    logs: Path
    n: int = 0

    def start(self, artifacts: Path, tag: str) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.logs / f"{self.n:03d}-{tag}.log"
        env = os.environ | {"BATON_ARTIFACTS": str(artifacts), "PYTHONUNBUFFERED": "1",
                            "PREFECT_HOME": str(self.prefect_home)}
        f = open(log, "w")
        # niceness +5: on a loaded machine the harness must still poll often enough to catch a write
        # that lasts milliseconds (the result.json write); the runs' results do not depend on it
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", self.config, *self.overrides],
                                cwd=self.cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.nice(5))
        f.close()
        return proc, log


def killpg(proc: subprocess.Popen) -> None:
    signal_run(proc, signal.SIGKILL)
    proc.wait()


def wait_for(proc: subprocess.Popen, cond: Callable[[], Any], timeout: float, poll: float = 0.002,
             miss: Callable[[], bool] | None = None) -> Any:
    """Poll ``cond`` until truthy (returned); 'exited' / 'missed' / 'timeout' otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if r:
            return r
        if miss is not None and miss():
            return "missed"
        if proc.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(poll)


# ----------------------------------------------------------------------------------------------
# the reference run


@dataclass
class Timeline:
    active: float | None = None
    checkpoints: dict[int, float] = field(default_factory=dict)
    outputs_tmp: float | None = None
    outputs_tmp_end: float | None = None
    done: float | None = None

    def windows(self, steps: int | None) -> dict[str, float]:
        """Seconds: startup (lock -> first write), interval (between checkpoints), post (last checkpoint -> result)."""
        a = self.active or 0.0
        done = self.done or a
        ts = [self.checkpoints[s] for s in sorted(self.checkpoints)]
        if not ts:  # world: the generation into .outputs.tmp-<pid> is the window
            first = self.outputs_tmp or a
            end = self.outputs_tmp_end or done
            return {"startup": max(first - a, 0.001), "interval": max(end - first, 0.001),
                    "post": max(done - end, 0.001), "total": done - a}
        gaps = sorted(b - c for b, c in zip(ts[1:], ts[:-1])) or [ts[0] - a]
        interval = max(gaps[len(gaps) // 2], 0.001)
        return {"startup": max(ts[0] - a - interval, 0.001), "interval": interval,
                "post": max(done - ts[-1], 0.001), "total": done - a}


# ----------------------------------------------------------------------------------------------
# comparing and checking


def output_digests(stage_dir: Path, artifacts: Path) -> dict[str, str]:
    """{file under outputs/: sha256}. Small text files are hashed with the artifacts root replaced by a
    placeholder: transformers writes the absolute path it loaded from (``_name_or_path``) into configs."""
    out = stage_dir / "outputs"
    if not out.is_dir():
        return {}
    digests = {}
    root = str(Path(artifacts).resolve()).encode()
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix in (".json", ".txt", ".yaml") and p.stat().st_size < (8 << 20):
            digests[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes().replace(root, b"<ARTIFACTS>")).hexdigest()
        else:
            digests[str(p.relative_to(out))] = sha256_file(p)
    return digests


def check_consistency(artifacts: Path) -> list[str]:
    """Problems in the stage directories (empty = consistent)."""
    problems = []
    for dirs in stage_paths(artifacts).values():
        for d in dirs:
            rel = d.relative_to(artifacts)
            problems += _result_problems(d, rel) + _checkpoint_problems(d, rel)
    return problems


def _result_problems(d: Path, rel: Path) -> list[str]:
    """A complete stage directory lists only outputs that exist and keeps no temp names."""
    try:
        res = read_result(d)
    except ValueError as e:
        return [f"{rel}/result.json does not parse: {e}"]
    if res is None:
        return []
    problems = []
    for k, v in res.outputs.items():
        p = Path(v) if Path(v).is_absolute() else d / v
        if not p.exists():
            problems.append(f"{rel}: result.json lists output {k}={v}, which is missing")
        elif p.is_dir() and not any(p.iterdir()):
            problems.append(f"{rel}: output {k}={v} is an empty directory")
    leftovers = [str(p.relative_to(d)) for p in d.rglob("*") if is_temp_name(p.name)]
    if leftovers:
        problems.append(f"{rel}: complete, but temp leftovers {leftovers[:5]}")
    reg = d / "outputs" / "regions"
    if reg.exists() and not (reg / "index.json").exists():
        problems.append(f"{rel}: outputs/regions has no index.json")
    return problems


def _checkpoint_problems(d: Path, rel: Path) -> list[str]:
    from stages.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(d / "checkpoints")
    return [f"{rel}/checkpoints/{step:08d}: {why}" for step in mgr.steps()
            if (why := mgr.verify(mgr.path_of(step))) is not None]


def tracked_runs(artifacts: Path) -> tuple[Any, dict[str, list[str]]]:
    """(MLflow client, {stage: run ids of its complete stage dirs}); (None, {}) without MLflow."""
    try:
        from mlflow import MlflowClient

        from flows.tracking import tracking_uri
    except ImportError:
        return None, {}
    runs: dict[str, list[str]] = {}
    for stage, dirs in stage_paths(artifacts).items():
        for d in dirs:
            res = read_result(d)
            rid = res.info.get("mlflow_run_id") if res is not None else None
            if rid:
                runs.setdefault(stage, []).append(rid)
    return MlflowClient(tracking_uri=tracking_uri(artifacts)), runs


def mlflow_problems(artifacts: Path) -> list[str]:
    """Stage runs of complete stages that MLflow does not show as FINISHED."""
    client, runs = tracked_runs(artifacts)
    return [f"{stage}: MLflow run {rid} is {status}" for stage, rids in runs.items() for rid in rids
            if (status := client.get_run(rid).info.status) != "FINISHED"]


def loss_history_diffs(ref: Path, got: Path, stages: list[str]) -> dict[str, str]:
    """Stages whose MLflow loss curve differs from the uninterrupted run's: a step missing or logged twice
    (metrics lost or repeated around a kill), or another value (a resumed run averaging other steps)."""
    (ca, ra), (cb, rb) = tracked_runs(ref), tracked_runs(got)

    def curve(client, rid: str) -> list[tuple[int, float]]:  # in logging order
        hist = sorted(client.get_metric_history(rid, "train/loss"), key=lambda m: (m.timestamp, m.step))
        return [(m.step, m.value) for m in hist]

    out = {}
    for s in stages:
        if len(ra.get(s, [])) != 1 or len(rb.get(s, [])) != 1:
            continue  # untracked, or incomplete (reported by compare)
        a, b = curve(ca, ra[s][0]), curve(cb, rb[s][0])
        if [st for st, _ in a] != [st for st, _ in b]:
            out[s] = f"steps {[st for st, _ in b]} instead of {[st for st, _ in a]}"
        elif a != b:
            out[s] = "; ".join(f"step {x[0]}: {y[1]!r} instead of {x[1]!r}" for x, y in zip(a, b) if x != y)
    return out


def _results(artifacts: Path, stage: str) -> list[tuple[Path, Any]]:
    return [(d, r) for d in stage_paths(artifacts).get(stage, []) if (r := read_result(d)) is not None]


def compare(ref: Path, got: Path, stages: list[str]) -> dict[str, Any]:
    metric_diffs, output_diffs, missing = {}, {}, []
    for s in stages:
        ra, rb = _results(ref, s), _results(got, s)
        if len(ra) != 1 or len(rb) != 1:
            missing.append(f"{s}: {len(ra)} reference / {len(rb)} fault-run result.json")
            continue
        (da, a), (db, b) = ra[0], rb[0]
        d = {}
        if a.fingerprint != b.fingerprint:
            d["fingerprint"] = [a.fingerprint[:16], b.fingerprint[:16]]
        for key in ("metrics", "baselines"):
            va_all, vb_all = getattr(a, key), getattr(b, key)
            for k in sorted(set(va_all) | set(vb_all)):
                if va_all.get(k) != vb_all.get(k):
                    d[f"{key}.{k}"] = [va_all.get(k), vb_all.get(k)]
        if d:
            metric_diffs[s] = d
        oa, ob = output_digests(da, ref), output_digests(db, got)
        diff = sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k))
        if diff:
            output_diffs[s] = diff[:20]
    return {"metrics_identical": not metric_diffs and not missing, "metric_diffs": metric_diffs,
            "outputs_identical": not output_diffs and not missing, "output_diffs": output_diffs,
            "missing_results": missing}


# ----------------------------------------------------------------------------------------------
# the harness


def kill_plan(stages: dict[str, str], n: int) -> dict[str, list[str]]:
    """{stage: [aim per kill]}: the menu in rotation (offset = rank among stages sharing the menu),
    training aims first (they advance the stage), then the ones after training, the result write last
    (a kill that comes too late for its millisecond window lets the stage complete: no more kills there)."""
    rank: Counter = Counter()
    plan = {}
    for s, kind in stages.items():
        key = kind if kind in MENUS else "*"
        menu = MENUS[key]
        off = rank[key]
        rank[key] += 1
        aims = [menu[(off + k) % len(menu)] for k in range(n)]
        plan[s] = sorted(aims, key=lambda a: (a not in TRAINING_AIMS) + (a == "result"))
    return plan


@dataclass
class Plan:
    """What the reference run taught: the stages (recipe order), the order they start in (the targets),
    their kinds, how to watch them in the fault run's store, and their timing windows."""

    order: list[str]
    targets: list[str]
    kinds: dict[str, str]
    watches: dict[str, Watch]
    windows: dict[str, dict[str, float]]
    seconds: float


def _observe_reference(ref: Path, pid: int, workers: bool, now: float, watches: dict[str, Watch],
                       tl: dict[str, Timeline]) -> None:
    """One look at the reference store: the stage dirs only exist once the run reaches them."""
    for s, paths in stage_paths(ref).items():
        if s not in watches:
            watches[s], tl[s] = Watch(s, paths[0], None), Timeline()
    for s, w in watches.items():
        t = tl[s]
        if t.done is not None:
            continue
        if t.active is None and w.executing(pid, workers) is not None:
            t.active = now
        if t.active is None:
            continue
        for step in w.checkpoints():
            t.checkpoints.setdefault(step, now)
        gen = any(temp_target(x.name) == "outputs" for x in w.temps(w.lock_pid() or -1))
        if t.outputs_tmp is None and gen:
            t.outputs_tmp = now
        if t.outputs_tmp is not None and t.outputs_tmp_end is None and not gen:
            t.outputs_tmp_end = now
        if w.complete():
            t.done = now


def reference_run(runner: Runner, ref: Path, art: Path, config: Path, workers: bool, run_timeout: float) -> Plan:
    """The uninterrupted run, watched: when each stage takes its lock, checkpoints, writes its outputs."""
    proc, log = runner.start(ref, "reference")
    t0 = time.monotonic()
    tl: dict[str, Timeline] = {}
    watches_ref: dict[str, Watch] = {}
    while proc.poll() is None and time.monotonic() - t0 < run_timeout:
        _observe_reference(ref, proc.pid, workers, time.monotonic() - t0, watches_ref, tl)
        time.sleep(0.003)
    if proc.poll() is None:
        killpg(proc)
        raise RuntimeError(f"reference run did not finish in {run_timeout}s (log: {log})")
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed with exit {proc.returncode}:\n{log.read_text()[-4000:]}")
    seconds = time.monotonic() - t0
    # targets in the order the stages started in the reference run: stages that run at the same time
    # (cnn and bert, caption and vqa) are targeted one right after the other, before either completes
    targets = [s for s, _ in sorted(((s, t.active or 0.0) for s, t in tl.items()), key=lambda x: x[1])]
    kinds, watches, windows = {}, {}, {}
    for s in targets:
        (d,) = stage_paths(ref)[s]
        conf = resolved_config(d)
        steps = conf.get("train", {}).get("steps") if isinstance(conf.get("train"), dict) else None
        kinds[s] = conf["kind"]
        watches[s] = Watch(s, art / "stages" / s / d.name, steps)
        windows[s] = tl[s].windows(steps)
    return Plan(recipe_order(config, targets), targets, kinds, watches, windows, seconds)


def recipe_order(config: Path, stages: list[str]) -> list[str]:
    """``stages`` in the config's order (a topological order the flow also uses), else as given."""
    try:
        import yaml

        rorder = [s for s in yaml.safe_load(config.read_text())["stages"] if s in stages]
    except Exception:  # noqa: BLE001 - keep the order given
        return list(stages)
    return rorder + [s for s in stages if s not in rorder]


@dataclass
class Shot:
    """One kill aimed at ``target``: waits (polling the stage dir) for the moment its aim names."""

    proc: subprocess.Popen
    w: Watch
    wp: int  # the stage's writer: its process, or the CLI
    run_ns: int  # files this run writes are newer; the killed runs' are older
    win: dict[str, float]
    rng: random.Random
    run_timeout: float
    start_ckpts: dict[int, int] = field(default_factory=dict)

    def final_done(self) -> bool:
        return self.w.steps is not None and any(s >= self.w.steps for s in self.w.checkpoints())

    def wait(self, cond: Callable[[], Any], poll: float = 0.002) -> Any:
        return wait_for(self.proc, cond, self.run_timeout, poll=poll, miss=self.w.complete)

    def pause(self, seconds: float) -> Any:
        """Sleep ``seconds`` unless the run exits or the stage completes first: True when it ran out."""
        r = wait_for(self.proc, lambda: False, seconds, miss=self.w.complete)
        return True if r == "timeout" else r

    def then_pause(self, r: Any, seconds: float, detail: dict) -> tuple[Any, dict]:
        if r is True:
            r = self.pause(seconds)
            detail["delay"] = round(seconds, 4)
        return r, detail

    def startup(self) -> tuple[Any, dict]:
        # half the reference's startup: a resumed stage or one that no longer shares the cores boots
        # faster, and a later kill could find it already complete
        delay = self.rng.uniform(0, 0.5 * self.win["startup"])
        return self.pause(delay), {"delay": round(delay, 4)}

    def train(self) -> tuple[Any, dict]:
        j = self.rng.choice([0, 1, 2])
        new = lambda: sum(1 for s, t in self.w.checkpoints().items() if self.start_ckpts.get(s) != t)  # noqa: E731
        r = self.wait(lambda: new() >= j or self.final_done())
        return self.then_pause(r, self.rng.uniform(0, 0.7 * self.win["interval"]), {"after_new_checkpoints": j})

    def checkpoint(self) -> tuple[Any, dict]:
        j = self.rng.choice([1, 2])
        seen: set[str] = set()

        def ckpt_write() -> bool:
            for t, step in self.w.checkpoint_writes(self.proc.pid).items():
                if t not in seen:
                    seen.add(t)
                    if len(seen) >= j or (self.w.steps is not None and step >= self.w.steps):
                        return True
            return False

        return self.wait(ckpt_write, poll=0.0001), {"nth_write": j}

    def regions(self) -> tuple[Any, dict]:
        return self.wait(temp_path(self.w.path / "outputs" / "regions", pid=self.wp).exists, poll=0.0), {}

    def outputs(self) -> tuple[Any, dict]:
        if self.w.steps is None:  # world: somewhere inside the generation
            r = self.wait(temp_path(self.w.path / "outputs", pid=self.wp).exists, poll=0.0005)
            # the generation's speed varies with load
            return self.then_pause(r, self.rng.uniform(0, 0.5 * self.win["interval"]), {})
        return self.wait(lambda: self.w.outputs_touched_since(self.run_ns) or
                         any(_in_outputs(t) for t in self.w.temps(self.wp)), poll=0.0005), {}

    def eval(self) -> tuple[Any, dict]:
        return self.then_pause(self.wait(self.final_done), self.rng.uniform(0, 0.7 * self.win["post"]), {})

    def result(self) -> tuple[Any, dict]:
        # the write lasts about one fsync (~1 ms): poll the one name it has, without sleeping
        return self.wait(temp_path(self.w.path / "result.json", pid=self.wp).exists, poll=0.0), {}


@dataclass
class Campaign:
    """The kill loop's state: what was aimed where, what was hit, what went wrong."""

    plan: Plan
    runner: Runner
    art: Path
    kills_per_stage: int
    workers: bool
    rng: random.Random
    run_timeout: float
    say: Callable[[str], None]
    aims: dict[str, list[str]] = field(default_factory=dict)
    kills: Counter = field(default_factory=Counter)  # every kill that interrupted the stage
    aimed: Counter = field(default_factory=Counter)  # the ones aimed at it (a concurrent stage's come on top)
    phases: dict[str, Counter] = field(default_factory=dict)
    reopened: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    misses: int = 0
    target_pid: int | None = None  # the aimed stage's process (it leads its own process group)

    def __post_init__(self) -> None:
        self.aims = kill_plan({s: self.plan.kinds[s] for s in self.plan.order}, self.kills_per_stage)
        self.phases = {s: Counter() for s in self.plan.order}

    def run(self) -> None:
        max_attempts = self.kills_per_stage * len(self.plan.order) * 3 + 10
        for _ in range(max_attempts):
            self.reopen_completed()
            wanted = [s for s in self.plan.targets if self.aimed[s] < self.kills_per_stage]
            if not wanted or not self.one_run(wanted):
                break

    def reopen_completed(self) -> None:
        """A short stage can finish in a run whose kill came too late (a missed millisecond window): it
        still needs kills, so its directory goes and it runs again from scratch; downstream stages keep
        theirs (same fingerprint) and the final comparison shows the rerun changed nothing."""
        for s in self.plan.targets:
            w = self.plan.watches[s]
            if self.aimed[s] < self.kills_per_stage and w.complete():
                shutil.rmtree(w.path)
                self.reopened[s] += 1
                self.say(f"[faults] {s} completed with {self.aimed[s]} of {self.kills_per_stage} kills: removed "
                         f"{w.path} so it runs again")

    def pick(self, run_pid: int) -> str | None:
        """The first stage that starts executing and still needs kills is the target."""
        for s in self.plan.targets:
            if self.aimed[s] < self.kills_per_stage and self.plan.watches[s].executing(run_pid, self.workers):
                return s
        return None

    def one_run(self, wanted: list[str]) -> bool:
        """Start a run, kill it at the target's aim, record what was hit. False: stop the campaign."""
        run_ns = time.time_ns()
        proc, log = self.runner.start(self.art, "kill")
        t_run = time.monotonic()
        target = wait_for(proc, lambda: self.pick(proc.pid), self.run_timeout)
        if target in ("exited", "timeout"):
            if target == "timeout":
                killpg(proc)
            self.failures.append(f"run {self.runner.n}: {target} before any of {wanted} started "
                                 f"(exit {proc.returncode}); log {log}")
            return proc.returncode in (0, None)
        aim, r, detail = self.aim(proc, target, run_ns)
        if r == "exited":
            self.failures.append(f"run {self.runner.n} ({target}/{aim}): exited {proc.returncode} before the kill; "
                                 f"log {log}")
            return proc.returncode == 0
        hit = self.kill(proc, log, run_ns)
        missed = r == "missed" or target not in hit
        self.misses += missed
        self.aimed[target] += not missed
        t_kill = time.monotonic() - t_run
        self.records.append({"run": self.runner.n, "target": target, "aim": aim, "missed": missed,
                             "after_s": round(t_kill, 2), "hit": hit,
                             "wait": r if isinstance(r, str) else "event"} | detail)
        self.say(f"[faults] run {self.runner.n}: kill aimed at {target}/{aim} after {t_kill:.1f}s -> "
                 + (", ".join(f"{s}:{p}" for s, p in hit.items()) or "nothing running")
                 + (" (missed)" if missed else ""))
        return True

    def aim(self, proc: subprocess.Popen, target: str, run_ns: int) -> tuple[str, Any, dict]:
        w = self.plan.watches[target]
        shot = Shot(proc, w, w.executing(proc.pid, self.workers), run_ns, self.plan.windows[target], self.rng,
                    self.run_timeout, w.checkpoints())
        plan = self.aims[target]
        aim = plan[min(self.aimed[target], len(plan) - 1)]
        if aim in ("train", "checkpoint", "eval") and (w.steps is None or shot.final_done()):
            aim = "eval" if w.steps is not None else "outputs"  # nothing left to train in this stage
        self.target_pid = shot.wp
        r, detail = getattr(shot, aim)()
        return aim, r, detail

    def kill(self, proc: subprocess.Popen, log: Path, run_ns: int) -> dict[str, str]:
        """Freeze the whole run first (takes effect as fast as SIGKILL, and nothing runs afterwards), note
        which stages its processes were executing (they must still exist for that), then kill. Returns
        {stage: the phase the kill interrupted}."""
        freeze_first(self.target_pid, proc.pid)  # the aimed window can be well under a millisecond
        signal_run(proc, signal.SIGSTOP)
        writers = {s: ws.executing(proc.pid, self.workers) for s, ws in self.plan.watches.items()}
        killpg(proc)
        text = log.read_text(errors="replace")
        hit = {}
        for s, ws in self.plan.watches.items():
            if writers[s] is not None and not ws.complete():
                hit[s] = classify(ws, writers[s], run_ns, text)
                self.kills[s] += 1
                self.phases[s][hit[s]] += 1
        return hit


def final_run(runner: Runner, art: Path, plan: Plan, run_timeout: float) -> dict[str, Any]:
    """The last run, to completion, and every check of the fault run against the reference."""
    proc, log = runner.start(art, "final")
    try:
        proc.wait(timeout=run_timeout)
    except subprocess.TimeoutExpired:
        killpg(proc)
    resumed = re.findall(r"\[(\w+)\] resumed from checkpoint at step (\d+)", log.read_text(errors="replace"))
    all_completed = proc.returncode == 0 and all(w.complete() for w in plan.watches.values())
    ref = art.parent / "reference"
    cmp = compare(ref, art, plan.order)
    problems = check_consistency(art)
    tracking = mlflow_problems(art)
    curves = loss_history_diffs(ref, art, plan.order)
    return {"final_exit": proc.returncode, "final_run_resumed": {s: int(k) for s, k in resumed},
            "all_completed": all_completed, **cmp, "consistent": not problems, "problems": problems,
            "mlflow_problems": tracking, "loss_histories_identical": not curves, "loss_history_diffs": curves,
            "ok": all_completed and cmp["metrics_identical"] and cmp["outputs_identical"] and not problems
            and not tracking and not curves}


def build_report(c: Campaign, final: dict[str, Any], cfg: str, overrides: list[str], seed: int,
                 seconds: float, workdir: Path) -> dict[str, Any]:
    order, n = c.plan.order, c.runner.n
    return {
        "config": str(cfg), "overrides": overrides, "seed": seed, "kills_per_stage_requested": c.kills_per_stage,
        "stages": order, "target_order": c.plan.targets,
        "kills_per_stage": {s: c.kills[s] for s in order},
        "aimed_kills_per_stage": {s: c.aimed[s] for s in order},
        "phases_hit": {s: dict(c.phases[s]) for s in order},
        "phases_total": dict(sum(c.phases.values(), Counter())),
        "kills_total": len(c.records), "misses": c.misses,
        "reopened": {s: c.reopened[s] for s in order if c.reopened[s]},
        "runs": n, "runs_detail": {"reference": 1, "killed": len(c.records), "other": n - 2 - len(c.records),
                                   "final": 1},
        "failures": c.failures, **final,
        "reference_seconds": round(c.plan.seconds, 1),
        "windows": {s: {k: round(v, 3) for k, v in c.plan.windows[s].items()} for s in order},
        "seconds": round(seconds, 1), "workdir": str(workdir), "kills": c.records,
    }


def _prepare(config: str | Path, workdir: Path | None, snapshot: bool, overrides: list[str]
             ) -> tuple[Path, Path, Runner, str]:
    """(config path, workdir, runner, config as the children see it)."""
    config = Path(config)
    if not config.is_absolute():
        config = (ROOT / config) if (ROOT / config).exists() else config.resolve()
    workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="baton-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    if snapshot:
        shutil.rmtree(workdir / "code", ignore_errors=True)
        cwd, cfg = snapshot_code(workdir / "code", config)
    else:
        cwd, cfg = ROOT, str(config)
    for d in ("reference", "faulty"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    return config, workdir, Runner(cwd, cfg, overrides, workdir / "prefect", logs), cfg


def run_harness(config: str | Path, kills_per_stage: int = 1, overrides: list[str] | None = None, seed: int = 0,
                workdir: Path | None = None, snapshot: bool = True, out: Path | None = None,
                run_timeout: float = 900.0, keep: bool = True, echo: Callable[[str], None] | None = print) -> dict:
    """Reference run, kill loop, final run (see the module docstring); returns the report."""
    t_start = time.monotonic()
    say = echo or (lambda m: None)
    overrides = list(overrides or [])
    config, workdir, runner, cfg = _prepare(config, workdir, snapshot, overrides)
    workers = (runner.cwd / "flows" / "worker.py").exists()  # each stage executes in its own process
    ref, art = workdir / "reference", workdir / "faulty"

    say(f"[faults] reference run ({cfg} {' '.join(overrides)}) -> {ref}")
    plan = reference_run(runner, ref, art, config, workers, run_timeout)
    say(f"[faults] reference: {plan.seconds:.1f}s; windows (s): " + ", ".join(
        f"{s} total={w['total']:.2f} interval={w['interval']:.2f} post={w['post']:.2f}"
        for s, w in ((s, plan.windows[s]) for s in plan.order)))
    campaign = Campaign(plan, runner, art, kills_per_stage, workers, random.Random(seed), run_timeout, say)
    campaign.run()
    say("[faults] final run to completion")
    final = final_run(runner, art, plan, run_timeout)
    report = build_report(campaign, final, cfg, overrides, seed, time.monotonic() - t_start, workdir)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    say(f"[faults] {report['kills_total']} kills, per stage {report['kills_per_stage']} (aimed "
        f"{report['aimed_kills_per_stage']}), {report['misses']} missed, reopened {report['reopened']}, "
        f"{report['runs']} runs, all completed: {report['all_completed']}, metrics identical: "
        f"{report['metrics_identical']}, outputs identical: {report['outputs_identical']}, loss curves identical: "
        f"{report['loss_histories_identical']}, consistent: {report['consistent']}, {report['seconds']:.0f}s")
    if not keep and report["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every run")
    p.add_argument("--kills-per-stage", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--workdir", type=Path, help="default: a new temp dir (kept)")
    p.add_argument("--no-snapshot", action="store_true", help="run the working tree's code, not a copy")
    p.add_argument("--run-timeout", type=float, default=900.0)
    a = p.parse_args(argv)
    rep = run_harness(a.config, a.kills_per_stage, a.overrides, a.seed, a.workdir, not a.no_snapshot, a.out,
                      a.run_timeout)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
