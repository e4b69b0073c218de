"""Fault injection: SIGKILL ``baton run`` inside every stage, rerun, and check nothing was lost.

    python -m flows.faults configs/vlp-micro.yaml [dotted.key=value ...] --kills-per-stage 20 --out report.json

1. A reference run, uninterrupted, in its own artifacts dir. A watcher records when each stage
   takes its lock, writes each checkpoint and ``result.json``: the windows the kills aim at.
2. In a second artifacts dir, ``python -m flows.cli run CONFIG`` again and again, each time SIGKILLed
   (its whole process group: the CLI, its stage processes and Prefect's server; a SIGSTOP first freezes
   it at that instant while the harness notes what was executing) while the *target* stage executes:
   the first stage (recipe order) of the run that starts executing, is not complete and has had fewer
   than N kills aimed at it. Each kill aims at one phase of the stage, chosen in rotation (seeded delays):
     startup     a random moment before anything is written
     train       a random moment between checkpoints (after 0-2 new ones)
     checkpoint  while ``checkpoints/.tmp-<step>-<pid>/`` exists (a checkpoint write)
     regions     while ``outputs/regions.tmp-<pid>/`` exists (the region-feature store write)
     outputs     as soon as this run writes into ``outputs/`` (world: ``outputs.tmp-<pid>/``)
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
edits to the working tree during a long run do not change fingerprints halfway through.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.fsio import sha256_file

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"(?:^|\.)(?:tmp|old)-(?:\d+-)?(\d+)$")  # atomic writers' temp names; group 1 = writer pid
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
        try:
            m = re.match(r"pid=(\d+)", (self.path / ".lock").read_text())
        except OSError:
            return None
        return int(m.group(1)) if m else None

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

    def temps(self, pid: int) -> list[str]:
        """Temp entries of writer ``pid`` (relative names) in the stage dir, checkpoints/, outputs/, outputs/*/."""
        out = []
        for d in self._dirs():
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                m = TEMP.search(e.name)
                if m and int(m.group(1)) == pid:
                    out.append(str(Path(e.path).relative_to(self.path)))
        return out

    def _dirs(self) -> list[Path]:
        dirs = [self.path, self.path / "checkpoints", self.path / "outputs"]
        try:
            dirs += [Path(e.path) for e in os.scandir(self.path / "outputs") if e.is_dir() and not TEMP.search(e.name)]
        except OSError:
            pass
        return dirs

    def writing(self, subdir: str, prefix: str, run_pid: int) -> list[str]:
        """Temp entries ``prefix*-<pid>`` in one directory whose writer belongs to run ``run_pid``: the
        cheap probe the harness busy-polls while waiting for a write that lasts milliseconds."""
        try:
            entries = os.scandir(self.path / subdir) if subdir else os.scandir(self.path)
            names = [e.name for e in entries if e.name.startswith(prefix)]
        except OSError:
            return []
        out = []
        for n in names:
            m = TEMP.search(n)
            if m and in_run(int(m.group(1)), run_pid):
                out.append(n)
        return out

    def checkpoints(self) -> dict[int, int]:
        """{step: mtime_ns} of the published checkpoint dirs."""
        try:
            return {int(e.name): e.stat().st_mtime_ns for e in os.scandir(self.path / "checkpoints")
                    if e.name.isdigit()}
        except OSError:
            return {}

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
    """``pid`` is the run's CLI process or one of its children (start_new_session: the CLI leads the group)."""
    if pid is None:
        return False
    if pid == run_pid:
        return True
    try:
        return os.getpgid(pid) == run_pid
    except OSError:
        return False


def classify(w: Watch, pid: int, active_ns: int, log_text: str) -> str:
    """What the kill interrupted, from what the stage directory shows afterwards (``pid``: the writer)."""
    if w.complete():
        return "complete"
    temps = w.temps(pid)
    names = [Path(t).name for t in temps]
    if any(n.startswith(".result.json.tmp-") for n in names):
        return "result-write"
    if any(t.startswith("checkpoints/") for t in temps):
        return "checkpoint-write"
    if any(n.startswith(("regions.tmp-", "regions.old-")) for n in names):
        return "regions-write"
    if any(t.startswith("outputs") for t in temps) or w.outputs_touched_since(active_ns):
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
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
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
        if not ts:  # world: the generation into outputs.tmp-<pid> is the window
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


def stage_dirs(artifacts: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for d in sorted((artifacts / "stages").glob("*/*")):
        if d.is_dir():
            out.setdefault(d.parent.name, []).append(d)
    return out


