"""baton's training loop (stages.train.loop.fit) on tensors already on the device, for each training stage's
model at a given size: the loop's own overhead against the raw anchor (tools/gpu_anchor.py) at the same size.

The batch the loop reads is the example indices (the resumable sampler's, through the DataLoader, pinned and
copied like any batch); the loss function gathers those examples from a pool already on the device, so only
that index copy and no loader cost is measured. Examples/s is the steady-state rate: the loop's own per-window rate
(``train/steps_per_s`` of each log line) over every window after the first (warm-up: cudnn autotuning, the
allocator, a compile), before the final checkpoint is written. Needs only torch, torchvision, transformers,
pydantic (stages.config)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stages.config.bert import BertSizes
from stages.config.cnn import ModelConfig as CnnModel
from stages.config.detector import ModelConfig as DetModel
from stages.config.train import TrainConfig
from stages.contract import NullTracker, StageConfig, StageContext


class BenchConfig(StageConfig):
    kind: str = "bench"


@dataclass
class Job:
    """One loop measurement: a model, a loss over a device-resident pool, an optimizer setting."""
    model: nn.Module
    loss: Callable  # loss_fn(m, idx, step) -> (loss, logs)
    pool: int  # examples in the pool (the sampler's dataset size)
    batch: int
    train: dict = field(default_factory=dict)  # TrainConfig fields
    channels_last: bool = False
    # None: the indices arrive as a (pinned, on CUDA) LongTensor copied to the device without a sync, as a real
    # batch is; a list of ints where the loss indexes a Python list (the detector's images)
    collate: Callable | None = None


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def steady_rate(metrics: list[tuple[int, dict]]) -> float:
    """Steps/s over every log window after the first, from the loop's own ``train/steps_per_s``."""
    windows, prev = [], 0
    for step, m in metrics:
        windows.append((step - prev, m["train/steps_per_s"]))
        prev = step
    later = windows[1:] or windows
    return sum(n for n, _ in later) / sum(n / r for n, r in later)


def run_loop(job: Job, device: str, steps: int, log_every: int, precision: str, compile_: bool = False,
             workdir: Path | None = None) -> dict:
    """fit() for ``steps`` steps; {examples_per_s, steps_per_s, first_window_s, loss_first, loss_last}."""
    rt = {"device": device, "precision": precision, "channels_last": job.channels_last, "log_every": log_every,
          "checkpoint_every": 10**6, "compile": compile_}
    cfg = TrainConfig(**({"steps": steps, "batch_size": job.batch, "lr": 1e-3, "grad_clip": None} | job.train))
    from stages.train.loop import fit  # after the caller set threads / backends

    with tempfile.TemporaryDirectory(prefix="bench-loop-", dir=workdir) as d:
        ctx = StageContext(name="bench", config=BenchConfig(runtime=rt), stage_dir=Path(d), upstream={},
                           upstream_dirs={}, fingerprint="bench", tracker=NullTracker())
        fit(ctx, job.model, _Indices(job.pool), job.collate, job.loss, cfg)
        metrics = ctx.tracker.metrics
    rate = steady_rate(metrics)
    return {"examples_per_s": round(rate * job.batch, 1), "steps_per_s": round(rate, 3),
            "first_window_s": round(metrics[0][0] / metrics[0][1]["train/steps_per_s"], 2),
            "loss_first": round(metrics[0][1]["train/loss"], 4), "loss_last": round(metrics[-1][1]["train/loss"], 4)}


# ---------------------------------------------------------------------------------------------- the jobs


def cnn_job(device: str, arch: str, batch: int, res: int) -> Job:
    """The cnn stage's model and device-side input path (uint8 -> normalised, flipped, channels_last)."""
    from stages.cnn import device_batch
    from stages.models.resnet import build_classifier

    model = build_classifier(CnnModel(arch=arch, stem="imagenet"), 1000)
    x = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    ctx = StageContext(name="bench", config=BenchConfig(runtime={"device": device, "channels_last": True}),
                       stage_dir=Path("."), upstream={}, upstream_dirs={}, fingerprint="bench")

    def loss(m, idx, step):
        flip = torch.rand(len(idx)) < 0.5
        return nn.functional.cross_entropy(m(device_batch(ctx, x[idx], flip)), y[idx]), {}
    return Job(model, loss, batch, batch, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0}, channels_last=True)


