"""Stage 5 `caption`: image captioning fine-tune of the VLP model (seq2seq masked LM) + decoding.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Fine-tunes the ``init`` stage's VLP model (``init: null`` = the same architecture with random
weights, the "does pretraining help" control) on ``[CLS] regions [SEP] caption [SEP]`` under the
seq2seq mask: caption tokens (and the closing [SEP], so it learns to stop) are masked and predicted
from the regions and the caption to their left. Decoding is VLP's: append [MASK] at position t,
predict it under the seq2seq mask, write the prediction in, repeat; batched over images, greedy
(``decode.beam_size: 1``) or beam search. No KV cache: at this size re-running the prefix is cheap.

Writes ``outputs/model/`` (a VLP dir, :func:`stages.models.vlp.load_vl`), ``outputs/tokenizer/``,
``outputs/captions_val.json`` (COCO results format ``[{image_id, caption}]``),
``outputs/samples.json`` and ``outputs/samples/*.png`` (val images with the generated caption and a
reference caption underneath; both logged as the MLflow artifact ``samples/``); reports BLEU-1..4,
ROUGE-L and CIDEr-D on val against predicting the most common training caption for every image."""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from stages.config.caption import Config, DecodeConfig  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageError, StageResult, log
from stages.data.captions import caption_image_path, coco_captions_file, load_coco_captions
from stages.data.common import open_rgb
from stages.data.text_regions import RegionTable, caption_data, open_regions, regions_of
from stages.metrics import caption_scores
from stages.models.decode import beam_decode, greedy_decode
from stages.models.masking import mask_tokens, normal_token_ids
from stages.models.vlp import VLP, build_model, check_length, save_vl, transfer_blocks
from stages.train.device import autocast, to_device
from stages.train.distributed import example_random, global_token_mean
from stages.train.loop import fit
from stages.progress import Progress


def decode_images(ctx: StageContext, model: VLP, tok, table: RegionTable, image_ids: list[int],
                  cfg: DecodeConfig) -> tuple[dict[int, str], float]:
    """Captions for ``image_ids`` -> ({image_id: caption}, captions per second)."""
    model.to(ctx.device).eval()
    out: dict[int, str] = {}
    t0 = time.perf_counter()
    bar = Progress(ctx.name, "decode", len(image_ids), "captions")
    for s in range(0, len(image_ids), cfg.batch_size):
        ids = image_ids[s:s + cfg.batch_size]
        regions = to_device(table.batch(torch.tensor([table.row[i] for i in ids])), ctx.device)
        with autocast(ctx):
            if cfg.beam_size == 1:
                toks = greedy_decode(model, regions, cfg.max_len)
            else:
                toks = beam_decode(model, regions, cfg.beam_size, cfg.max_len, cfg.length_penalty)
        for iid, t in zip(ids, toks):
            out[iid] = tok.decode(t, skip_special_tokens=True).strip()
        bar.update(len(ids))
    secs = time.perf_counter() - t0
    return out, len(image_ids) / max(secs, 1e-9)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line is cut by characters)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
            continue
        while font.getlength(word) > width and len(word) > 1:
            n = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:n])
            word = word[n:]
        lines.append(word)
    return lines or [""]


