"""The shared loop: resume is exact, checkpoints are atomic and verified, transfer strategies do
what the config says, a non-finite loss stops the stage."""
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from stages.config.train import TrainConfig
from stages.contract import StageConfig, StageContext, StageError, StageInterrupted
from stages.train.checkpoint import CheckpointManager, load_weights, save_weights
from stages.train.loop import fit
from stages.train.sampler import ResumableBatchSampler


class Cfg(StageConfig):
    kind: str = "toy"


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def blocks(self):
        return [list(self.body[0].parameters()), list(self.body[3].parameters())], list(self.head.parameters())


class Data(torch.utils.data.Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def ctx_for(path, **runtime):
    rt = {"checkpoint_every": 5, "log_every": 5, "device": "cpu", "threads": 1} | runtime
    cfg = Cfg(runtime=rt)
    return StageContext(name="toy", config=cfg, stage_dir=path, upstream={}, upstream_dirs={}, fingerprint="t",
                        checkpoints=CheckpointManager(Path(path) / "checkpoints", keep=cfg.runtime.keep_checkpoints))


def loss_fn(crash_at=None):
    def f(model, batch, step):
        if step == crash_at:
            raise KeyboardInterrupt("simulated kill")
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), {}
    return f


def train(path, steps=12, crash_at=None, transfer=None, **kw):
    model = Toy()
    blocks, head = model.blocks()
    cfg = TrainConfig(steps=steps, batch_size=16, lr=0.05, transfer=transfer or {}, **kw)
    ctx = ctx_for(path)
    res = fit(ctx, model, Data(), None, loss_fn(crash_at), cfg, blocks, head)
    return model, res, ctx


