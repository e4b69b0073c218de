"""The `targets` kind writes four readable ImageNet-layout sets, deterministically; a `cnn` stage with
`init_from` fine-tunes the source's weights on one of them (a linear probe leaves the backbone as it was)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import cnn, targets
from stages.config.targets import OUTPUTS
from stages.contract import NullTracker, StageContext, StageError, StageResult, seed_stage
from stages.data.imagenet import ImageClassDataset, load_imagefolder
from stages.data.targets import SIMILAR_CLASSES, TEXTURES
from stages.models.resnet import build_classifier, save_classifier
from stages.config.cnn import ModelConfig
from stages.train.checkpoint import load_weights

RUNTIME = {"device": "cpu", "threads": 1, "log_every": 5, "checkpoint_every": 1000}
SMALL = {"small_per_class": 2, "large_per_class": 5, "val_per_class": 3, "image_size": 16, "runtime": RUNTIME}


def run(name: str, cfg, stage_dir: Path, upstream: dict[str, Path]) -> tuple[StageResult, NullTracker]:
    ups = {n: StageResult.model_validate_json((d / "result.json").read_text()) for n, d in upstream.items()}
    ctx = StageContext(name=name, config=cfg, stage_dir=stage_dir, upstream=ups, upstream_dirs=upstream,
                       fingerprint="t", tracker=NullTracker())
    seed_stage(cfg)
    res = (targets if cfg.kind == "targets" else cnn).run(ctx)
    (stage_dir / "result.json").write_text(res.model_dump_json())
    return res, ctx.tracker


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("targets") / "targets"
    run("targets", targets.Config(**SMALL), d, {})
    return d


def test_targets_writes_four_readable_sets_with_the_asked_sizes(made):
    res = StageResult.model_validate_json((made / "result.json").read_text())
    assert res.outputs == OUTPUTS
    for name in OUTPUTS:
        domain, scale = name.split("_")
        n_classes = len(SIMILAR_CLASSES) if domain == "similar" else len(TEXTURES)
        per_class = SMALL[f"{scale}_per_class"]
        paths, labels, classes = load_imagefolder(made / "outputs" / name / "train")
        assert len(classes) == n_classes and len(paths) == n_classes * per_class
        assert all(labels.count(c) == per_class for c in range(n_classes))
        vpaths, _, vclasses = load_imagefolder(made / "outputs" / name / "val")
        assert vclasses == classes and len(vpaths) == n_classes * SMALL["val_per_class"]
        ds = ImageClassDataset(paths, labels, 16, train=False, cache=True, raw=True)
        assert ds.images.shape == (len(paths), 3, 16, 16)
        assert (made / "outputs" / name / "synset_words.txt").read_text().count("\n") == n_classes


def test_targets_are_deterministic_from_the_seed(made, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    run("targets", targets.Config(**SMALL), again, {})
    run("targets", targets.Config(**SMALL, seed=1), other, {})
    rel = "outputs/different_small/train/d00000003/d00000003_1.JPEG"
    assert (made / rel).read_bytes() == (again / rel).read_bytes()
    assert (made / rel).read_bytes() != (other / rel).read_bytes()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 'finished cnn stage' (random weights: what matters is which tensors move)."""
    d = tmp_path_factory.mktemp("source") / "cnn"
    mc = ModelConfig(widths=[4, 8, 8, 8])
    save_classifier(build_classifier(mc, 36), mc, [f"n{i}" for i in range(36)], d / "outputs" / "model")
    (d / "result.json").write_text(StageResult(stage="cnn", kind="cnn", fingerprint="s",
                                               outputs={"model": "outputs/model"}).model_dump_json())
    return d


def ft_config(**kw) -> cnn.Config:
    return cnn.Config(**({"init_from": "src", "data": "targets", "data_output": "similar_small", "image_size": 16,
                          "runtime": RUNTIME, "train": {"steps": 30, "batch_size": 24, "lr": 0.05,
                                                        "transfer": {"strategy": "linear_probe"}}} | kw))


def test_init_from_a_cnn_stage_linear_probe_trains_only_the_new_head(made, source, tmp_path):
    res, tracker = run("ft", ft_config(), tmp_path / "ft", {"src": source, "targets": made})
    before = load_weights(source / "outputs/model/model.safetensors")
    after = load_weights(tmp_path / "ft/outputs/model/model.safetensors")
    assert after["fc.weight"].shape == (len(SIMILAR_CLASSES), 8) and before["fc.weight"].shape == (36, 8)
    assert torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])  # frozen backbone
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    bn_stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_stats) >= 9 and all(torch.equal(after[k], before[k]) for k in bn_stats)  # BN frozen too (eval)
    losses = [m["train/loss"] for _, m in tracker.metrics if "train/loss" in m]
    assert losses[-1] < losses[0], losses
    assert res.metrics["val/top1"] >= 0.0 and res.baselines["val/top1_chance"] == pytest.approx(1 / 12)

    res, _ = run("ft2", ft_config(train={"steps": 4, "batch_size": 8, "transfer": {"strategy": "finetune"}}),
                 tmp_path / "ft2", {"src": source, "targets": made})
    moved = load_weights(tmp_path / "ft2/outputs/model/model.safetensors")
    assert not torch.equal(moved["conv1.weight"], before["conv1.weight"])  # fine-tuning moves the backbone
    assert not torch.equal(moved["bn1.running_mean"], before["bn1.running_mean"])


def test_init_from_refuses_a_different_model_and_model_init(made, source, tmp_path):
    with pytest.raises(StageError, match="model is set but differs from the architecture of init_from='src'"):
        run("ft", ft_config(model={"widths": [8, 8, 8, 8]}), tmp_path / "bad", {"src": source, "targets": made})
    with pytest.raises(ValueError, match="init_from='src' and model.init="):
        ft_config(model={"init": "x.safetensors"})