def detector_job(device: str, batch: int, size: int, base: bool) -> Job:
    """The detector stage's Faster R-CNN (build_detector) as torchvision's fasterrcnn_resnet50_fpn: R50 body,
    FPN over layer1..4 (256 channels), 5 anchor sizes, 1024-d box head, 91 classes (``base``; else small
    heads and few proposals, for the CPU smoke run)."""
    from stages.models.detection import build_detector
    from stages.models.resnet import build_classifier

    heads = (dict(fpn_channels=256, max_size=max(size, 1333), representation_size=1024, rpn_pre_nms_top_n=2000,
                  rpn_post_nms_top_n=2000, rpn_batch_size_per_image=256, box_batch_size_per_image=512) if base else
             dict(fpn_channels=32, max_size=size, representation_size=64, rpn_pre_nms_top_n=200,
                  rpn_post_nms_top_n=50, rpn_batch_size_per_image=32, box_batch_size_per_image=32))
    cfg = DetModel(returned_layers=[1, 2, 3, 4], anchor_sizes=[32, 64, 128, 256, 512], min_size=size, **heads)
    model = build_detector(cfg, build_classifier(CnnModel(arch="resnet50", stem="imagenet"), 1000), 90,
                           pretrained=False, arch="resnet50")
    g = torch.Generator(device="cpu").manual_seed(0)
    imgs = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(10, 2, generator=g) * (size - size // 8)
        wh = torch.rand(10, 2, generator=g) * (size // 9) + size // 80 + 1
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 91, (10,), generator=g).to(device)})

    def loss(m, idx, step):
        losses = m([imgs[i] for i in idx], [targets[i] for i in idx])
        return sum(losses.values()), {}
    return Job(model, loss, batch, batch, {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0}, collate=list)


def bert_job(device: str, batch: int, seq: int, sizes: BertSizes, vocab: int) -> Job:
    """The bert stage's BertForMaskedLM (build_bert_config), its loss call: ids, padding mask, labels."""
    from transformers import BertForMaskedLM

    from stages.models.bert import build_bert_config

    model = BertForMaskedLM(build_bert_config(sizes, vocab))
    ids = torch.randint(5, vocab, (batch, seq), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]

    def loss(m, idx, step):
        x = ids[idx]
        return m(input_ids=x, attention_mask=x != 0, labels=labels[idx]).loss, {}
    return Job(model, loss, batch, batch, {"optimizer": "adamw", "lr": 1e-4})


def vl_job(device: str, batch: int, k: int, text: int, sizes: BertSizes, vocab: int, feature_dim: int,
           prob_dim: int) -> Job:
    """The vl stage's VLP over K float16 region rows + a caption: its masked-LM loss as stages.vl computes
    it (mask_tokens from the step's generator, both attention masks, the head on the masked tokens)."""
    from transformers import BertForMaskedLM

    from stages.models.bert import build_bert_config
    from stages.models.masking import mask_tokens, step_generator
    from stages.models.vlp import VLP

    special = {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "unk": 1}
    model = VLP(BertForMaskedLM(build_bert_config(sizes, vocab)), feature_dim, prob_dim, special)
    h = torch.float16
    regions = {"feats": torch.randn(batch, k, feature_dim, device=device, dtype=h),
               "geom": torch.rand(batch, k, 6, device=device, dtype=h),
               "probs": torch.rand(batch, k, prob_dim, device=device, dtype=h),
               "n_boxes": torch.full((batch,), k, device=device)}
    caps = torch.randint(5, vocab, (batch, text), device=device)
    normal = torch.arange(5, vocab)

    def loss(m, idx, step):
        gen = step_generator(0, step)
        t = caps[idx]
        s2s = (torch.rand(len(t), generator=gen) < 0.5).to(t.device)
        masked, labels = mask_tokens(t, t != 0, 0.15, 4, normal, gen, max_pred=3)
        hid = m(masked, {key: v[idx] for key, v in regions.items()}, s2s)[:, k + 2:]
        sel = labels != -100
        return nn.functional.cross_entropy(m.mlm.cls(hid[sel]), labels[sel]), {}
    return Job(model, loss, batch, batch, {"optimizer": "adamw", "lr": 1e-4})
