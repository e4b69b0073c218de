"""``baton gc``: free the disk of stage dirs nothing needs.

Two kinds of garbage:
  - a stage dir whose fingerprint no given recipe plans (an old config, old code, an old upstream);
  - ``checkpoints/`` of a complete stage (resume state; ``result.json`` and ``outputs/`` are what readers use).
Never removed: a dir a given recipe references (its checkpoints may go once it is complete), a dir with
activity within ``keep_days`` (its MLflow run started or ended then, or its files changed then), a dir
whose ``.lock`` a process holds, or, in a store shared by several machines (``BATON_LOCK_DB``, set from the
store's team server), whose PostgreSQL lease a live process anywhere holds: gc takes the lease itself (never
waiting) before it removes, as a stage run would before it writes (flows.lease). Removal renames to a store
temp name first, so a reader sees the whole dir or none of it; a killed gc leaves only a temp name that the
next gc (or the stage's own next run) deletes.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.lineage import Node, attach_mlflow, scan_store
from flows.store import stage_paths
from stages.fsio import flock_held, is_temp_name, pid_alive, temp_owner, temp_path
from stages.recipe import Recipe

log = logging.getLogger("baton")


@dataclass
class Garbage:
    path: Path
    what: str  # "stage dir" | "checkpoints" | "temp"
    bytes: int
    why: str


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def referenced(recipes: list[Recipe]) -> set[tuple[str, str]]:
    """{(stage, fingerprint[:16])} that the recipes plan now."""
    from flows.fingerprint import plan_fingerprints

    return {(name, plan.fingerprint[:16]) for r in recipes for name, plan in plan_fingerprints(r.stages).items()}


def _files_activity(path: Path, lock: bool = True) -> float:
    """Newest mtime of the stage's bookkeeping files (a run that takes the lock writes .lock), or 0."""
    names = ("config.json", "result.json", "run.json") + ((".lock",) if lock else ())
    return max([(path / f).stat().st_mtime for f in names if (path / f).exists()], default=0.0)


def last_activity(node: Node) -> float:
    """Newest of the node's MLflow run start/end and its files' mtimes (epoch seconds)."""
    times = [_files_activity(node.path), node.path.stat().st_mtime]
    if node.mlflow is not None:
        times += [t / 1000 for t in (node.mlflow.start_ms, node.mlflow.end_ms) if t]
    return max(times)


def _leftover_temps(artifacts: Path) -> list[Garbage]:
    """Stage dirs a killed gc renamed to a temp name (``.<fp16>.old-<pid>``) and did not delete."""
    return [Garbage(d, "temp", du(d), "left by an interrupted gc") for dirs in stage_paths(artifacts).values()
            for d in dirs if is_temp_name(d.name) and temp_owner(d.name) and not pid_alive(temp_owner(d.name))]


def _checkpoints_in_use(node: Node) -> bool:
    """A result output inside checkpoints/ keeps them (none of baton's stages does this today)."""
    res = (node.path / "result.json").read_text()
    return '"checkpoints/' in res


def find_garbage(artifacts: Path, recipes: list[Recipe], keep_days: float = 7.0, mlflow: bool = True,
                 now: float | None = None) -> list[Garbage]:
    """What gc would remove (locks are checked again when removing)."""
    artifacts = Path(artifacts)
    from flows.sweep import referenced_by_sweeps

    keep = referenced(recipes) | referenced_by_sweeps(artifacts)  # a recorded sweep's members count as recipes
    nodes = scan_store(artifacts)
    if mlflow:
        attach_mlflow(nodes, artifacts)
    cutoff = (now or time.time()) - keep_days * 86400
    out = _leftover_temps(artifacts)
    for n in nodes:
        if last_activity(n) >= cutoff or is_locked(n.path):
            continue
        if (n.stage, n.path.name) not in keep:
            out.append(Garbage(n.path, "stage dir", du(n.path), f"no recipe plans {n.stage}@{n.path.name}"))
        elif n.state == "complete" and (n.path / "checkpoints").is_dir() and not _checkpoints_in_use(n):
            out.append(Garbage(n.path / "checkpoints", "checkpoints", du(n.path / "checkpoints"),
                               f"{n.stage} is complete"))
    return out