def check_consistency(artifacts: Path) -> list[str]:
    """Problems in the stage directories (empty = consistent)."""
    from stages.train.checkpoint import CheckpointManager

    problems = []
    for stage, dirs in stage_dirs(artifacts).items():
        for d in dirs:
            rel = d.relative_to(artifacts)
            res_f = d / "result.json"
            if res_f.exists():
                try:
                    res = json.loads(res_f.read_text())
                except ValueError as e:
                    problems.append(f"{rel}/result.json does not parse: {e}")
                    continue
                for k, v in res.get("outputs", {}).items():
                    p = Path(v) if Path(v).is_absolute() else d / v
                    if not p.exists():
                        problems.append(f"{rel}: result.json lists output {k}={v}, which is missing")
                    elif p.is_dir() and not any(p.iterdir()):
                        problems.append(f"{rel}: output {k}={v} is an empty directory")
                leftovers = [str(p.relative_to(d)) for p in d.rglob("*") if TEMP.search(p.name)]
                if leftovers:
                    problems.append(f"{rel}: complete, but temp leftovers {leftovers[:5]}")
                if (d / "regions").exists() or (d / "outputs" / "regions").exists():
                    reg = d / "outputs" / "regions"
                    if reg.exists() and not (reg / "index.json").exists():
                        problems.append(f"{rel}: outputs/regions has no index.json")
            mgr = CheckpointManager(d / "checkpoints")
            for step in mgr.steps():
                why = mgr.verify(d / "checkpoints" / f"{step:08d}")
                if why is not None:
                    problems.append(f"{rel}/checkpoints/{step:08d}: {why}")
    return problems