def test_loss_goes_down_and_history_is_tracked(tmp_path):
    model, res, ctx = train(tmp_path / "a", steps=40)
    losses = [m["train/loss"] for _, m in ctx.tracker.metrics]
    assert losses[-1] < losses[0] * 0.8
    assert [s for s, _ in ctx.tracker.metrics] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_killed_and_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, caplog):
    ref, _, _ = train(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", crash_at=8)  # dies after the step-5 checkpoint
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [5]
    with caplog.at_level(logging.INFO, logger="baton"):
        resumed, res, _ = train(tmp_path / "run")
    assert res.resumed_from == 5 and "resumed from checkpoint at step 5" in caplog.text
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_ctrl_c_says_the_step_reached_and_the_checkpoint_a_rerun_resumes_from(tmp_path):
    with pytest.raises(StageInterrupted) as e:
        train(tmp_path, crash_at=8)  # SIGINT during step 9: 8 steps done, checkpoint at 5
    assert (e.value.step, e.value.steps, e.value.checkpoint) == (8, 12, 5)
    assert str(e.value) == "stage 'toy' interrupted at step 8/12, last checkpoint at step 5"
    assert isinstance(e.value, KeyboardInterrupt)  # whatever handles a Ctrl-C handles this


def test_resumed_run_logs_the_same_loss_history_as_an_unbroken_one(tmp_path):
    """The first log line after a resume averages the same steps as in an unbroken run: the log window
    (loss summed since the last line, and its step count) is part of the checkpoint."""
    def run(path, crash_at=None):
        model = Toy()
        ctx = ctx_for(path, log_every=4, checkpoint_every=5)  # resume at 5, inside the 5..8 window
        cfg = TrainConfig(steps=12, batch_size=16, lr=0.05)
        fit(ctx, model, Data(), None, loss_fn(crash_at), cfg, *model.blocks())
        return {s: m["train/loss"] for s, m in ctx.tracker.metrics}

    ref = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", crash_at=7)
    resumed = run(tmp_path / "run")
    assert sorted(ref) == [4, 8, 12] and sorted(resumed) == [8, 12]
    assert resumed == {8: ref[8], 12: ref[12]}


def test_metrics_reach_the_tracker_before_their_checkpoint_is_written(tmp_path):
    """A kill right after checkpoint k is written must not lose the metrics logged up to k: the resumed
    run starts logging at k+1, so anything still buffered would leave a gap in the MLflow history."""
    from stages.contract import NullTracker

    class Buffered(NullTracker):
        def __init__(self):
            super().__init__()
            self.pending, self.flushed = [], []

        def log_metrics(self, metrics, step):
            self.pending.append(step)

        def flush(self):
            self.flushed += self.pending
            self.pending = []

    ctx = ctx_for(tmp_path, log_every=2, checkpoint_every=4)
    ctx.tracker = Buffered()
    save, seen = ctx.checkpoints.save, []

    def save_and_look(step, *a, **k):
        seen.append((step, max(ctx.tracker.flushed, default=0)))
        return save(step, *a, **k)

    ctx.checkpoints.save = save_and_look
    model = Toy()
    fit(ctx, model, Data(), None, loss_fn(), TrainConfig(steps=12, batch_size=16, lr=0.05), *model.blocks())
    assert [s for s, _ in seen] == [4, 8, 12]
    assert all(flushed >= step for step, flushed in seen), seen


def test_sampler_resumes_mid_epoch_without_replay():
    full = list(ResumableBatchSampler(10, 3, seed=4, total=7))
    assert list(ResumableBatchSampler(10, 3, seed=4, start=4, total=7)) == full[4:]
    assert sorted(sum(full[:3], [])) == sorted(set(sum(full[:3], [])))  # an epoch has no repeats


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    train(tmp_path / "a", steps=10)
    mgr = CheckpointManager(tmp_path / "a" / "checkpoints")
    assert mgr.steps() == [5, 10]
    f = tmp_path / "a" / "checkpoints" / "00000010" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    with caplog.at_level(logging.WARNING, logger="baton"):
        assert mgr.latest().step == 5
    assert "corrupt" in caplog.text


def test_half_written_checkpoint_is_invisible(tmp_path):
    mgr = CheckpointManager(tmp_path / "c")
    mgr.save(3, {"w": torch.ones(2)}, {})
    (tmp_path / "c" / ".tmp-00000004-99999").mkdir()  # a writer killed mid-save
    assert mgr.steps() == [3] and mgr.latest().step == 3


def test_keep_last_n(tmp_path):
    mgr = CheckpointManager(tmp_path / "c", keep=2)
    for s in (1, 2, 3):
        mgr.save(s, {"w": torch.full((2,), float(s))}, {})
    assert mgr.steps() == [2, 3]
    model, state = mgr.latest().load()
    assert model["w"][0] == 3 and state["step"] == 3


def test_truncated_weights_file_names_the_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_weights({"w": torch.ones(100)}, p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(StageError, match=str(p)):
        load_weights(p)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    def nan_at_7(model, batch, step):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        return (loss * float("nan") if step == 7 else loss), {}
    model = Toy()
    ctx = ctx_for(tmp_path / "n")
    with pytest.raises(StageError, match=r"non-finite loss .* at step 7.*checkpoint: step 5"):
        fit(ctx, model, Data(), None, nan_at_7, TrainConfig(steps=12, batch_size=16))
    assert ctx.checkpoints.latest().step == 5


def test_linear_probe_leaves_backbone_unchanged(tmp_path):
    before = Toy().state_dict()
    model, _, _ = train(tmp_path / "lp", transfer={"strategy": "linear_probe"})
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == (not k.startswith("head")), k


def test_lp_ft_freezes_then_unfreezes(tmp_path):
    before = Toy().state_dict()
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "x", crash_at=6, transfer={"strategy": "lp_ft", "lp_steps": 5})
    model, state = CheckpointManager(tmp_path / "x" / "checkpoints").latest().load()
    assert torch.equal(model["body.0.weight"], before["body.0.weight"])  # still probing at step 5
    assert not torch.equal(model["head.weight"], before["head.weight"])
    full, _, _ = train(tmp_path / "x", transfer={"strategy": "lp_ft", "lp_steps": 5})
    assert not torch.equal(full.state_dict()["body.0.weight"], before["body.0.weight"])


def test_partial_freezes_first_blocks(tmp_path):
    before = Toy().state_dict()
    model, _, _ = train(tmp_path / "p", transfer={"strategy": "partial", "freeze_blocks": 1})
    after = model.state_dict()
    assert torch.equal(before["body.0.weight"], after["body.0.weight"])
    assert not torch.equal(before["body.3.weight"], after["body.3.weight"])


def test_lr_groups_follow_backbone_mult_and_layer_decay():
    from stages.train.transfer import Transfer, build_plan

    model = Toy()
    blocks, head = model.blocks()
    plan = build_plan(blocks, head, Transfer(backbone_lr_mult=0.1, layer_decay=0.5), weight_decay=0.01)
    mult = {g["name"]: g["lr_mult"] for g in plan.groups}
    assert mult["head"] == 1.0
    assert mult["block1"] == pytest.approx(0.1 * 0.5) and mult["block0"] == pytest.approx(0.1 * 0.25)
    assert all(g["weight_decay"] == 0 for g in plan.groups if g["name"].endswith("no_decay"))


def test_bad_transfer_config_names_key():
    with pytest.raises(ValueError, match="transfer.lp_steps"):
        TrainConfig(transfer={"strategy": "lp_ft"})


def test_oom_retry_halves_micro_batch_same_effective_batch(tmp_path, caplog):
    def oom_above_8(model, batch, step):
        x, y = batch
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("simulated CUDA OOM")
        return nn.functional.cross_entropy(model(x), y), {}

    ref, _, _ = train(tmp_path / "ref", grad_accum=2)  # what the retry should become
    model = Toy()
    blocks, head = model.blocks()
    with caplog.at_level(logging.WARNING, logger="baton"):
        fit(ctx_for(tmp_path / "oom"), model, Data(), None, oom_above_8,
            TrainConfig(steps=12, batch_size=16, lr=0.05), blocks, head)
    assert "out of memory at step 0: retrying with micro-batch 8 x 2 accumulation" in caplog.text
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.load(tmp_path / "oom" / "checkpoints" / "00000012" / "state.pt", weights_only=True)["grad_accum"] == 2



def test_resume_says_when_the_checkpoint_disagrees_with_the_config(tmp_path, caplog):
    """After an OOM retry the checkpoint holds a larger grad_accum than the config: the resumed run keeps the
    checkpoint's (the micro-batch that fit) and says so in a warning naming the checkpoint, the key and both
    values."""
    def oom_above_8(crash_at=None):
        def f(model, batch, step):
            if step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            x, y = batch
            if x.shape[0] > 8:
                raise torch.OutOfMemoryError("simulated CUDA OOM")
            return nn.functional.cross_entropy(model(x), y), {}
        return f

    cfg = TrainConfig(steps=12, batch_size=16, lr=0.05)
    model = Toy()
    with pytest.raises(KeyboardInterrupt):
        fit(ctx_for(tmp_path / "oom"), model, Data(), None, oom_above_8(crash_at=8), cfg, *model.blocks())
    model = Toy()
    with caplog.at_level(logging.WARNING, logger="baton"):
        fit(ctx_for(tmp_path / "oom"), model, Data(), None, oom_above_8(), cfg, *model.blocks())
    said = [r.getMessage() for r in caplog.records if "resuming from checkpoint" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert str(tmp_path / "oom" / "checkpoints" / "00000005") in said[0]
    assert "grad_accum is 2 there, train.grad_accum is 1 in the config: continuing with 2" in said[0]
    assert "out of memory" not in caplog.text.split("resuming from checkpoint")[1]  # no second retry needed
    ref, _, _ = train(tmp_path / "ref", grad_accum=2)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_state_reads_old_checkpoints_and_names_each_disagreement():
    """state.pt of older versions: an always-empty "extra", no log_window, no grad_accum (= the config's)."""
    from stages.train.state import TrainState, rng_state

    old = {"optimizer": {}, "scheduler": {}, "rng": rng_state(), "extra": {}, "step": 5, "scaler": {"scale": 2.0}}
    cfg = TrainConfig(grad_accum=4)
    st = TrainState.from_dict(old, cfg)
    assert (st.step, st.grad_accum, st.log_window, st.best) == (5, 4, (0.0, 0), None)
    assert "extra" not in st.to_dict() and st.to_dict()["log_window"] == [0.0, 0]
    said = st.disagreements(cfg, precision="fp32")
    assert said == [("it holds fp16 loss-scaler state, runtime.precision is 'fp32' in the config: the scaler state "
                     "is not used")]
    assert st.disagreements(cfg, precision="fp16") == []


# ----------------------------------------------------------------------------------------------
# validation during training, keep-best


def scripted(values: dict[int, float]):
    """A loss_fn that records the step, and an evaluate whose metric is scripted per step (plus the
    real val loss, so the pass runs the model)."""
    seen = {"step": 0}

    def lf(model, batch, step):
        seen["step"] = step + 1
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), {}

    val = Data(32)

    def evaluate(model):
        torch.rand(3)  # draws from the RNG: the loop must restore it
        return {"val/score": values[seen["step"]], "val/loss": nn.functional.cross_entropy(model(val.x), val.y).item()}
    return lf, evaluate


def train_best(path, values, crash_at=None, **kw):
    model = Toy()
    blocks, head = model.blocks()
    lf, ev = scripted(values)
    if crash_at is not None:
        inner = lf

        def lf(model, batch, step):  # noqa: F811
            if step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            return inner(model, batch, step)
    cfg = TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=5, **kw)
    ctx = ctx_for(path, checkpoint_every=5, keep_checkpoints=1)
    res = fit(ctx, model, Data(), None, lf, cfg, blocks, head, evaluate=ev, best_metric=("val/score", "max"))
    return model, res, ctx