def render_sample(image: Image.Image, generated: str, reference: str, min_width: int = 320,
                  max_side: int = 512, font_size: int = 14) -> Image.Image:
    """The image (small ones enlarged by a whole factor, pixels kept sharp; big ones shrunk to
    ``max_side``) above a white band with the generated caption (blue) and a reference (grey)."""
    im = image.convert("RGB")
    if im.width < min_width:
        f = math.ceil(min_width / im.width)
        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
    elif max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    font, pad = _font(font_size), 6
    left, top, right, bottom = font.getbbox("Ag")
    line_h = bottom - top + 4
    blocks = [(_wrap("generated: " + generated, font, im.width - 2 * pad), (20, 60, 170)),
              (_wrap("reference: " + reference, font, im.width - 2 * pad), (80, 80, 80))]
    band = pad * 3 + line_h * sum(len(lines) for lines, _ in blocks)
    canvas = Image.new("RGB", (im.width, im.height + band), "white")
    canvas.paste(im, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = im.height + pad
    for lines, colour in blocks:
        for line in lines:
            draw.text((pad, y), line, fill=colour, font=font)
            y += line_h
        y += pad
    return canvas


def write_sample_images(captions_json: Path, info: dict[int, dict], image_ids: list[int], generated: dict[int, str],
                        references: dict[int, list[str]], out_dir: Path, n: int) -> tuple[int, int]:
    """Up to ``n`` PNGs ``<rank>_<image_id>.png`` of the first val images whose file is on disk
    (:func:`stages.data.caption_image_path`), looking at most ``max(50, 5 n)`` images.
    Returns (written, skipped: not on disk / a URL / unreadable)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    written = skipped = 0
    for iid in image_ids[:max(50, 5 * n)]:
        if written >= n:
            break
        path = caption_image_path(captions_json, info.get(iid, {}), "val")
        if path is None:
            skipped += 1
            continue
        try:
            im = open_rgb(path)
        except StageError as e:
            log.warning("caption samples: skipping %s", e)
            skipped += 1
            continue
        render_sample(im, generated[iid], references[iid][0]).save(out_dir / f"{written:02d}_{iid}.png")
        written += 1
    return written, skipped


@dataclass
class ValCaptions:
    """The val split: its COCO captions file, references and image info by image id, and region rows."""

    json: Path
    refs: dict[int, list[str]]
    info: dict[int, dict]
    ids: list[int]  # sorted image ids
    table: RegionTable


def val_captions(ctx: StageContext, cfg: Config, store) -> ValCaptions:
    """The ``coco`` output of ``data``'s val captions + the region store -> :class:`ValCaptions`."""
    val_json = coco_captions_file(ctx.input(cfg.data, "coco"), "val")
    refs, info = load_coco_captions(val_json)
    ids = sorted(refs)
    return ValCaptions(val_json, refs, info, ids, RegionTable(store, ids))


def seq2seq_mlm_loss(ctx: StageContext, cfg: Config, tok):
    """The training loss: masked LM on caption tokens under the seq2seq mask -> ``loss_fn(m, batch, step)``."""
    pad, normal = tok.pad_token_id, normal_token_ids(tok)

    def loss_fn(m: VLP, batch, step: int):
        text = batch["text"]  # (B, T): caption + [SEP]
        k = batch["feats"].shape[1]
        masked, labels = mask_tokens(text, text != pad, cfg.mask_prob, tok.mask_token_id, normal,
                                     example_random(ctx.seed, step, len(text)), max_pred=cfg.max_pred)
        h = m(masked, regions_of(batch), torch.ones(len(text), dtype=torch.bool, device=text.device))[:, k + 2:]
        sel = labels != -100
        logits = m.mlm.cls(h[sel])
        return global_token_mean(nn.functional.cross_entropy(logits, labels[sel]), sel.sum()), \
            {"masked_acc": (logits.argmax(-1) == labels[sel]).float().mean().detach()}
    return loss_fn


def val_scores(generated: dict[int, str], refs: dict[int, list[str]]) -> dict[str, float]:
    """BLEU/ROUGE-L/CIDEr-D as ``val/<name>``; an empty caption scores as one unknown word (the scorers
    refuse empty captions)."""
    return {f"val/{k}": v for k, v in caption_scores({i: c if c.strip() else "unk" for i, c in generated.items()},
                                                     refs).items()}


def save_outputs(ctx: StageContext, cfg: Config, model: VLP, tok, val: ValCaptions,
                 generated: dict[int, str]) -> tuple[int, int]:
    """model/, tokenizer/, captions_val.json, samples.json and samples/*.png -> (images drawn, not drawn)."""
    out = ctx.outputs
    save_vl(model.cpu(), out / "model")
    tok.save_pretrained(out / "tokenizer")
    (out / "captions_val.json").write_text(json.dumps([{"image_id": i, "caption": generated[i]} for i in val.ids]))
    samples = [{"image_id": i, "generated": generated[i], "references": val.refs[i]} for i in val.ids[:cfg.num_samples]]
    (out / "samples.json").write_text(json.dumps(samples, indent=2))
    drawn, not_drawn = write_sample_images(val.json, val.info, val.ids, generated, val.refs, out / "samples",
                                           cfg.sample_images)
    ctx.tracker.log_artifact(out / "samples.json", "samples")
    if drawn:
        ctx.tracker.log_artifact(out / "samples", "samples")
    return drawn, not_drawn


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    store = open_regions(ctx, cfg.regions)
    built = build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, store)
    model, tok = built.model, built.tokenizer
    check_length(model, store.k, max(cfg.max_caption_len, cfg.decode.max_len), "max_caption_len/decode.max_len")
    train_ds, train_caps = caption_data(ctx, cfg.data, "train", tok, store, cfg.max_caption_len)
    val = val_captions(ctx, cfg, store)
    ctx.tracker.log_params({"data.train_pairs": len(train_ds), "data.val_images": len(val.ids),
                            "init.origin": built.origin, "model.params": sum(p.numel() for p in model.parameters())})

    def evaluate(m: VLP) -> dict[str, float]:
        return val_scores(decode_images(ctx, m, tok, val.table, val.ids, cfg.decode)[0], val.refs)

    tb = transfer_blocks(model, built.visual_pretrained)
    res = fit(ctx, model, train_ds, train_ds.collate, seq2seq_mlm_loss(ctx, cfg, tok), cfg.train,
              blocks=tb.blocks, head=tb.head, evaluate=evaluate, best_metric=("val/CIDEr", "max"))

    generated, caps_per_s = decode_images(ctx, model, tok, val.table, val.ids, cfg.decode)
    empty = [i for i, c in generated.items() if not c.strip()]
    generated |= {i: "unk" for i in empty}  # saved as scored (see val_scores)
    metrics = val_scores(generated, val.refs)
    common = Counter(c for cs in train_caps.values() for c in cs).most_common(1)[0][0]
    baselines = {f"{k}_most_common_caption": v for k, v in val_scores({i: common for i in val.ids}, val.refs).items()}
    ctx.tracker.log_metrics(metrics, step=res.step)
    drawn, not_drawn = save_outputs(ctx, cfg, model, tok, val, generated)
    return ctx.result(outputs={"model": "outputs/model", "tokenizer": "outputs/tokenizer",
                               "captions": "outputs/captions_val.json", "samples": "outputs/samples.json",
                               "sample_images": "outputs/samples"},
                      metrics=metrics, baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds, "init": built.origin,
                            "decode_captions_per_s": caps_per_s, "decode": cfg.decode.model_dump(),
                            "empty_captions": len(empty), "baseline_caption": common,
                            "sample_images": drawn, "sample_images_skipped": not_drawn})