def is_locked(stage_dir: Path) -> bool:
    """True when a process holds the stage's ``.lock`` (flows.store.StageDir.lock), or, in a shared store, a
    live process on any machine holds its lease."""
    if flock_held(stage_dir / ".lock"):
        return True
    with _removal_lease(stage_dir) as got:
        return not got


@contextmanager
def _removal_lease(stage_dir: Path) -> Iterator[bool]:
    """In a shared store (flows.lease.lease_db): hold the stage's lease while the block runs if it is free or
    its holder is dead (taken at once, never waited for); yields False when a live holder has it. Outside a
    shared store: True (the flock alone decides)."""
    from flows.lease import Lease, connect, ensure_schema, lease_db

    url = lease_db()
    if not url:
        yield True
        return
    lease = Lease(url, str(stage_dir.resolve()), f"gc {stage_dir.parent.name}/{stage_dir.name[:16]}")
    lease._conn = connect(url)
    got = False
    try:
        ensure_schema(lease._conn)
        got = lease.try_acquire()
        yield got
    finally:
        if got:
            lease.release()  # closes the connection
        else:
            lease._conn.close()


def _remove(g: Garbage, cutoff: float) -> bool:
    """Rename ``g.path`` to a temp name and delete it, holding the stage's lock. False when the lock is held,
    or when a run took and released it since ``find_garbage`` looked (its files are newer than ``cutoff``)."""
    if g.what == "temp":
        shutil.rmtree(g.path)
        return True
    stage_dir = g.path if g.what == "stage dir" else g.path.parent
    with _removal_lease(stage_dir) as got:
        if not got:
            log.info("gc: %s: a process on another machine holds its lease; kept", stage_dir)
            return False
        had_lock = (stage_dir / ".lock").exists()
        fd = os.open(stage_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("gc: %s is locked by a running process; kept", stage_dir)
                return False
            if _files_activity(stage_dir, lock=had_lock) >= cutoff:
                log.info("gc: %s was used just now; kept", stage_dir)
                return False
            tmp = temp_path(g.path, "old")
            os.rename(g.path, tmp)  # readers see the whole dir or none of it
        finally:
            os.close(fd)
    shutil.rmtree(tmp)
    return True


def collect(artifacts: Path, recipes: list[Recipe], keep_days: float = 7.0, dry_run: bool = False,
            mlflow: bool = True) -> tuple[list[Garbage], int]:
    """Find the garbage and (unless ``dry_run``) remove it. Returns (what was (or would be) removed, bytes)."""
    now = time.time()
    garbage = find_garbage(artifacts, recipes, keep_days, mlflow, now=now)
    if dry_run:
        return garbage, sum(g.bytes for g in garbage)
    done = [g for g in garbage if _remove(g, now - keep_days * 86400)]
    return done, sum(g.bytes for g in done)


def recipes_for_gc(paths: list[str | Path], configs_dir: Path = Path("configs")) -> list[Recipe]:
    """The recipes whose stage dirs gc keeps: ``paths``, or every ``*.yaml`` in ``configs_dir``. A file that
    does not load stops gc (skipping it would delete the dirs it references)."""
    from stages.recipe import RecipeError, load_recipe

    if not paths:
        paths = sorted(configs_dir.glob("*.yaml"))
        if not paths:
            raise RecipeError(f"gc: no recipes given and none in {configs_dir}/: name the recipes whose stages to keep")
    out = []
    for p in paths:
        try:
            out.append(load_recipe(p))
        except RecipeError as e:
            raise RecipeError(f"gc: {e}\n(gc keeps what the recipes reference, so it stops rather than skip {p})") \
                from None
    return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_garbage(garbage: list[Garbage], freed: int, dry_run: bool) -> str:
    lines = [f"  {_human(g.bytes):>10}  {g.what:<11} {g.path}  ({g.why})" for g in garbage]
    verb = "would free" if dry_run else "freed"
    return "\n".join(lines + [f"gc: {len(garbage)} item(s), {verb} {_human(freed)} ({freed} bytes)"])