VALUES = {5: 0.1, 10: 0.7, 15: 0.3, 20: 0.2}


def test_validation_passes_do_not_change_training(tmp_path):
    plain, _, _ = train(tmp_path / "plain", steps=20)
    lf, ev = scripted(VALUES)
    model = Toy()
    blocks, head = model.blocks()
    ctx = ctx_for(tmp_path / "eval")
    fit(ctx, model, Data(), None, lf, TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=5), blocks, head,
        evaluate=ev)
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert [s for s, m in ctx.tracker.metrics if "val/score" in m] == [5, 10, 15, 20]


def test_keep_best_keeps_that_checkpoint_and_outputs_its_weights(tmp_path):
    model, res, ctx = train_best(tmp_path / "best", VALUES, keep_best=True)
    assert res.best == {"step": 10, "metric": "val/score", "value": 0.7}
    # keep_checkpoints=1: the newest (20) and the best (10) survive
    assert CheckpointManager(tmp_path / "best" / "checkpoints").steps() == [10, 20]
    at10 = load_weights(tmp_path / "best" / "checkpoints" / "00000010" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, at10[k]), k
    last = load_weights(tmp_path / "best" / "checkpoints" / "00000020" / "model.safetensors")
    assert not all(torch.equal(v, last[k]) for k, v in model.state_dict().items())
    assert any("best/step" in m for _, m in ctx.tracker.metrics)


