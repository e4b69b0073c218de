"""Read the next batches in a background thread while the training step runs.

The vision-language stages gather float16 region rows from memory maps per batch (stages.data.text_regions),
in the main process: without overlap the step waits for every read. A thread suffices (numpy's gather and
torch's pinning release the GIL, and so does a CUDA step waiting on the GPU); two DataLoader worker
processes measured slower, bound by the shared-memory transfer of the batches. Only a dataset that says
``prefetchable = True`` (its ``collate`` draws no random numbers and touches no global state) is read ahead:
batch k is then the same whichever thread builds it, so resume and determinism are unchanged."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class Prefetcher:
    """Wraps a batch iterator: ``next()`` returns what the iterator yields, in order, with up to ``depth``
    batches read ahead in a daemon thread. An exception in the reader is raised by the ``next()`` that
    reaches it. :meth:`close` stops the reader (it then reads at most one more batch)."""

    def __init__(self, batches: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(batches,), name="baton-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, batches: Iterator) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # unblock a reader waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def read_ahead(batches: Iterator, dataset: Any, num_workers: int) -> Iterator:
    """``batches`` wrapped in a :class:`Prefetcher` where that helps and is safe: a ``prefetchable``
    dataset read in the main process (``num_workers == 0``; workers already read ahead)."""
    if num_workers == 0 and getattr(dataset, "prefetchable", False):
        return Prefetcher(batches)
    return batches
