"""The stage contract (DESIGN.md "The stage contract").

A stage kind is one module exposing a pydantic config model (subclass of :class:`StageConfig`) and
``run(ctx: StageContext) -> StageResult``. Nothing here imports Prefect or MLflow: tracking goes
through the :class:`Tracker` interface."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("baton")


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Runtime(Strict):
    """Settings that do not change the result. Left out of the fingerprint."""

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 / fp16 = autocast on CUDA; fp16 also scales the loss (GradScaler, checkpointed)")
    channels_last: bool = False
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None = torch default)")
    log_every: int = Field(20, ge=1, description="steps between metric/progress lines")
    checkpoint_every: int = Field(100, ge=1, description="steps between full-state checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="keep the newest N checkpoints")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    oom_retry: bool = Field(True, description="CUDA OOM: retry the step with half the micro-batch, twice the accumulation")
    cache_images_mb: float = Field(2048.0, ge=0, description="decoded-image cache budget (MiB) per stage: a dataset "
                                                             "whose decoded pixels fit is decoded once and kept in RAM, "
                                                             "a larger one is decoded per item in DataLoader workers")
    # one stage on several devices (torch.distributed.run) and on a cluster (Ray): where, not what
    nproc_per_node: int | None = Field(None, ge=1, description="ranks of this stage on one node (DDP through "
                                                                "torch.distributed.run); None = runtime.gpus, else 1")
    nnodes: int = Field(1, ge=1, description="nodes this stage spans (--cluster only: one Ray task per node, "
                                             "c10d rendezvous)")
    max_restarts: int = Field(0, ge=0, description="elastic restarts of a multi-rank stage before it fails")
    compile: bool = Field(False, description="torch.compile the model in the training loop (checkpoints keep "
                                             "the uncompiled state dict)")
    gpus: float = Field(0, ge=0, description="GPUs per node this stage asks the cluster for (--cluster)")
    cpus: float = Field(1, ge=0, description="CPUs per node this stage asks the cluster for (--cluster)")
    memory_gb: float = Field(0, ge=0, description="memory per node this stage asks the cluster for (--cluster)")
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="custom Ray resources per node this stage asks the cluster for "
                                          "(--cluster), e.g. {a100: 1} for nodes started with "
                                          "`ray start --resources '{\"a100\": 8}'`")

    @model_validator(mode="after")
    def _ranks_agree(self) -> "Runtime":
        if self.nproc_per_node is not None and self.gpus and self.nproc_per_node != self.gpus:
            raise ValueError(f"nproc_per_node is {self.nproc_per_node} but gpus is {self.gpus:g}: runtime.gpus is "
                             "the default for runtime.nproc_per_node; set one, or make them equal")
        return self

    @property
    def ranks(self) -> int:
        """Ranks per node: nproc_per_node, else the GPUs asked for, else 1."""
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return max(1, int(self.gpus))


@dataclass(frozen=True)
class ExternalInput:
    """A file or folder outside the artifact store that a stage reads (or a weights *name*).

    ``kind`` decides how the fingerprint digests it (flows.fingerprint.input_digest): ``weights``
    (checkpoints, tokenizers, vocabularies) by content, sha256 of every file; ``dataset`` folders by each
    file's name, size, mtime and ctime (a multi-GB tree digests in seconds), a dataset file by content.
    ``names`` says what a value that is not a local path means: a torchvision weights name or a
    Hugging Face hub model id (None: always a path)."""

    value: str
    kind: Literal["dataset", "weights"] = "dataset"
    names: Literal["torchvision", "hf_hub"] | None = None


def external_path(kind: Literal["dataset", "weights"], names: Literal["torchvision", "hf_hub"] | None = None,
                  **field_kwargs: Any) -> Any:
    """A config field naming an external input: ``init: str | None = external_path("weights", "torchvision")``.
    The marker is what :meth:`StageConfig.external_inputs` finds and what the recipe resolves against
    the recipe file's folder (stages.recipe.resolve_paths)."""
    return Field(None, json_schema_extra={"baton_external": {"kind": kind, "names": names}}, **field_kwargs)


def _marked_inputs(model: BaseModel, prefix: str = "") -> dict[str, ExternalInput]:
    out: dict[str, ExternalInput] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        marker = (info.json_schema_extra or {}).get("baton_external") if isinstance(info.json_schema_extra, dict) else None
        if marker and value is not None:
            out[f"{prefix}{name}"] = ExternalInput(str(value), **marker)
        elif isinstance(value, BaseModel):
            out.update(_marked_inputs(value, f"{prefix}{name}."))
    return out


