"""The artifact store: one directory per (stage, fingerprint).

    artifacts/stages/<stage>/<fingerprint[:16]>/
        config.json   resolved config + everything that went into the fingerprint
        checkpoints/  full training state (stages.train.checkpoint)
        outputs/      weights, tokenizer, region features, reports
        run.json      the MLflow run id of this stage's execution (a resumed stage continues it)
        result.json   written last, atomically: its presence means "complete"
        .lock         flock()ed while a process works here; the kernel drops it when the process
                      dies, so a lock left by a killed run is never stale. A store shared by several
                      machines adds a PostgreSQL lease first (flows.lease); ``probe_store`` checks that
                      such a store keeps the promises this layout relies on.
"""
from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.lease import hostname, lease_db
from stages.contract import StageResult
from stages.fsio import (checkpoint_steps, is_temp_name, remove_path, temp_owner, temp_path, temps_of,
                         write_json_atomic)

log = logging.getLogger("baton")
LOCK_PID = "pid="  # .lock holds "pid=<pid> host=<host>" of the process that holds (or last held) it

def describe_state(state: str, step: int | None) -> str:
    """``StageDir.state()`` in words: complete / partial at step k / started, no checkpoint / not started."""
    if state == "partial":
        return f"partial at step {step}"
    return "started, no checkpoint" if state == "started" else state


class StageDir:
    def __init__(self, root: Path, stage: str, fingerprint: str):
        self.stage, self.fingerprint = stage, fingerprint
        self.path = Path(root) / "stages" / stage / fingerprint[:16]
        if self.path.resolve().parent.parent != (Path(root) / "stages").resolve():  # recipe.STAGE_NAME keeps it so
            raise ValueError(f"stage name {stage!r} leaves the artifact store {Path(root) / 'stages'}")

    def result(self) -> StageResult | None:
        f = self.path / "result.json"
        if not f.exists():
            return None
        res = StageResult.model_validate_json(f.read_text())
        if res.fingerprint != self.fingerprint:
            log.warning("%s: result.json has fingerprint %s, expected %s; ignoring it", self.path, res.fingerprint[:16],
                        self.fingerprint[:16])
            return None
        missing = [k for k, v in res.outputs.items() if not (Path(v) if Path(v).is_absolute() else self.path / v).exists()]
        if missing:
            log.warning("%s: result.json lists outputs %s that are gone; the stage will run again", self.path, missing)
            return None
        return res

    def write_result(self, res: StageResult) -> None:
        write_json_atomic(self.path / "result.json", res.model_dump(mode="json"))

    def write_config(self, payload: dict[str, Any], resolved: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "config.json", {"stage": self.stage, "fingerprint": self.fingerprint,
                                                      "resolved": resolved, "fingerprint_inputs": payload})

    def at(self, path: Path) -> StageDir:
        """The same stage and fingerprint in another directory (a forced rerun's temp directory)."""
        other = copy.copy(self)
        other.path = Path(path)
        return other

    def run_id(self) -> str | None:
        f = self.path / "run.json"
        return json.loads(f.read_text()).get("mlflow_run_id") if f.exists() else None

    def save_run_id(self, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "run.json", {"mlflow_run_id": run_id})

    def remove_stale_temps(self) -> list[Path]:
        """Delete temp files/dirs that killed writers left behind, here and next to this directory (a forced
        rerun's, flows.execute). Call it holding :meth:`lock`: then no other process writes here, so every
        temp name is garbage (a complete stage keeps none)."""
        removed = []
        candidates = [p for d in temp_dirs(self.path) for p in d.iterdir()] + temps_of(self.path)
        for p in candidates:
            if is_temp_name(p.name) and temp_owner(p.name) != os.getpid():
                remove_path(p)
                removed.append(p)
        if removed:
            log.info("[%s] removed %d temp file(s) left by an interrupted run: %s", self.stage, len(removed),
                     ", ".join(str(p.relative_to(self.path.parent)) for p in removed[:5]))
        return removed

    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(self.path / "checkpoints")

    def state(self) -> tuple[str, int | None]:
        """(complete | partial | started | not started, the step: the result's steps or the newest checkpoint)."""
        res = self.result()
        if res is not None:
            steps = res.info.get("steps")
            return "complete", int(steps) if isinstance(steps, (int, float)) else None
        steps = self.checkpoint_steps() if (self.path / "checkpoints").is_dir() else []  # (imports torch)
        if steps:
            return "partial", steps[-1]
        return ("started" if self.path.exists() else "not started"), None

    def status(self) -> str:
        return describe_state(*self.state())

    @contextmanager
    def lock(self, poll: float = 2.0, on_lost: Callable[[], None] | None = None) -> Iterator[None]:
        """Exclusive lock on this stage directory. A second process waits (and says so). When the store is
        shared by several machines (flows.lease: ``BATON_LOCK_DB``), a PostgreSQL lease is taken first, keyed
        by the directory's absolute path (every node mounts the store at the same path); ``on_lost`` runs if that
        lease is taken over while held (flows.lease)."""
        url = lease_db()
        if url is None:
            with self._flock(poll):
                yield
            return
        from flows.lease import stage_lease

        with stage_lease(url, str(self.path.resolve()), self.stage, min(poll, 1.0), on_lost), self._flock(poll):
            yield

    @contextmanager
    def _flock(self, poll: float) -> Iterator[None]:
        fd = self._open_lock()
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waited:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                        log.info("[%s] another process holds %s (%s); waiting for it", self.stage, self.path, holder)
                        waited = True
                    time.sleep(poll)
                    continue
                if _is_file(fd, self.path / ".lock"):
                    break
                os.close(fd)  # `baton gc` removed the dir while we waited for its lock: lock the dir anew
                fd = self._open_lock()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{LOCK_PID}{os.getpid()} host={hostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _open_lock(self) -> int:
        self.path.mkdir(parents=True, exist_ok=True)
        return os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)


