"""Full-state checkpoints and weight files.

A checkpoint is a directory ``checkpoints/<step:08d>/`` holding
  model.safetensors   the model's state dict (safetensors: no pickle)
  state.pt            the rest of the training state (stages.train.state.TrainState: optimizer, scheduler,
                      RNG states, step, ...; plain tensors/containers: loads with ``torch.load(weights_only=True)``)
  best.json           (keep_best only) the best checkpoint's step as of this one: kept from pruning
  manifest.json       sizes + sha256 of the two files, written last
It is written to a temp name (``.<step>.tmp-<pid>/``, stages.fsio.temp_path), fsynced, then renamed into
place, so a kill during the write leaves either the previous checkpoint or the new one, never a half one. ``latest()``
verifies the manifest and falls back to the previous checkpoint (with a warning) when the newest
is corrupt."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stages.contract import StageError
from stages.fsio import _fsync_file, checkpoint_steps, fsync_dir, is_temp_name, sha256_file, temp_owner, temp_path

log = logging.getLogger("baton")


MODEL_FILE, STATE_FILE, MANIFEST, BEST = "model.safetensors", "state.pt", "manifest.json", "best.json"


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): copy the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        if key in seen or not v.is_contiguous():
            v = v.clone().contiguous()
        seen.add(key)
        out[k] = v.cpu() if v.device.type != "cpu" else v
    return out


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a pid-tagged temp *directory*: safetensors itself writes through a temp file (.tmpXXXXXX) next to its
    # target, which a kill would leave behind in outputs/; inside this dir it goes with the dir
    tmp_dir = temp_path(path)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / path.name
        save_file(_untie(state), str(tmp), metadata=metadata)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise StageError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StageError(f"cannot read weights {path}: {e} (truncated or not a safetensors file?)") from e


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True,
              ignore: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``model``; mismatched shapes/missing keys are an error naming the tensors.
    Keys starting with a prefix in ``ignore`` may be missing/unexpected (a re-initialised head).
    Returns the names of the model tensors that were not loaded."""
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape and not k.startswith(ignore)]
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if strict and missing:
        problems.append(f"missing in checkpoint: {missing[:10]}" + (f" (+{len(missing) - 10})" if len(missing) > 10 else ""))
    if strict and unexpected:
        problems.append(f"not in model: {unexpected[:10]}" + (f" (+{len(unexpected) - 10})" if len(unexpected) > 10 else ""))
    if problems:
        raise StageError(f"weights from {source} do not fit the model ({type(model).__name__}): " + " | ".join(problems))
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return [k for k in own if k not in loadable]


@dataclass
class Checkpoint:
    step: int
    path: Path

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model = load_weights(self.path / MODEL_FILE)
        state = torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        return model, state


class CheckpointManager:
    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def steps(self) -> list[int]:
        return checkpoint_steps(self.root)

    def path_of(self, step: int) -> Path:
        return self.root / f"{step:08d}"

    def save(self, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> Path:
        """``train_state["best"]`` (keep_best: {"step", "metric", "value"}) protects that checkpoint from
        pruning for as long as this one is kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_of(step)
        tmp = temp_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file(_untie(model_state), str(tmp / MODEL_FILE))
            torch.save({**train_state, "step": step}, tmp / STATE_FILE)
            if train_state.get("best"):
                (tmp / BEST).write_text(json.dumps(train_state["best"]))
            files = {}
            for name in (MODEL_FILE, STATE_FILE):
                _fsync_file(tmp / name)
                files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            with open(tmp / MANIFEST, "w") as f:
                json.dump({"step": step, "files": files}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
        except OSError as e:  # e.g. ENOSPC: drop the half-written temp dir; the previous checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(e.errno, f"cannot write checkpoint step {step} into {self.root}: "
                                   f"{e.strerror or e} (kept: steps {self.steps() or 'none'})") from e
        if final.exists():  # a rerun reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self._prune()
        return final

    def best_steps(self, steps: list[int]) -> set[int]:
        """The best checkpoints that the checkpoints ``steps`` point at (their best.json)."""
        out = set()
        for s in steps:
            try:
                out.add(int(json.loads((self.path_of(s) / BEST).read_text())["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return out

    def _prune(self) -> None:
        steps = self.steps()
        kept = steps[-self.keep:]
        protected = set(kept) | self.best_steps(kept)
        for s in steps:
            if s not in protected:
                shutil.rmtree(self.path_of(s), ignore_errors=True)
        for p in self.root.iterdir():
            if is_temp_name(p.name) and temp_owner(p.name) != os.getpid():
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at ``path`` is intact, else what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return f"no readable manifest ({e})"
        for name, meta in manifest.get("files", {}).items():
            f = path / name
            if not f.exists():
                return f"{name} missing"
            if f.stat().st_size != meta["size"]:
                return f"{name} has {f.stat().st_size} bytes, manifest says {meta['size']}"
            if sha256_file(f) != meta["sha256"]:
                return f"{name} sha256 differs from manifest"
        return None

    def latest(self) -> Checkpoint | None:
        """Newest intact checkpoint; a corrupt newer one is skipped with a warning."""
        for step in reversed(self.steps()):
            path = self.root / f"{step:08d}"
            problem = self.verify(path)
            if problem is None:
                return Checkpoint(step, path)
            log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", path, problem)
        return None
