"""runtime.compile (checkpoints keep the uncompiled keys; resume works across compile on/off) and the
prefetch thread (same batches in the same order, errors reach the loop, a stopped reader ends)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.config.train import TrainConfig
from stages.train.checkpoint import load_weights
from stages.train.loop import fit
from stages.train.prefetch import Prefetcher, read_ahead
from stages.train.step import TrainStep
from tests.stages.train.test_loop import Data, Toy, ctx_for, loss_fn


def _fit(path, steps, compile_, crash_at=None, dataset=None):
    model = Toy()
    model.body[1].p = 0.0  # compiled dropout draws its masks its own way: not comparable with eager ones
    blocks, head = model.blocks()
    ctx = ctx_for(path, compile=compile_)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=0.05)
    res = fit(ctx, model, dataset or Data(), None, loss_fn(crash_at), cfg, blocks, head)
    return model, res, ctx


@pytest.mark.slow
def test_compiled_run_checkpoints_plain_keys_and_resumes_into_the_unbroken_result(tmp_path):
    """In a fresh interpreter: torch.compile leaves threads in its process after which forking ranks fails
    ("autograd's threading in combination with fork"), and the DDP tests later in this pytest process fork
    theirs. (Stage processes never compile and then fork: their ranks start from the stage process.)"""
    root = Path(__file__).resolve().parents[3]
    p = subprocess.run([sys.executable, "-c", "import pathlib, sys; from tests.stages.train.test_compile_prefetch "
                        "import compiled_case; compiled_case(pathlib.Path(sys.argv[1]))", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


def compiled_case(tmp_path):
    # compile on for the first 7 steps (killed at step 7), off for the resume: the checkpoint at step 5
    # holds the uncompiled keys and the finished run equals an unbroken uncompiled one
    with pytest.raises(BaseException):
        _fit(tmp_path / "c", 10, True, crash_at=7)
    ckpt = load_weights(tmp_path / "c" / "checkpoints" / "00000005" / "model.safetensors")
    assert set(ckpt) == set(Toy().state_dict()), "a compiled run must write the uncompiled state dict"
    resumed, res, _ = _fit(tmp_path / "c", 10, False)
    assert res.resumed_from == 5
    unbroken, _, _ = _fit(tmp_path / "u", 10, False)
    for (k, a), b in zip(resumed.state_dict().items(), unbroken.state_dict().values()):
        # the compiled kernels may round differently from eager ones: equal to float tolerance
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k
    # and compile on again for a resume of a plain run: the loop runs compiled from a plain checkpoint
    with pytest.raises(BaseException):
        _fit(tmp_path / "d", 10, False, crash_at=7)
    again, res2, _ = _fit(tmp_path / "d", 10, True)
    assert res2.resumed_from == 5 and res2.train_loss < 1.2


class Flaky(Data):
    """The same data, saying its reads may run in a prefetch thread."""
    prefetchable = True


def test_prefetcher_yields_the_same_batches_in_order_and_raises_the_readers_error():
    assert list(Prefetcher(iter(range(50)), depth=2)) == list(range(50))

    def bad():
        yield 1
        yield 2
        raise ValueError("unreadable region row 7")
    p = Prefetcher(bad())
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(ValueError, match="region row 7"):
        next(p)


def test_closed_prefetcher_stops_reading():
    reads = []

    def endless():
        i = 0
        while True:
            reads.append(i)
            yield i
            i += 1
    p = Prefetcher(endless(), depth=2)
    assert next(p) == 0
    time.sleep(0.2)
    p.close()
    n = len(reads)
    time.sleep(0.2)
    # depth in the queue, the one in hand and one the reader may have started as close() drained the queue
    assert len(reads) <= n + 1 and n <= 6, "the reader reads at most depth (+ the one in hand) ahead"
    assert not p._thread.is_alive()


def test_prefetched_training_equals_unprefetched_bitwise(tmp_path):
    # only a dataset that says prefetchable is read ahead, and with workers nothing is (they read ahead)
    assert isinstance(read_ahead(iter([]), Flaky(), 0), Prefetcher)
    assert not isinstance(read_ahead(iter([]), Data(), 0), Prefetcher)
    assert not isinstance(read_ahead(iter([]), Flaky(), 2), Prefetcher)
    seen = []
    orig = TrainStep.start

    def spy(self, step):
        orig(self, step)
        seen.append(type(self.batches).__name__)
    TrainStep.start = spy
    try:
        a, _, _ = _fit(tmp_path / "a", 12, False, dataset=Flaky())
    finally:
        TrainStep.start = orig
    assert seen == ["Prefetcher"]
    b, _, _ = _fit(tmp_path / "b", 12, False, dataset=Data())
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
