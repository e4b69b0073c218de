"""The resumable sampler: the batches of step k are a function of (seed, k) alone."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from stages.config.train import TrainConfig  # noqa: F401 - its config, re-exported
from stages.contract import StageError
from stages.train.distributed import rank_slice


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless seeded shuffling, step by step, starting at any step in O(1).

    Epoch e is ``randperm(n, seed + e)``; step b takes batch ``b % per_epoch`` of epoch
    ``b // per_epoch`` and yields it as ``accum`` micro-batches. Resuming at step k never replays the
    epoch it stopped in, and the examples of a step do not depend on ``accum`` (so an OOM retry with
    smaller micro-batches sees the same data). Under DDP (``world`` > 1) the micro-batches are the global
    ones and rank ``rank`` yields its contiguous slice of each (``batch_size`` must divide by
    ``accum * world``), so the examples of a step do not depend on the number of ranks either."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, total: int | None = None,
                 accum: int = 1, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise StageError(f"dataset has {n} examples, fewer than one batch of {batch_size}")
        self.n, self.bs, self.seed, self.start, self.total, self.accum = n, batch_size, seed, start, total, accum
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        epoch, perm = -1, None
        micro = -(-self.bs // self.accum)
        while self.total is None or b < self.total:
            e, i = divmod(b, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                perm, epoch = torch.randperm(self.n, generator=g).tolist(), e
            batch = perm[i * self.bs:(i + 1) * self.bs]
            for j in range(0, self.bs, micro):
                yield batch[j:j + micro] if self.world == 1 else rank_slice(batch[j:j + micro], self.rank, self.world)
            b += 1

    def __len__(self) -> int:
        return ((self.total - self.start) * self.accum) if self.total is not None else 1 << 62