class StageConfig(Strict):
    """Fields every stage block has. Subclasses add the stage kind's own typed fields."""

    kind: str
    needs: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="torch.manual_seed's range")
    runtime: Runtime = Field(default_factory=Runtime)

    @model_validator(mode="after")
    def _check_ranks(self) -> "StageConfig":
        """Several ranks (DDP) need the shared training loop and a global batch that splits evenly into
        ranks x micro-batches: refused here, before anything runs."""
        n = self.runtime.ranks * self.runtime.nnodes
        if n == 1:
            return self
        ranks = f"runtime.nproc_per_node={self.runtime.ranks}" + (
            f" x runtime.nnodes={self.runtime.nnodes}" if self.runtime.nnodes > 1 else "")
        train = getattr(self, "train", None)
        if not hasattr(train, "batch_size") or not hasattr(train, "grad_accum"):
            raise ValueError(f"{ranks}: stage kind {self.kind!r} does not train with the shared "
                             "loop, it runs in one process (set runtime.nproc_per_node: 1, runtime.nnodes: 1)")
        if train.batch_size % (train.grad_accum * n):
            raise ValueError(f"train.batch_size={train.batch_size} does not split into {ranks} "
                             f"ranks x train.grad_accum={train.grad_accum} micro-batches of equal size")
        return self

    def upstream_refs(self) -> dict[str, str]:
        """Config fields that name an upstream stage: {dotted.field: stage}. Checked against needs."""
        return {}

    def ref_outputs(self) -> dict[str, str]:
        """{field: output key} for fields of :meth:`upstream_refs` that need a particular output of the stage
        they name; checked against that stage's :meth:`declared_outputs` when the recipe is validated."""
        return {}

    def declared_outputs(self) -> set[str] | None:
        """The output keys this stage will produce, when the config alone tells (None = not known before run)."""
        return None

    def external_inputs(self) -> dict[str, ExternalInput]:
        """Every file or folder outside the artifact store this stage reads, by dotted config key: digested
        into the fingerprint and resolved against the recipe's folder when the recipe is read. The default
        collects the fields declared with :func:`external_path` (none: ``{}``); a kind whose inputs are
        not plain fields overrides it."""
        return _marked_inputs(self)

    def fingerprint_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"runtime"})


class StageResult(BaseModel):
    """Small and JSON-serialisable. Paths are relative to the stage dir (or absolute)."""

    model_config = ConfigDict(protected_namespaces=())

    stage: str
    kind: str
    fingerprint: str
    outputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    baselines: dict[str, float] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: Any, key: str, step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...


class NullTracker:
    """Tracker used when a stage runs without MLflow (``python -m stages``, GPU benchmarks)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass


class StageError(Exception):
    """A config or data error: clear message, not retried."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the step the stage reached and its newest checkpoint (where a rerun resumes).
    A KeyboardInterrupt, so whatever already handles one (cleanup, exit status 130) handles this too."""

    def __init__(self, stage: str, step: int, steps: int, checkpoint: int | None):
        super().__init__(stage, step, steps, checkpoint)
        self.stage, self.step, self.steps, self.checkpoint = stage, step, steps, checkpoint

    def __str__(self) -> str:
        last = f"last checkpoint at step {self.checkpoint}" if self.checkpoint else "no checkpoint yet"
        return f"stage {self.stage!r} interrupted at step {self.step}/{self.steps}, {last}"


@dataclass
class StageContext:
    name: str
    config: StageConfig
    stage_dir: Path
    upstream: dict[str, StageResult]
    upstream_dirs: dict[str, Path]
    fingerprint: str
    tracker: Any = field(default_factory=NullTracker)
    device: Any = None  # torch.device, resolved by resolve_device
    checkpoints: Any = None  # stages.train.checkpoint.CheckpointManager: made by the training loop when unset
    reads: set[tuple[str, str]] = field(default_factory=set)  # (upstream stage, output key) read through input()

    def __post_init__(self) -> None:
        self.stage_dir = Path(self.stage_dir)
        if self.device is None:
            self.device = resolve_device(self.config.runtime)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def outputs(self) -> Path:
        p = self.stage_dir / "outputs"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def input(self, stage: str, key: str) -> Path:
        """Path of output ``key`` of upstream ``stage``."""
        if stage not in self.upstream:
            raise StageError(f"stage {self.name!r}: upstream {stage!r} is not in needs {sorted(self.upstream)}")
        res = self.upstream[stage]
        if key not in res.outputs:
            raise StageError(f"stage {self.name!r}: upstream {stage!r} has no output {key!r} (has {sorted(res.outputs)})")
        p = Path(res.outputs[key])
        self.reads.add((stage, key))
        return p if p.is_absolute() else self.upstream_dirs[stage] / p

    def result(self, outputs: dict[str, str], metrics: dict[str, float], baselines: dict[str, float] | None = None,
               info: dict[str, Any] | None = None) -> StageResult:
        return StageResult(stage=self.name, kind=self.config.kind, fingerprint=self.fingerprint,
                           outputs=outputs, metrics={k: float(v) for k, v in metrics.items()},
                           baselines={k: float(v) for k, v in (baselines or {}).items()}, info=info or {})


def resolve_device(runtime: Runtime):
    import torch

    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    dev = runtime.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"runtime.device={runtime.device!r} but CUDA is not available on this machine")
    return torch.device(dev)


def seed_stage(config: StageConfig) -> None:
    """Seed Python, NumPy and torch from the stage's seed right before its ``run``, so its random init
    does not depend on what ran earlier in the process (a resumed pipeline skips complete stages).
    ``runtime.deterministic`` also turns on ``torch.use_deterministic_algorithms``. These are process-wide,
    which is why the flow runs every executing stage in its own process (flows.worker)."""
    import random

    import numpy as np
    import torch

    random.seed(config.seed)
    np.random.seed(config.seed % (1 << 32))
    torch.manual_seed(config.seed)
    if config.runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
