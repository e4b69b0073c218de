"""Start one stage as N ranks on this node: ``torch.distributed.launcher`` (torchrun's elastic agent) used as
a library, gloo on CPU, nccl on CUDA (each rank pinned to ``cuda:LOCAL_RANK``).

    res = run_ranks(ctx)                       # ctx.config.runtime.nproc_per_node > 1

The calling process becomes the elastic agent: it starts the ranks (forked on CPU; spawned on CUDA, so no
rank inherits a CUDA context), watches them, and on a rank's death stops the others and fails (after
``runtime.max_restarts`` elastic restarts, each resuming from the newest checkpoint). The ranks stay in the
caller's process group (a Ctrl-C or kill of the group reaches them) and die with it (PR_SET_PDEATHSIG).
Every rank runs the stage's ``run(ctx)``; rank 0 holds the tracker, the others a NullTracker, and the
stage's result comes back from rank 0 (see stages.train.distributed for what each rank does)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from stages import kind_module
from stages.contract import (NullTracker, StageContext, StageError, StageInterrupted, StageResult, resolve_device,
                             seed_stage)
from stages.fsio import checkpoint_steps

log = logging.getLogger("baton")
COLLECTIVE_TIMEOUT_S = float(os.environ.get("BATON_DDP_TIMEOUT_S", "1800"))  # a rank waiting longer fails


def _die_with_parent(title: str) -> None:
    """Get SIGKILLed when the launching process (the agent) dies, so no orphan rank keeps training; and show
    as ``title`` in ps/top (``<stage>-r<rank>``)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, ctypes.c_char_p(title.encode()[:15]))  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _spec(ctx: StageContext, tracker: Callable | None, error_file: str) -> dict:
    return {"name": ctx.name, "kind": ctx.config.kind, "config": ctx.config,
            "stage_dir": str(ctx.stage_dir), "upstream": {k: v.model_dump(mode="json") for k, v in ctx.upstream.items()},
            "upstream_dirs": {k: str(v) for k, v in ctx.upstream_dirs.items()}, "fingerprint": ctx.fingerprint,
            "tracker": tracker, "error_file": error_file, "device": str(ctx.device)}