def test_keep_best_survives_a_kill_and_resume(tmp_path):
    ref, _, _ = train_best(tmp_path / "ref", VALUES, keep_best=True)
    with pytest.raises(KeyboardInterrupt):
        train_best(tmp_path / "run", VALUES, keep_best=True, crash_at=17)  # after the step-15 checkpoint
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [10, 15]
    model, res, _ = train_best(tmp_path / "run", VALUES, keep_best=True)
    assert res.resumed_from == 15 and res.best["step"] == 10
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # a finished stage asked again (e.g. it crashed during its final evaluation) still outputs the best
    again, res2, _ = train_best(tmp_path / "run", VALUES, keep_best=True)
    assert res2.best["step"] == 10
    for a, b in zip(ref.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_keep_best_without_eval_every_is_refused():
    with pytest.raises(ValueError, match="train.keep_best needs train.eval_every"):
        TrainConfig(keep_best=True)


def test_fp16_loss_scaler_is_checkpointed_and_resumed(tmp_path):
    """runtime.precision=fp16: the GradScaler's state (scale, growth tracker) is part of every checkpoint,
    a killed-and-resumed run continues it (the same final state and weights as an unbroken run), and a
    step whose gradients overflow is skipped (weights unchanged, scale halved)."""
    def run(path, crash_at=None, loss_mult=1.0, steps=12):
        model = Toy()
        cfg = TrainConfig(steps=steps, batch_size=16, lr=0.05)
        ctx = ctx_for(path, precision="fp16")

        def f(model, batch, step):
            if step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            x, y = batch
            return nn.functional.cross_entropy(model(x), y) * loss_mult, {}
        res = fit(ctx, model, Data(), None, f, cfg)
        return model, res, ctx

    ref, _, ctx = run(tmp_path / "ref")
    _, tstate = CheckpointManager(tmp_path / "ref" / "checkpoints").latest().load()
    assert tstate["scaler"]["scale"] == 2.0 ** 16 and tstate["scaler"]["_growth_tracker"] == 12
    assert [m["train/loss_scale"] for _, m in ctx.tracker.metrics] == [2.0 ** 16] * 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", crash_at=8)
    got, res, _ = run(tmp_path / "run")
    assert res.resumed_from == 5
    _, tstate2 = CheckpointManager(tmp_path / "run" / "checkpoints").latest().load()
    assert tstate2["scaler"] == tstate["scaler"]  # the growth tracker went on from 5, not from 0
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b)
    # 1e36 * 65536 overflows float32: every step is skipped, the scale halves each time
    before = Toy().state_dict()
    over, _, _ = run(tmp_path / "overflow", loss_mult=1e36, steps=3)
    _, tstate3 = CheckpointManager(tmp_path / "overflow" / "checkpoints").latest().load()
    assert tstate3["scaler"]["scale"] == 2.0 ** 13
    for a, b in zip(before.values(), over.state_dict().values()):
        assert torch.equal(a, b)


