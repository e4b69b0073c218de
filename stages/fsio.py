"""Files that are whole or absent: atomic writes, fsync, content digests, and THE temp-name rule.

Every writer in baton (checkpoints, weights, JSON records, the region store) writes into a temp name
made by :func:`temp_name` and renames it into place; every cleaner and checker recognises those names
with :func:`is_temp_name` and the writer's pid with :func:`temp_owner`."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

# THE temp-name rule. A writer of ``x`` writes ``.x.tmp-<pid>`` (a replaced ``x`` is moved aside to
# ``.x.old-<pid>``) and renames it into place: hidden, so a reader's glob (``checkpoints/0*``) never
# sees a half-written entry. Recognised as well: names earlier versions wrote (``x.tmp-<pid>``,
# ``x.old-<pid>``, checkpoints' ``.tmp-<step>-<pid>``) and the Rust tempfile crate's ``.tmpXXXXXX``,
# which safetensors and tokenizers write through (its owner is unknown: None).
_TEMP_NAME = re.compile(r"\.?(?P<target>.+)\.(?:tmp|old)-(?P<pid>\d+)"  # x.tmp-<pid>, x.old-<pid>, .x.tmp-<pid>
                        r"|\.tmp-(?P<step>\d+)-(?P<step_pid>\d+)"  # checkpoints, as written before
                        r"|\.tmp[A-Za-z0-9]{6}")  # Rust tempfile (safetensors, tokenizers)


def temp_path(path: Path, tag: str = "tmp", pid: int | None = None) -> Path:
    """The name process ``pid`` (default: this one) writes ``path`` into before renaming it into place
    (``tag="old"``: where it moves a replaced ``path`` aside). Works for files and directories."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid() if pid is None else pid}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a file or directory name, no folders) is a writer's temp name."""
    return _TEMP_NAME.fullmatch(name) is not None


def temp_owner(name: str) -> int | None:
    """The pid of the process that writes temp name ``name``; None if unknown or not a temp name."""
    m = _TEMP_NAME.fullmatch(name)
    pid = m and (m.group("pid") or m.group("step_pid"))
    return int(pid) if pid else None


def temp_target(name: str) -> str | None:
    """The name temp name ``name`` will be renamed to (``x`` for ``x.tmp-<pid>``); None if unknown."""
    m = _TEMP_NAME.fullmatch(name)
    return (m.group("target") or m.group("step")) if m else None


def temps_of(path: Path) -> list[Path]:
    """Temp names of ``path`` next to it (``.x.tmp-<pid>``, ``.x.old-<pid>``), any writer's."""
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if temp_target(p.name) == path.name]


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def flock_held(path: Path) -> bool:
    """True while some process holds an flock on ``path`` (probed without blocking; False if no such file)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def remove_path(p: Path) -> None:
    """Delete a file or a directory tree (a temp left behind), whichever ``p`` is."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file, fsync, rename: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE): a reader sees the old
    ``b`` or the new one, never neither. False where the kernel or filesystem cannot do it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` in place of directory ``path`` (which may not exist) and delete the old one.
    The old one is whole until the new one is in place: exchanged atomically where the kernel can,
    else moved aside to its temp name (``.x.old-<pid>``) first."""
    new, path = Path(new), Path(path)
    old = temp_path(path, "old")
    if path.exists() and exchange_paths(new, path):
        os.rename(new, old)
    elif path.exists():
        os.rename(path, old)
        os.rename(new, path)
    else:
        os.rename(new, path)
    fsync_dir(path.parent)
    remove_path(old)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_outputs(stage_dir: Path, write) -> Any:
    """Run ``write(tmp_outputs_dir)`` then rename the folder to ``stage_dir/outputs`` (nothing
    half-written survives a failure or a kill: a stale temp dir (stages.fsio.temps_of) is removed next time)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / "outputs"
    for stale in temps_of(final):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # partial outputs of an earlier, interrupted run (result.json is the truth)
        shutil.rmtree(final)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        ret = write(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(stage_dir)
    return ret


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_steps(root: Path) -> list[int]:
    """The steps of the checkpoints under ``root`` (``<root>/<step:08d>/``), sorted; no torch import, so
    ``baton status`` lists them in milliseconds."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
