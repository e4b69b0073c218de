"""Digests of a stage's external inputs (DESIGN.md "Fingerprints"): what the fingerprint's ``data`` holds.

- ``weights`` (checkpoints, tokenizers, vocabularies), and any input that is a single file: sha256 of the
  content of every file, so a same-size file copied over with ``cp -p`` / ``rsync -a`` (size and mtime
  kept) is seen. A file's hash is cached by (path, size, mtime_ns, ctime_ns, inode) in a small JSON file
  (``$BATON_DIGEST_CACHE``, default ``~/.cache/baton/sha256.json``), so reruns do not read the weights again;
  ctime cannot be set back by ``os.utime``, so an in-place replacement always misses the cache.
- ``dataset`` folders: each file's relative name, size, mtime_ns and ctime_ns (a multi-GB tree digests
  in seconds, and an in-place replacement changes ctime).
- a name that is not a local path: a torchvision weights name digests as the name plus the download URL
  (which carries the weights' hash prefix); a Hugging Face hub id as the id plus the commit of the locally
  cached snapshot when there is one (no network is asked: an id not downloaded yet digests as
  ``not cached``, so its first download reruns the stage once, now pinned to that commit).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.contract import ExternalInput
from stages.fsio import sha256_file, write_json_atomic


def cache_file(name: str = "sha256.json") -> Path:
    """The digest cache ``name`` (sha256.json: file hashes, code.json: module code digests), next to
    ``$BATON_DIGEST_CACHE`` (default ``~/.cache/baton/sha256.json``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baton" / "sha256.json"
    return Path(os.environ.get("BATON_DIGEST_CACHE") or default).with_name(name) if name != "sha256.json" \
        else Path(os.environ.get("BATON_DIGEST_CACHE") or default)


class _HashCache:
    """{absolute path: [size, mtime_ns, ctime_ns, inode, sha256]}, read once, written (atomically, merged
    with what other processes wrote meanwhile) only when something new was hashed."""

    def __init__(self, path: Path) -> None:
        self.path, self.new = path, {}
        self.entries = self._read()

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, f: Path) -> str:
        return self.get(f, sha256_file)

    def get(self, f: Path, compute: Callable[[Path], Any], tag: str = "") -> Any:
        """``compute(f)`` (JSON-serialisable), cached under the file's path + ``tag`` and its stamp."""
        st = f.stat()
        key, stamp = str(f.resolve()) + tag, [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self.entries.get(key)
        if isinstance(hit, list) and hit[:4] == stamp:
            return hit[4]
        value = compute(f)
        self.entries[key] = self.new[key] = stamp + [value]
        return value

    def save(self) -> None:
        if not self.new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {**self._read(), **self.new})
        except OSError:  # a read-only home: the digests are still right, only slower next time
            pass
        self.new = {}


def _files(root: Path) -> list[Path]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [Path(d) / f for f in sorted(files)]
    return out


def _content_digest(p: Path, cache: _HashCache) -> str:
    if p.is_file():
        return cache.sha256(p)
    h = hashlib.sha256()
    for f in _files(p):
        h.update(f"{f.relative_to(p)}:{cache.sha256(f)}\n".encode())
    return h.hexdigest()


def tree_digest(p: Path) -> str:
    """A dataset folder: every file's relative name, size, mtime_ns, ctime_ns and inode."""
    h = hashlib.sha256()
    for f in _files(p):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n".encode())
    return h.hexdigest()


def _name_digest(inp: ExternalInput) -> dict[str, Any]:
    if inp.names == "torchvision":
        import torchvision

        try:
            return {"name": inp.value, "url": torchvision.models.get_weight(inp.value).url}
        except (ValueError, KeyError, AttributeError):
            return {"name": inp.value, "url": "unknown name"}
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(inp.value, "config.json")
    except ValueError:  # not a valid hub id either (huggingface_hub's HFValidationError)
        return {"name": inp.value, "revision": "invalid id"}
    commit = Path(hit).parent.name if isinstance(hit, str) else "not cached"
    return {"name": inp.value, "revision": commit}


def input_digest(inp: ExternalInput, cache: _HashCache) -> Any:
    p = Path(inp.value).expanduser()
    if not p.exists():
        return _name_digest(inp) if inp.names and not p.is_absolute() else "missing"
    if inp.kind == "dataset" and p.is_dir():
        return tree_digest(p)
    return _content_digest(p, cache)


def inputs_digest(inputs: dict[str, ExternalInput]) -> dict[str, Any]:
    """{config key: digest} of a stage's external inputs."""
    cache = _HashCache(cache_file())
    out = {k: input_digest(v, cache) for k, v in sorted(inputs.items())}
    cache.save()
    return out
