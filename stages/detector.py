"""Stage 2 `detector`: Visual Genome detection fine-tune of the cnn backbone + region features.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads a Visual Genome folder (``image_data.json``, ``objects.json``, ``train_ids.txt``,
``val_ids.txt``, ``images/<image_id>.jpg``) from the ``data`` stage and the classifier in
``outputs/model/`` of the ``backbone_from`` stage. Train/val come from :func:`stages.data.vg_splits`
(the id-list files when present, else a seeded split of ``val_fraction``). Trains a torchvision Faster
R-CNN on the object names -- ResNet body + FPN, or for VGG16 / AlexNet a single feature map (their
conv ``features`` minus the last max-pool, stride 16, as in the original Faster R-CNN) -- optionally
with a multi-label attribute head on the box-head features (bottom-up attention, Anderson et al.
2018: ``model.attributes``), reports COCO box mAP on val against a detector that predicts nothing,
and writes
    outputs/model/     model.safetensors + config.json (everything :func:`load_model` needs)
    outputs/regions/   a RegionStore (stages.data.regions): per scene image (train and val) the detections
                       with score >= regions.score_thresh, at least regions.min_k and at most
                       regions.k (by score), with pooled box features, class probabilities and geometry
    outputs/per_class_ap.json   AP@0.5 per class name on val"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from stages.config.cnn import ModelConfig as BackboneConfig
from stages.config.detector import (  # noqa: F401 - the kind's config
    RESNET_ARCHS,
    SINGLE_MAP_ARCHS,
    TRAINABLE_ORDER,
    Config,
    ModelConfig,
    RegionsConfig,
    check_anchors,
)
from stages.contract import StageContext, StageError, StageResult
from stages.data.regions import RegionStoreWriter
from stages.data.visual_genome import (
    DetectionDataset,
    VGImage,
    VGPixels,
    collate,
    decode_images,
    load_vg,
    prepare_batch,
    vg_splits,
    vg_vocabularies,
)
from stages.metrics import detection_map
from stages.models.detection import build_detector, detect, save_model, transfer_blocks
from stages.models.resnet import build_classifier, init_weights, load_classifier
from stages.train.device import autocast
from stages.train.distributed import ExampleRandom, example_random
from stages.train.loop import fit
from stages.progress import Progress


def backbone_body(cfg: Config, ctx: StageContext | None = None) -> tuple[nn.Module, BackboneConfig, bool, str]:
    """The ResNet body the detector starts from: (body, its config, pretrained?, where it came from).

    With ``backbone_from`` it is the upstream stage's classifier (``outputs/model``) with its weights;
    otherwise ``model.backbone`` (default: the cnn stage's narrow_resnet), random or ``model.backbone.init``."""
    if cfg.backbone_from is None:
        bcfg = cfg.model.backbone or BackboneConfig()
        body = build_classifier(bcfg, 1)
        init_weights(body, bcfg)
        return body, bcfg, bool(bcfg.init), bcfg.init or "random init"
    model_dir = ctx.input(cfg.backbone_from, "model")
    body, bcfg = load_classifier(model_dir, f"backbone_from={cfg.backbone_from!r}")
    return body, bcfg, True, str(model_dir)


def predict_all(ctx: StageContext, model: FasterRCNN, pixels, regions: RegionsConfig,
                batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``detect`` (with ``regions``' k / min_k / score_thresh) over every image in batches of ``batch_size``,
    yielding each image's detections as numpy on the CPU, in order. The images (uint8, by position:
    :class:`VGPixels` or a list) stream through a DataLoader, decoded in ``runtime.num_workers`` workers
    while the model runs; only the current batch is in memory (the caller writes each image's regions
    away as it comes: all of VG's top-100 features would be ~80 GB)."""
    model.eval()
    loader = torch.utils.data.DataLoader(pixels, batch_size=batch_size, collate_fn=list,
                                         num_workers=ctx.config.runtime.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    for batch in loader:
        xs = [x.to(ctx.device, non_blocking=True).float().div_(255.0) for x in batch]
        with autocast(ctx):
            dets = detect(model, xs, regions.k, regions.lower, regions.score_thresh, regions.nms)
        for d in dets:
            yield {key: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for key, v in d.items()}


def region_rows(det: dict[str, np.ndarray], width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's selected detections -> (features (m, D), geometry (m, 6), probs (m, C+1)); geometry =
    x1, y1, x2, y2 / image size, box area / image area, detection score."""
    idx = det["region_index"]
    b = det["boxes"][idx] / np.array([width, height, width, height], dtype=np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    geometry = np.concatenate([b, area[:, None], det["scores"][idx, None]], 1)
    return det["features"], geometry, det["probs"]


@dataclass
class VGData:
    """What the detector reads from a Visual Genome folder: every scene image, the train/val split, the
    class and attribute vocabularies of the train split, and the two detection datasets."""

    images: list[VGImage]
    splits: dict[str, list[int]]  # "train"/"val" -> positions in ``images``
    split_how: str
    stats: dict
    classes: list[str]  # class names 1..C (0 = background)
    attributes: list[str]
    pixels: VGPixels
    train: DetectionDataset
    val: DetectionDataset


def vg_data(cfg: Config, vg_dir) -> VGData:
    """``vg_dir`` + the stage config -> :class:`VGData` (errors name the folder or the config key)."""
    images, stats = load_vg(vg_dir, bad_boxes=cfg.bad_boxes)
    splits, split_how = vg_splits(vg_dir, images, cfg.seed, cfg.val_fraction)
    train_imgs = [images[i] for i in splits["train"]]
    att = cfg.model.attributes
    att_k = max(att.num_attributes_k, 0) if att.enabled else 0
    classes, attributes, _ = vg_vocabularies(train_imgs, cfg.model.num_classes_k, att_k)
    attributes = attributes if att.enabled else []
    if not classes:
        raise StageError(f"{vg_dir}: the train split has no named objects")
    if att.enabled and not attributes:
        raise StageError(f"model.attributes.enabled but the train split of {vg_dir} has no attributes "
                         f"({vg_dir / 'attributes.json'} missing or empty)")
    class_ids = {n: i + 1 for i, n in enumerate(classes)}
    pixels = decode_images(images)
    train = DetectionDataset(train_imgs, pixels.subset(splits["train"]), class_ids, train=True,
                             attribute_ids={a: i for i, a in enumerate(attributes)})
    val = DetectionDataset([images[i] for i in splits["val"]], pixels.subset(splits["val"]), class_ids, train=False)
    return VGData(images, splits, split_how, stats, classes, attributes, pixels, train, val)


def write_regions(ctx: StageContext, cfg: Config, model: FasterRCNN, data: VGData) -> tuple[list[dict], list[int]]:
    """One inference pass over every scene image, streamed: each image's top-K regions go straight into the
    region store ``outputs/regions`` (published atomically at the end). Returns (val images' detections in
    val order, for mAP; regions per image)."""
    val_pos = {i: j for j, i in enumerate(data.splits["val"])}
    val_preds: list[dict | None] = [None] * len(val_pos)
    n_regions = []
    with RegionStoreWriter(ctx.outputs / "regions", len(data.images), cfg.regions.k, cfg.model.representation_size,
                           data.classes) as writer:
        dets = predict_all(ctx, model, data.pixels, cfg.regions, cfg.eval_batch_size)
        bar = Progress(ctx.name, "regions", len(data.images), "images")
        for i, (im, d) in enumerate(zip(data.images, dets)):
            bar.update()
            writer.add(im.image_id, *region_rows(d, im.width, im.height))
            n_regions.append(len(d["features"]))
            if i in val_pos:
                val_preds[val_pos[i]] = {"image_id": im.image_id, "boxes": d["boxes"], "scores": d["scores"],
                                         "labels": d["labels"]}
        writer.close()
    return val_preds, n_regions


def evaluate_map(ctx: StageContext, data: VGData, val_preds: list[dict]) -> tuple[dict, dict]:
    """COCO box mAP of ``val_preds`` -> (metrics, predict-nothing baselines); writes per_class_ap.json."""
    val_gts = [{"image_id": data.images[i].image_id} | {k: v.numpy() for k, v in t.items()}
               for i, t in zip(data.splits["val"], data.val.targets)]
    scores, per_class = detection_map(val_preds, val_gts, len(data.classes))
    empty, _ = detection_map([], val_gts, len(data.classes))
    (ctx.outputs / "per_class_ap.json").write_text(json.dumps(
        {data.classes[c - 1]: ap for c, ap in sorted(per_class.items())}, indent=2))
    return ({f"val/{k}": v for k, v in scores.items()},
            {f"val/{k}_predict_nothing": v for k, v in empty.items() if k in ("map", "map50")})


def log_val_images(ctx: StageContext, data: VGData, val_preds: list[dict], step: int, n: int = 4,
                   max_boxes: int = 5) -> int:
    """The first ``n`` val images with their ``max_boxes`` highest-scoring predicted boxes, class labels and
    scores (torchvision's draw_bounding_boxes, upscaled to >= 256 px so labels read) through the tracker's
    image API, key ``val/detections/<image_id>``. Returns how many it logged."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import draw_bounding_boxes

    logged = 0
    for pos, pred in zip(data.splits["val"][:n], val_preds[:n]):
        image = data.pixels[pos]  # (3, H, W) uint8
        scale = max(1, 256 // max(image.shape[1:]))
        big = torch.nn.functional.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0].byte()
        keep = list(np.argsort(-pred["scores"])[:max_boxes])  # whatever it predicts, however unsure
        boxes = torch.as_tensor(pred["boxes"][keep], dtype=torch.float32).reshape(-1, 4) * scale
        labels = [f"{data.classes[int(pred['labels'][i]) - 1]} {pred['scores'][i]:.2f}" for i in keep]
        drawn = draw_bounding_boxes(big, boxes, labels=labels, colors="yellow", width=2, label_colors="black",
                                    fill_labels=True) if keep else big
        ctx.tracker.log_image(to_pil_image(drawn), key=f"val/detections/{pred['image_id']}", step=step)
        logged += 1
    return logged


class PerImageSampler:
    """torchvision's positive/negative box sampler (RPN anchors, RoI proposals) drawing each image's sample from
    the torch RNG seeded by (seed, step, the image's position in the step's global batch, ``stream``): the same
    boxes for an image whatever rank or micro-batch it is in (and a resume redraws them)."""

    def __init__(self, inner, stream: int):
        self.inner, self.stream = inner, stream
        self.draws: ExampleRandom | None = None  # set by the loss for each micro-batch

    def __call__(self, matched_idxs: list[torch.Tensor]):
        pos, neg = [], []
        for i, m in enumerate(matched_idxs):
            dev = ([m.device.index if m.device.index is not None else torch.cuda.current_device()] if m.is_cuda
                   else [])
            with torch.random.fork_rng(devices=dev):
                torch.manual_seed(self.draws.key(i, self.stream))
                p, n = self.inner([m])
            pos += p
            neg += n
        return pos, neg


def training_loss(ctx: StageContext, model: FasterRCNN):
    """-> ``loss_fn(m, batch, step)``: Faster R-CNN's own training losses, summed (each is logged); flips and
    box samples per image from (seed, step, position in the step's global batch)."""
    samplers = [PerImageSampler(model.rpn.fg_bg_sampler, 5), PerImageSampler(model.roi_heads.fg_bg_sampler, 6)]
    model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler = samplers

    def loss_fn(m: FasterRCNN, batch, step: int):
        draws = example_random(ctx.seed, step, len(batch[0]))
        for s in samplers:
            s.draws = draws
        xs, targets = prepare_batch(*batch, train=True, flips=draws.rand(1, 0)[:, 0] < 0.5)
        losses = m(xs, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg[, loss_attributes]
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}
    return loss_fn


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    data = vg_data(cfg, ctx.input(cfg.data, "vg"))
    classes, attributes = data.classes, data.attributes

    body, backbone_cfg, pretrained, source = backbone_body(cfg, ctx)
    model = build_detector(cfg.model, body, len(classes), pretrained, backbone_cfg.arch, len(attributes))
    tb = transfer_blocks(model)
    ctx.tracker.log_params({"data.classes": len(classes), "data.attributes": len(attributes),
                            "data.train": len(data.train), "data.val": len(data.val), "data.split": data.split_how,
                            "data.objects": data.stats["objects"], "data.boxes_clipped": data.stats["clipped"],
                            "data.boxes_dropped": data.stats["dropped_degenerate"], "backbone.source": source,
                            "backbone.arch": backbone_cfg.arch,
                            "model.params": sum(p.numel() for p in model.parameters())})
    res = fit(ctx, model, data.train, collate, training_loss(ctx, model), cfg.train, blocks=tb.blocks, head=tb.head)

    t0 = time.perf_counter()
    val_preds, n_regions = write_regions(ctx, cfg, model, data)
    region_s = time.perf_counter() - t0
    metrics, baselines = evaluate_map(ctx, data, val_preds)
    ctx.tracker.log_metrics(metrics | {"train/steps_per_s_mean": res.steps_per_s}, step=res.step)
    log_val_images(ctx, data, val_preds, res.step)
    save_model(model.cpu(), cfg.model, backbone_cfg, pretrained, classes, ctx.outputs / "model", attributes)
    rows = len(data.images) * cfg.regions.k
    return ctx.result(outputs={"model": "outputs/model", "regions": "outputs/regions"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds,
                            "train_images_per_s": res.steps_per_s * cfg.train.batch_size,
                            "backbone": source, "classes": len(classes), "attributes": len(attributes),
                            "split": data.split_how, "train_images": len(data.train), "val_images": len(data.val),
                            "region_images": len(data.images), "regions_per_image_mean": float(np.mean(n_regions)),
                            "regions_per_image_min": int(min(n_regions)),
                            "region_pass_seconds": region_s, "region_rows_per_s": rows / max(region_s, 1e-9)})