def rank_main(spec: dict) -> dict | None:
    """One rank (the launcher's entry point): the stage's ``run`` on this rank; rank 0 returns the result."""
    import torch

    from stages.train import distributed

    r = int(os.environ["RANK"])
    _die_with_parent(f"{spec['name'][:10]}-r{r}")
    if os.getppid() == 1:  # the agent died before PR_SET_PDEATHSIG took hold
        os._exit(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the agent's handlers (fork)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO if r == 0 else logging.WARNING)
    cfg = spec["config"]
    device = distributed.local_device(torch.device(spec["device"]))
    resolve_device(cfg.runtime)  # its thread count
    distributed.init(device, COLLECTIVE_TIMEOUT_S)
    tracker = spec["tracker"]() if r == 0 and spec["tracker"] is not None else NullTracker()
    ctx = StageContext(name=spec["name"], config=cfg, stage_dir=Path(spec["stage_dir"]),
                       upstream={k: StageResult.model_validate(v) for k, v in spec["upstream"].items()},
                       upstream_dirs={k: Path(v) for k, v in spec["upstream_dirs"].items()},
                       fingerprint=spec["fingerprint"], tracker=tracker, device=device)
    seed_stage(cfg)
    try:
        res = kind_module(cfg.kind).run(ctx)
        tracker.flush()
        if distributed.last_digests:
            res.info["ranks"] = {"world_size": len(distributed.last_digests),
                                 "weights_sha256": distributed.last_digests}
        out = res.model_dump(mode="json")
        if spec.get("result_file"):  # several nodes: global rank 0 may be on another node than the launcher's
            _write_json(Path(spec["result_file"]), out)
        return out
    except distributed.RankDone:
        return None
    except StageError as e:  # the launcher says it as the stage's error (a config/data error: not retried)
        Path(spec["error_file"]).write_text(str(e))
        raise
    finally:
        distributed.leave()


def _write_json(path: Path, data: dict) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def nodes_result_file(stage_dir: Path) -> Path:
    """Where global rank 0 of a stage across several nodes leaves its result for the node that writes
    result.json (the torch agents' ranks are ordered by host and pid, not by node: it can be any node)."""
    return Path(stage_dir) / ".nodes-result.json"


def _start_method(ctx: StageContext) -> str:
    """fork on CPU (the ranks skip the imports), spawn on CUDA (no rank may inherit a CUDA context);
    ``BATON_RANK_START=spawn|fork`` overrides."""
    m = os.environ.get("BATON_RANK_START") or ("spawn" if ctx.device.type == "cuda" else "fork")
    if m not in ("spawn", "fork"):
        raise StageError(f"BATON_RANK_START={m!r}: expected 'spawn' or 'fork'")
    return m


def run_ranks(ctx: StageContext, tracker: Callable | None = None, nnodes: int = 1, rdzv_endpoint: str = "127.0.0.1:0",
              run_id: str | None = None, node_rank: int = 0, local_addr: str | None = None) -> StageResult:
    """Run stage ``ctx`` on ``runtime.nproc_per_node`` ranks; ``tracker()`` (picklable, e.g. a partial of a
    module-level function) opens rank 0's tracker. Returns rank 0's StageResult (None on the nodes that do not
    hold global rank 0). A rank's StageError is raised here as a StageError; a crashed or killed rank as
    RuntimeError; SIGINT as StageInterrupted. One node by default; a cluster runner calls this once per node
    with ``nnodes``, a shared ``rdzv_endpoint`` (host:port of a c10d store, hosted by ``node_rank`` 0's agent) and
    a shared ``run_id`` (``local_addr``: the address the other nodes reach this one at, else its FQDN); every node passes the same ``tracker`` (global rank 0 tracks, on whichever node it is)
    and global rank 0 also leaves its result in :func:`nodes_result_file` (the agents wait for each other
    before they return)."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rt = ctx.config.runtime
    n = rt.ranks
    if ctx.device.type == "cuda":
        import torch

        if torch.cuda.device_count() < n:
            raise StageError(f"stage {ctx.name!r}: runtime.nproc_per_node={n} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    with tempfile.TemporaryDirectory(prefix="baton-ranks-") as tmp:  # the agent's files and a rank's error
        config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=n,
                              run_id=run_id or f"baton-{ctx.name}-{os.getpid()}", rdzv_backend="c10d",
                              rdzv_endpoint=rdzv_endpoint, local_addr=local_addr or ("127.0.0.1" if nnodes == 1 else None),
                              rdzv_configs={"is_host": node_rank == 0},  # node 0's agent hosts the c10d store
                              max_restarts=rt.max_restarts, monitor_interval=0.2, start_method=_start_method(ctx),
                              logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")))
        log.info("[%s] launching %d ranks (%s, %s)", ctx.name, n, "nccl" if ctx.device.type == "cuda" else "gloo",
                 config.start_method)
        error_file = os.path.join(tmp, "error")
        spec = _spec(ctx, tracker, error_file)
        if nnodes > 1:
            spec["result_file"] = str(nodes_result_file(ctx.stage_dir))
        try:
            out = elastic_launch(config, rank_main)(spec)
        except ChildFailedError as e:
            if os.path.exists(error_file):
                raise StageError(Path(error_file).read_text()) from None
            first = next(iter(e.failures.values()), None)
            raise RuntimeError(f"stage {ctx.name!r}: a rank failed ({e.get_first_failure()[1].message if first else e})"
                               f"; rerun to resume from the newest checkpoint") from None
        except SignalException as e:
            steps = checkpoint_steps(ctx.stage_dir / "checkpoints")
            total = getattr(getattr(ctx.config, "train", None), "steps", 0)
            if e.sigval == signal.SIGINT:
                raise StageInterrupted(ctx.name, steps[-1] if steps else 0, total, steps[-1] if steps else None) from None
            raise
    first = next((v for v in out.values() if v is not None), None)  # local rank 0 of the node with global rank 0
    return StageResult.model_validate(first) if first is not None else None
