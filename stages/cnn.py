"""Stage 1 `cnn`: ImageNet-style classification pretraining of a torchvision ResNet-family backbone.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads an ImageNet-layout folder (``train/<wnid>/*``, ``val/<wnid>/*``) from the ``data`` stage;
writes ``outputs/model/`` (model.safetensors + config.json + classes.json, the class index: wnid ->
label index and, when ``synset_words.txt`` is in the ImageNet root, wnid -> name); reports top-1/top-5
on val against chance and majority-class baselines. An unreadable image is an error naming the file,
or with ``skip_bad_images: true`` it is left out and counted (metric ``data/skipped_bad_images``).
Decoded images are kept in RAM only when they fit ``runtime.cache_images_mb``; otherwise the loader
workers decode them per item. Batches are uint8; normalisation and the random flip run on the device."""
from __future__ import annotations

import json
from collections import Counter

import torch
from torch import nn

from stages.config.cnn import Config, ModelConfig  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageError, StageResult
from stages.data.imagenet import ImageClassDataset, class_index, load_imagefolder, normalize_images
from stages.metrics import topk_accuracy
from stages.models.resnet import build_classifier, init_weights, pretrained_classifier, save_classifier, transfer_blocks
from stages.train.device import autocast, to_device
from stages.train import distributed
from stages.train.distributed import example_random
from stages.train.loop import fit


def device_batch(ctx: StageContext, x: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images already on the device -> normalised float (flipped where ``flip``), channels_last if set."""
    x = normalize_images(x, flip)
    return x.contiguous(memory_format=torch.channels_last) if ctx.config.runtime.channels_last else x


def image_datasets(cfg: "Config", runtime, tr: tuple, va: tuple) -> tuple[ImageClassDataset, ImageClassDataset]:
    """Train and val datasets of uint8 images (normalised and flipped on the device, see ``run``). Each is
    cached in RAM only if its decoded pixels fit what is left of ``runtime.cache_images_mb`` (train first);
    otherwise its images are decoded per item in the DataLoader workers. Same pixels either way."""
    budget = runtime.cache_images_mb
    train = ImageClassDataset(tr[0], tr[1], cfg.image_size, train=True, cache=None, cache_mb=budget,
                              skip_bad=cfg.skip_bad_images, raw=True)
    budget -= train.decoded_mb if train.cached else 0.0
    val = ImageClassDataset(va[0], va[1], cfg.image_size, train=False, cache=None, cache_mb=budget,
                            skip_bad=cfg.skip_bad_images, raw=True)
    return train, val


def build_model(ctx: StageContext, cfg: "Config", num_classes: int) -> tuple[nn.Module, ModelConfig]:
    """The classifier to train and its ModelConfig: ``init_from``'s architecture and weights (new head), else
    ``model`` built fresh (and loaded from ``model.init`` when set)."""
    if cfg.init_from is None:
        model = build_classifier(cfg.model, num_classes)
        init_weights(model, cfg.model)
        return model, cfg.model
    model, model_cfg = pretrained_classifier(ctx.input(cfg.init_from, "model"), num_classes, "init_from")
    if cfg.model != ModelConfig() and cfg.model != model_cfg:
        raise StageError(f"stage {ctx.name!r}: model is set but differs from the architecture of "
                         f"init_from={cfg.init_from!r} ({model_cfg.model_dump()}): leave model out")
    return model, model_cfg


@torch.no_grad()
def evaluate(ctx: StageContext, model: nn.Module, ds, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model on every image of ``ds`` -> (logits (N, classes) float32, targets (N,)) on the CPU."""
    model.eval()
    logits, targets = [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=ctx.config.runtime.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    for x, y in loader:
        with autocast(ctx):
            logits.append(model(device_batch(ctx, to_device(x, ctx.device))).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    root = ctx.input(cfg.data, cfg.data_output)
    tr_paths, tr_labels, classes = load_imagefolder(root / "train")
    va_paths, va_labels, va_classes = load_imagefolder(root / "val")
    if va_classes != classes:
        raise StageError(f"{root}/val has classes {len(va_classes)} that differ from {root}/train ({len(classes)})")
    train_ds, val_ds = image_datasets(cfg, ctx.config.runtime, (tr_paths, tr_labels), (va_paths, va_labels))
    skipped = len(train_ds.skipped) + len(val_ds.skipped)

    model, model_cfg = build_model(ctx, cfg, len(classes))
    if model_cfg.sync_batchnorm and distributed.world() > 1:
        if ctx.device.type == "cpu":
            raise StageError("model.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU path); runtime.device "
                             "resolved to cpu")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys as BatchNorm2d
    tb = transfer_blocks(model)
    ctx.tracker.log_params({"data.classes": len(classes), "data.train": len(train_ds), "data.val": len(val_ds),
                            "model.params": sum(p.numel() for p in model.parameters()),
                            "data.skipped_bad_images": skipped, "data.train_cached": train_ds.cached,
                            "data.val_cached": val_ds.cached, "data.train_decoded_mb": round(train_ds.decoded_mb, 1)})

    def loss_fn(m: nn.Module, batch, step: int):
        x, y = batch  # x: uint8 on the device
        # the flips are drawn per example from (seed, step, position in the step's global batch), not in the
        # loader workers: the same for any num_workers, cached or streamed, any number of ranks, and a
        # resumed run draws what the unbroken run drew
        flip = example_random(ctx.seed, step, len(x)).rand(1, 0)[:, 0] < 0.5
        logits = m(device_batch(ctx, x, flip))
        loss = nn.functional.cross_entropy(logits, y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().detach()}

    res = fit(ctx, model, train_ds, None, loss_fn, cfg.train, blocks=tb.blocks, head=tb.head,
              evaluate=lambda m: {f"val/{k}": v for k, v in topk_accuracy(
                  *evaluate(ctx, m, val_ds, cfg.eval_batch_size), (1, 5)).items()},
              best_metric=("val/top1", "max"))
    logits, targets = evaluate(ctx, model, val_ds, cfg.eval_batch_size)
    metrics = {f"val/{k}": v for k, v in topk_accuracy(logits, targets, (1, 5)).items()}
    metrics["data/skipped_bad_images"] = skipped
    majority = Counter(train_ds.labels).most_common(1)[0][0]
    baselines = {"val/top1_chance": 1 / len(classes),
                 "val/top1_majority": float((targets == majority).float().mean())}
    ctx.tracker.log_metrics(metrics | {"train/steps_per_s_mean": res.steps_per_s}, step=res.step)
    save_classifier(model.cpu(), model_cfg, classes, ctx.outputs / "model")
    (ctx.outputs / "model" / "classes.json").write_text(json.dumps(class_index(classes, root), indent=2))
    return ctx.result(outputs={"model": "outputs/model", "classes": "outputs/model/classes.json"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds,
                            "images_per_s": res.steps_per_s * cfg.train.batch_size,
                            "data/skipped_bad_images": skipped,
                            "skipped_files": [str(p) for p, _ in (train_ds.skipped + val_ds.skipped)[:20]]})
