"""One stage on N ranks (DDP): what the shared loop and the stage recipes ask of the process group.

A multi-rank stage is N processes started by :mod:`stages.train.launch` (``torch.distributed`` elastic
launch used as a library). Every rank runs the stage's ``run(ctx)`` up to the end of ``fit``; the ranks
other than 0 then leave (:class:`RankDone`) and rank 0 alone evaluates, writes outputs and result.json.

World-size independence (a 2-rank run equals the 1-rank run at the same global batch):
  - the sampler yields the *global* micro-batches of each step; rank r takes slice r of each
    (:func:`rank_slice`), and :func:`set_positions` records where its examples sit in the step's batch;
  - per-example randomness comes from :func:`example_random` keyed by (seed, step, position in the step's
    batch, stream), never from a stream shared by a micro-batch or a process;
  - token-level losses are scaled by :func:`global_token_mean` to "sum over the global batch / global
    token count" (DDP averages gradients over ranks);
  - each rank's process RNG (dropout) is seeded from (seed, rank) by :func:`rank_seed`: rank 0 keeps the
    stage seed, so a 1-rank run is unchanged.
Without a process group every helper here is the identity (the 1-rank path is the code of before)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_positions: torch.Tensor | None = None  # positions in the step's global batch of this rank's current micro-batch
last_digests: list[str] = []  # every rank's weights digest at the end of training (rank order; 1 rank: empty)


class RankDone(BaseException):
    """Raised on ranks > 0 when training is over: they leave, rank 0 finishes the stage alone. Not an
    Exception, so no ``except Exception`` in a stage recipe swallows it."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int, r: int) -> int:
    """Process-RNG seed of rank ``r``: the stage seed on rank 0, a distinct stream on every other rank."""
    return seed if r == 0 else (seed * 1_000_003 + 7_919 * r) % (1 << 63)


def init(device: torch.device, timeout_s: float) -> None:
    """Join the process group that the launcher's environment describes (gloo on CPU, nccl on CUDA). The
    group's keys go under a prefix per elastic restart: after a restart the agent's store still holds the
    previous attempt's addresses, which a new rank would otherwise try to connect to."""
    from torch.distributed.rendezvous import rendezvous

    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    timeout = timedelta(seconds=timeout_s)
    store, r, n = next(rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"baton/attempt-{attempt}/", store), rank=r,
                            world_size=n, timeout=timeout, **kw)


def leave() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def rank_slice(items: list, r: int | None = None, n: int | None = None) -> list:
    """Rank ``r``'s contiguous share of a global micro-batch (every share has the same size)."""
    r, n = (rank(), world()) if r is None else (r, n)
    k = len(items) // n
    return items[r * k:(r + 1) * k]


def set_positions(start: int, count: int) -> None:
    """The current micro-batch of this rank holds positions ``start .. start+count-1`` of the step's batch."""
    global _positions
    _positions = torch.arange(start, start + count)


def _to_i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _M1, _M2 = (_to_i64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(keys: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, length) int64: element j of row i is SplitMix64's j-th output for seed i
    (wrapping int64 arithmetic), a counter-based generator: a row's prefix does not depend on ``length``."""
    x = keys[:, None] + (torch.arange(1, length + 1, dtype=torch.int64) * _GAMMA)[None, :]
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


class ExampleRandom:
    """Per-example random draws for optimizer step ``step``: row i of every draw comes from a counter-based
    generator (SplitMix64, vectorised over the batch) keyed by (seed, step, position of example i in the step's
    global batch, stream), so an example gets the same draws whichever rank, micro-batch or padded length it
    lands in. Each call names its own ``stream`` (a mask draw, a replacement-token draw, ...), so the length of
    one draw never shifts another."""

    def __init__(self, seed: int, step: int, positions: torch.Tensor):
        self.seed, self.step, self.positions = seed, step, positions

    def key(self, i: int, stream: int) -> int:
        """The seed of example ``i``'s draws of ``stream``."""
        return ((((self.seed * 1_000_003 + self.step) * 1_000_033 + int(self.positions[i])) * 131 + stream)
                % (1 << 63))

    def _bits(self, length: int, stream: int) -> torch.Tensor:
        base = _to_i64(((self.seed * 1_000_003 + self.step) * 1_000_033) % (1 << 64))
        keys = (self.positions.to(torch.int64) + base) * 131 + stream  # wrapping int64: distinct per (position, stream)
        return _splitmix64(keys, length)

    def rand(self, length: int, stream: int) -> torch.Tensor:
        """(B, length) uniform [0, 1) float32 on the CPU (24 random bits each)."""
        return _srl(self._bits(length, stream), 40).to(torch.float32) * (1.0 / (1 << 24))

    def randint(self, high: int, length: int, stream: int) -> torch.Tensor:
        """(B, length) integers in [0, high) on the CPU (53 random bits modulo ``high``)."""
        return _srl(self._bits(length, stream), 11) % high


def example_random(seed: int, step: int, batch_len: int) -> ExampleRandom:
    """The :class:`ExampleRandom` of the current micro-batch (``batch_len`` examples) of step ``step``.
    Outside the training loop (no positions recorded) the examples are positions 0..batch_len-1."""
    pos = _positions if _positions is not None and len(_positions) == batch_len else torch.arange(batch_len)
    return ExampleRandom(seed, step, pos)


def global_token_mean(local_mean: torch.Tensor, local_count: int | torch.Tensor) -> torch.Tensor:
    """A token-level loss averaged over this rank's ``local_count`` tokens -> the same loss as this rank's
    share of "sum over the global micro-batch / global token count", times the world size (DDP averages the
    gradients over ranks). One rank: ``local_mean`` itself."""
    if not active():
        return local_mean
    n = torch.as_tensor(local_count, dtype=torch.float64, device=local_mean.device).reshape(())
    total = n.clone()
    dist.all_reduce(total)
    return local_mean * (n * world() / total.clamp_min(1)).to(local_mean.dtype)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The global micro-batch of a per-example tensor (no gradient): every rank's rows in rank order."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def mean_over_ranks(x: torch.Tensor | float) -> torch.Tensor | float:
    """The mean over ranks of a scalar (log lines: the global batch's loss)."""
    if not active():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return (t / world()).cpu()


def all_gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters (names, dtypes, shapes and bytes). Buffers are left out: BatchNorm's
    running statistics of the last forward are each rank's own (rank 0's are the ones saved)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.named_parameters():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def local_device(requested: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under a CUDA launch, else ``requested``."""
    if requested.type == "cuda":
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(d)
        return d
    return requested


def seed_rank(seed: int) -> None:
    """Seed this rank's process RNGs (python, numpy, torch: dropout) from (seed, rank); rank 0 keeps the
    streams the stage seeding gave it (a 1-rank run is unchanged)."""
    r = rank()
    if r == 0:
        return
    import random

    import numpy as np

    s = rank_seed(seed, r)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)