def tracked_runs(artifacts: Path) -> tuple[Any, dict[str, list[str]]]:
    """(MLflow client, {stage: run ids of its complete stage dirs}); (None, {}) without MLflow."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        return None, {}
    runs: dict[str, list[str]] = {}
    for stage, dirs in stage_dirs(artifacts).items():
        for d in dirs:
            f = d / "result.json"
            rid = json.loads(f.read_text()).get("info", {}).get("mlflow_run_id") if f.exists() else None
            if rid:
                runs.setdefault(stage, []).append(rid)
    return MlflowClient(tracking_uri=f"sqlite:///{artifacts.resolve() / 'mlflow.db'}"), runs


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


def compare(ref: Path, got: Path, stages: list[str]) -> dict[str, Any]:
    metric_diffs, output_diffs, missing = {}, {}, []
    for s in stages:
        a, b = ref / "stages" / s, got / "stages" / s
        ra = [json.loads(f.read_text()) | {"_dir": f.parent} for f in a.glob("*/result.json")]
        rb = [json.loads(f.read_text()) | {"_dir": f.parent} for f in b.glob("*/result.json")]
        if len(ra) != 1 or len(rb) != 1:
            missing.append(f"{s}: {len(ra)} reference / {len(rb)} fault-run result.json")
            continue
        ra, rb = ra[0], rb[0]
        d = {}
        if ra["fingerprint"] != rb["fingerprint"]:
            d["fingerprint"] = [ra["fingerprint"][:16], rb["fingerprint"][:16]]
        for key in ("metrics", "baselines"):
            for k in sorted(set(ra[key]) | set(rb[key])):
                va, vb = ra[key].get(k), rb[key].get(k)
                if va != vb:
                    d[f"{key}.{k}"] = [va, vb]
        if d:
            metric_diffs[s] = d
        da, db = output_digests(ra["_dir"], ref), output_digests(rb["_dir"], got)
        diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
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


def run_harness(config: str | Path, kills_per_stage: int = 1, overrides: list[str] | None = None, seed: int = 0,
                workdir: Path | None = None, snapshot: bool = True, out: Path | None = None,
                run_timeout: float = 900.0, keep: bool = True, echo: Callable[[str], None] | None = print) -> dict:
    t_start = time.monotonic()
    say = echo or (lambda m: None)
    config = Path(config)
    if not config.is_absolute():
        config = (ROOT / config) if (ROOT / config).exists() else config.resolve()
    overrides = list(overrides or [])
    rng = random.Random(seed)
    workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="baton-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    if snapshot:
        code = workdir / "code"
        shutil.rmtree(code, ignore_errors=True)
        cwd, cfg = snapshot_code(code, config)
    else:
        cwd, cfg = ROOT, str(config)
    runner = Runner(cwd, cfg, overrides, workdir / "prefect", logs)
    workers = (cwd / "flows" / "worker.py").exists()  # each stage executes in its own process
    ref, art = workdir / "reference", workdir / "faulty"
    for d in (ref, art):
        shutil.rmtree(d, ignore_errors=True)

    # 1. reference
    say(f"[faults] reference run ({cfg} {' '.join(overrides)}) -> {ref}")
    proc, log = runner.start(ref, "reference")
    # the stage dirs only exist once the run reaches them: watch whatever appears
    t0 = time.monotonic()
    tl: dict[str, Timeline] = {}
    watches_ref: dict[str, Watch] = {}
    while proc.poll() is None and time.monotonic() - t0 < run_timeout:
        for d in (ref / "stages").glob("*/*") if (ref / "stages").exists() else []:
            if d.parent.name not in watches_ref:
                watches_ref[d.parent.name] = Watch(d.parent.name, d, None)
                tl[d.parent.name] = Timeline()
        now = time.monotonic() - t0
        for s, w in watches_ref.items():
            t = tl[s]
            if t.done is not None:
                continue
            if t.active is None and w.executing(proc.pid, workers) is not None:
                t.active = now
            if t.active is None:
                continue
            for step in w.checkpoints():
                t.checkpoints.setdefault(step, now)
            gen = any(Path(x).name.startswith("outputs.tmp-") for x in w.temps(w.lock_pid() or -1))
            if t.outputs_tmp is None and gen:
                t.outputs_tmp = now
            if t.outputs_tmp is not None and t.outputs_tmp_end is None and not gen:
                t.outputs_tmp_end = now
            if w.complete():
                t.done = now
        time.sleep(0.003)
    if proc.poll() is None:
        killpg(proc)
        raise RuntimeError(f"reference run did not finish in {run_timeout}s (log: {log})")
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed with exit {proc.returncode}:\n{log.read_text()[-4000:]}")
    ref_seconds = time.monotonic() - t0
    kinds, watches, windows = {}, {}, {}
    # targets in the order the stages started in the reference run: stages that run at the same time
    # (cnn and bert, caption and vqa) are targeted one right after the other, before either completes
    order = [s for s, _ in sorted(((s, t.active or 0.0) for s, t in tl.items()), key=lambda x: x[1])]
    targets = list(order)
    for s in order:
        (d,) = [p for p in (ref / "stages" / s).iterdir() if p.is_dir()]
        conf = json.loads((d / "config.json").read_text())["resolved"]
        steps = conf.get("train", {}).get("steps") if isinstance(conf.get("train"), dict) else None
        kinds[s] = conf["kind"]
        watches[s] = Watch(s, art / "stages" / s / d.name, steps)
        windows[s] = tl[s].windows(steps)
    # recipe order (the config's stage order is a topological order the flow also uses)
    try:
        import yaml

        raw = yaml.safe_load(config.read_text())
        rorder = [s for s in raw["stages"] if s in watches]
        order = rorder + [s for s in order if s not in rorder]
    except Exception:  # noqa: BLE001 - keep activation order
        pass
    say(f"[faults] reference: {ref_seconds:.1f}s; windows (s): " + ", ".join(
        f"{s} total={windows[s]['total']:.2f} interval={windows[s]['interval']:.2f} post={windows[s]['post']:.2f}"
        for s in order))

    # 2. kill loop
    plan = kill_plan({s: kinds[s] for s in order}, kills_per_stage)  # rotation offsets in recipe order
    kills: Counter = Counter()  # every kill that interrupted the stage
    aimed: Counter = Counter()  # the ones aimed at it (a concurrent stage's kills come on top)
    phases: dict[str, Counter] = {s: Counter() for s in order}
    records: list[dict] = []
    misses = 0
    failures: list[str] = []
    max_attempts = kills_per_stage * len(order) * 3 + 10
    attempts = 0
    reopened: Counter = Counter()
    while attempts < max_attempts:
        for s in targets:
            # a short stage can finish in a run whose kill came too late (a missed millisecond window): it
            # still needs kills, so its directory goes and it runs again from scratch; downstream stages
            # keep theirs (same fingerprint) and the final comparison shows the rerun changed nothing
            if aimed[s] < kills_per_stage and watches[s].complete():
                shutil.rmtree(watches[s].path)
                reopened[s] += 1
                say(f"[faults] {s} completed with {aimed[s]} of {kills_per_stage} kills: removed "
                    f"{watches[s].path} so it runs again")
        wanted = [s for s in targets if aimed[s] < kills_per_stage]
        if not wanted:
            break
        attempts += 1
        run_ns = time.time_ns()  # files this run writes are newer; the killed runs' are older
        proc, log = runner.start(art, "kill")
        t_run = time.monotonic()
        run_pid = proc.pid

        def pick() -> str | None:  # the first stage that starts executing and still needs kills is the target
            for s in targets:
                if aimed[s] < kills_per_stage and watches[s].executing(run_pid, workers) is not None:
                    return s
            return None

        target = wait_for(proc, pick, run_timeout)
        if target in ("exited", "timeout"):
            if target == "timeout":
                killpg(proc)
            failures.append(f"run {runner.n}: {target} before any of {wanted} started (exit {proc.returncode}); "
                            f"log {log}")
            if proc.returncode not in (0, None):
                break
            continue
        w = watches[target]
        wp = w.executing(run_pid, workers)  # the stage's writer: its process, or the CLI
        aim = plan[target][min(aimed[target], len(plan[target]) - 1)]
        win = windows[target]
        start_ckpts = w.checkpoints()
        final_done = lambda: w.steps is not None and any(s >= w.steps for s in w.checkpoints())  # noqa: E731
        if aim in ("train", "checkpoint", "eval") and (w.steps is None or final_done()):
            aim = "eval" if w.steps is not None else "outputs"  # nothing left to train in this stage
        detail: dict[str, Any] = {}
        miss = w.complete
        if aim == "startup":
            # half the reference's startup: a resumed stage or one that no longer shares the cores boots
            # faster, and a later kill could find it already complete
            delay = rng.uniform(0, 0.5 * win["startup"])
            r = wait_for(proc, lambda: False, delay, miss=miss)
            r = True if r == "timeout" else r
            detail["delay"] = round(delay, 4)
        elif aim == "train":
            j = rng.choice([0, 1, 2])
            new = lambda: sum(1 for s, t in w.checkpoints().items() if start_ckpts.get(s) != t)  # noqa: E731
            r = wait_for(proc, lambda: new() >= j or final_done(), run_timeout, miss=miss)
            if r is True:
                delay = rng.uniform(0, 0.7 * win["interval"])
                r = wait_for(proc, lambda: False, delay, miss=miss)
                r = True if r == "timeout" else r
                detail |= {"after_new_checkpoints": j, "delay": round(delay, 4)}
        elif aim == "checkpoint":
            j = rng.choice([1, 2])
            seen: set[str] = set()

            def ckpt_write() -> bool:
                for t in w.writing("checkpoints", ".tmp-", run_pid):
                    if t not in seen:
                        seen.add(t)
                        step = int(t.split("-")[1])
                        if len(seen) >= j or (w.steps is not None and step >= w.steps):
                            return True
                return False

            r = wait_for(proc, ckpt_write, run_timeout, poll=0.0001, miss=miss)
            detail["nth_write"] = j
        elif aim == "regions":
            regions_tmp = w.path / "outputs" / f"regions.tmp-{wp}"
            r = wait_for(proc, regions_tmp.exists, run_timeout, poll=0.0, miss=miss)
        elif aim == "outputs":
            if w.steps is None:  # world: somewhere inside the generation
                r = wait_for(proc, (w.path / f"outputs.tmp-{wp}").exists, run_timeout, poll=0.0005, miss=miss)
                if r is True:
                    delay = rng.uniform(0, 0.5 * win["interval"])  # the generation's speed varies with load
                    r = wait_for(proc, lambda: False, delay, miss=miss)
                    r = True if r == "timeout" else r
                    detail["delay"] = round(delay, 4)
            else:
                r = wait_for(proc, lambda: w.outputs_touched_since(run_ns) or
                             any(t.startswith("outputs") for t in w.temps(wp)), run_timeout, poll=0.0005, miss=miss)
        elif aim == "eval":
            r = wait_for(proc, final_done, run_timeout, miss=miss)
            if r is True:
                delay = rng.uniform(0, 0.7 * win["post"])
                r = wait_for(proc, lambda: False, delay, miss=miss)
                r = True if r == "timeout" else r
                detail["delay"] = round(delay, 4)
        elif aim == "result":
            # the write lasts about one fsync (~1 ms): poll the one name it has, without sleeping
            result_tmp = w.path / f".result.json.tmp-{wp}"
            r = wait_for(proc, result_tmp.exists, run_timeout, poll=0.0, miss=miss)
        else:
            raise ValueError(aim)
        if r == "exited":
            failures.append(f"run {runner.n} ({target}/{aim}): exited {proc.returncode} before the kill; log {log}")
            if proc.returncode != 0:
                break
            continue
        # freeze the whole run first (takes effect as fast as SIGKILL, and nothing runs afterwards), note
        # which stages its processes were executing (they must still exist for that), then kill
        try:
            os.killpg(run_pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        writers = {s: ws.executing(run_pid, workers) for s, ws in watches.items()}
        killpg(proc)
        t_kill = time.monotonic() - t_run
        text = log.read_text(errors="replace")
        hit = {}
        for s, ws in watches.items():
            if writers[s] is not None and not ws.complete():
                ph = classify(ws, writers[s], run_ns, text)
                hit[s] = ph
                kills[s] += 1
                phases[s][ph] += 1
        missed = r == "missed" or target not in hit
        misses += missed
        aimed[target] += not missed
        rec = {"run": runner.n, "target": target, "aim": aim, "missed": missed, "after_s": round(t_kill, 2),
               "hit": hit, "wait": r if isinstance(r, str) else "event"} | detail
        records.append(rec)
        say(f"[faults] run {runner.n}: kill aimed at {target}/{aim} after {t_kill:.1f}s -> "
            + (", ".join(f"{s}:{p}" for s, p in hit.items()) or "nothing running") + (" (missed)" if missed else ""))

    # 3. final run to completion
    say("[faults] final run to completion")
    proc, log = runner.start(art, "final")
    try:
        proc.wait(timeout=run_timeout)
    except subprocess.TimeoutExpired:
        killpg(proc)
    final_rc = proc.returncode
    final_log = log.read_text(errors="replace")
    resumed = re.findall(r"\[(\w+)\] resumed from checkpoint at step (\d+)", final_log)
    all_completed = final_rc == 0 and all(w.complete() for w in watches.values())
    cmp = compare(ref, art, order)
    problems = check_consistency(art)
    tracking = mlflow_problems(art)
    curves = loss_history_diffs(ref, art, order)
    report = {
        "config": str(cfg), "overrides": overrides, "seed": seed, "kills_per_stage_requested": kills_per_stage,
        "stages": order,
        "target_order": targets,
        "kills_per_stage": {s: kills[s] for s in order},
        "aimed_kills_per_stage": {s: aimed[s] for s in order},
        "phases_hit": {s: dict(phases[s]) for s in order},
        "phases_total": dict(sum(phases.values(), Counter())),
        "kills_total": len(records),
        "misses": misses,
        "reopened": {s: reopened[s] for s in order if reopened[s]},
        "runs": runner.n,
        "runs_detail": {"reference": 1, "killed": len(records), "other": runner.n - 2 - len(records), "final": 1},
        "failures": failures,
        "final_exit": final_rc,
        "final_run_resumed": {s: int(k) for s, k in resumed},
        "all_completed": all_completed,
        **cmp,
        "consistent": not problems,
        "problems": problems,
        "mlflow_problems": tracking,
        "loss_histories_identical": not curves,
        "loss_history_diffs": curves,
        "ok": all_completed and cmp["metrics_identical"] and cmp["outputs_identical"] and not problems
        and not tracking and not curves,
        "reference_seconds": round(ref_seconds, 1),
        "windows": {s: {k: round(v, 3) for k, v in windows[s].items()} for s in order},
        "seconds": round(time.monotonic() - t_start, 1),
        "workdir": str(workdir),
        "kills": records,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    say(f"[faults] {report['kills_total']} kills, per stage {report['kills_per_stage']} (aimed "
        f"{report['aimed_kills_per_stage']}), {misses} missed, reopened {report['reopened']}, {runner.n} runs, "
        f"all completed: {all_completed}, metrics identical: {cmp['metrics_identical']}, outputs identical: "
        f"{cmp['outputs_identical']}, loss curves identical: {not curves}, consistent: {not problems}, "
        f"{report['seconds']:.0f}s")
    if not keep and report["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.faults", description=__doc__,
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