class BNToy(Toy):
    """Toy with a BatchNorm in each backbone block: a frozen block must be a frozen feature extractor, its
    running statistics untouched (eval mode) for as long as it is frozen, validation passes included."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                  nn.BatchNorm1d(16))

    def blocks(self):
        return ([[*self.body[0].parameters(), *self.body[1].parameters()],
                 [*self.body[3].parameters(), *self.body[4].parameters()]], list(self.head.parameters()))


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _bn(state, i):
    return [state[f"body.{i}.{s}"] for s in BN_STATS]


def train_bn(path, transfer, crash_at=None, steps=12):
    model = BNToy()
    blocks, head = model.blocks()
    # eval_every: each validation pass ends in model.train(), which must not unfreeze a frozen BatchNorm
    cfg = TrainConfig(steps=steps, batch_size=16, lr=0.05, transfer=transfer, eval_every=3)
    res = fit(ctx_for(path), model, Data(), None, loss_fn(crash_at), cfg, blocks, head,
              evaluate=lambda m: {"val/x": float(m(Data().x).sum())})
    return model, res


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_frozen_blocks_keep_their_batchnorm_statistics(tmp_path):
    before = BNToy().state_dict()
    lp, _ = train_bn(tmp_path / "lp", {"strategy": "linear_probe"})
    for i in (1, 4):
        assert _same(_bn(lp.state_dict(), i), _bn(before, i)), f"linear_probe moved body.{i}'s BatchNorm statistics"
    part, _ = train_bn(tmp_path / "p", {"strategy": "partial", "freeze_blocks": 1})
    assert _same(_bn(part.state_dict(), 1), _bn(before, 1))
    assert not torch.equal(part.state_dict()["body.4.running_mean"], before["body.4.running_mean"])
    assert part.body[1].training is False and part.body[4].training is True
    ft, _ = train_bn(tmp_path / "ft", {"strategy": "finetune"})
    assert not any(_same(_bn(ft.state_dict(), i), _bn(before, i)) for i in (1, 4))


def test_lp_ft_batchnorm_frozen_until_lp_steps_then_trains_and_resumes_bitwise(tmp_path):
    before = BNToy().state_dict()
    lp_ft = {"strategy": "lp_ft", "lp_steps": 5}
    with pytest.raises(KeyboardInterrupt):
        train_bn(tmp_path / "x", lp_ft, crash_at=7)
    at5, _ = CheckpointManager(tmp_path / "x" / "checkpoints").latest().load()
    for i in (1, 4):
        assert _same(_bn(at5, i), _bn(before, i)), f"lp_ft moved body.{i}'s BatchNorm during the probe"
    resumed, _ = train_bn(tmp_path / "x", lp_ft)
    for i in (1, 4):
        assert int(resumed.state_dict()[f"body.{i}.num_batches_tracked"]) == 12 - 5
        assert not torch.equal(resumed.state_dict()[f"body.{i}.running_mean"], before[f"body.{i}.running_mean"])
    unbroken, _ = train_bn(tmp_path / "y", lp_ft)
    for k, v in unbroken.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