def _is_file(fd: int, path: Path) -> bool:
    """Whether open file ``fd`` is the file at ``path`` now (not one renamed away or deleted)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


# ------------------------------------------------------------------------------ the store seen from outside
# (reports, the fault harness): read-only, without knowing the fingerprint a directory belongs to


def stage_paths(artifacts: Path) -> dict[str, list[Path]]:
    """{stage: its directories (one per fingerprint)} in the store under ``artifacts``."""
    out: dict[str, list[Path]] = {}
    for d in sorted((Path(artifacts) / "stages").glob("*/*")):
        if d.is_dir():
            out.setdefault(d.parent.name, []).append(d)
    return out


def temp_dirs(stage_path: Path) -> list[Path]:
    """The directories of a stage directory that writers put temp names in: itself, checkpoints/,
    outputs/ and the folders in outputs/ (those that exist)."""
    stage_path = Path(stage_path)
    dirs = [stage_path, stage_path / "checkpoints", stage_path / "outputs"]
    try:
        dirs += [d for d in (stage_path / "outputs").iterdir() if d.is_dir() and not is_temp_name(d.name)]
    except OSError:
        pass
    return [d for d in dirs if d.is_dir()]


def lock_holder(stage_path: Path) -> int | None:
    """The pid of the process that holds, or last held, the stage directory's lock."""
    try:
        text = (Path(stage_path) / ".lock").read_text()
    except OSError:
        return None
    word = text.split(" ", 1)[0]
    return int(word[len(LOCK_PID):]) if word.startswith(LOCK_PID) and word[len(LOCK_PID):].isdigit() else None


def read_result(stage_path: Path) -> StageResult | None:
    """The stage directory's result.json as written (None if absent); raises ValueError if it does not parse."""
    f = Path(stage_path) / "result.json"
    try:
        text = f.read_text()
    except FileNotFoundError:
        return None
    return StageResult.model_validate_json(text)


def resolved_config(stage_path: Path) -> dict[str, Any]:
    """The resolved stage config recorded in the stage directory's config.json."""
    return json.loads((Path(stage_path) / "config.json").read_text())["resolved"]


# ------------------------------------------------------------------------------ a shared store's promises


class StoreError(OSError):
    """The artifacts root cannot hold a store (names the root and the promise it broke)."""


def probe_store(root: Path) -> None:
    """Check that ``root`` keeps the promises the store relies on, on this machine: a file written, fsynced
    and renamed into place reads back whole under its new name and is gone under the old one; a rename over an
    existing file replaces it (result.json); a directory renames with its contents (checkpoints). FUSE-mounted
    buckets fail this (no atomic rename); NFS v4, Lustre and CephFS pass. Run it on every node that writes the
    store (the cluster runner calls it per node). Raises StoreError naming ``root`` and what failed."""
    root = Path(root)
    tag = f"{hostname()}-{os.getpid()}-{time.time_ns()}"
    d = root / "tmp" / f"store-probe-{tag}"
    step = f"create {d}"
    try:
        d.mkdir(parents=True)
        payload = os.urandom(1 << 16)
        for name, data in (("a", payload), ("b", payload[::-1])):
            step = f"write and fsync {d / name}"
            tmp = temp_path(d / name)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            step = f"rename {tmp.name} to {name}"
            os.replace(tmp, d / "a")  # the second one replaces the first
            if tmp.exists():
                raise StoreError(f"{root}: after {step}, the old name still exists (rename is not atomic)")
            if (d / "a").read_bytes() != data:
                raise StoreError(f"{root}: after {step}, {d / 'a'} does not read back what was written")
        step = f"rename the directory {d.name}"
        moved = d.with_name(d.name + "-moved")
        os.replace(d, moved)
        if d.exists() or (moved / "a").read_bytes() != payload[::-1]:
            raise StoreError(f"{root}: after {step}, its contents are not where the rename put them")
        d = moved
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(f"{root} cannot hold a baton store: {step} failed: {e.strerror or e}") from None
    finally:
        remove_path(d)
