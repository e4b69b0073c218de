"""Stage 5 `caption`: image captioning fine-tune of the VLP model (seq2seq masked LM) + decoding.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Fine-tunes the ``init`` stage's VLP model (``init: null`` = the same architecture with random
weights, the "does pretraining help" control) on ``[CLS] regions [SEP] caption [SEP]`` under the
seq2seq mask: caption tokens (and the closing [SEP], so it learns to stop) are masked and predicted
from the regions and the caption to their left. Decoding is VLP's: append [MASK] at position t,
predict it under the seq2seq mask, write the prediction in, repeat; batched over images, greedy
(``decode.beam_size: 1``) or beam search. No KV cache: at this size re-running the prefix is cheap.

Writes ``outputs/model/`` (a VLP dir, :func:`stages.vl.load_vl`), ``outputs/tokenizer/``,
``outputs/captions_val.json`` (COCO results format ``[{image_id, caption}]``),
``outputs/samples.json`` and ``outputs/samples/*.png`` (val images with the generated caption and a
reference caption underneath; both logged as the MLflow artifact ``samples/``); reports BLEU-1..4, ROUGE-L and CIDEr-D on val against predicting the most
common training caption for every image.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from stages.base import StageContext, StageError, StageResult, log
from stages.bert import mask_tokens, normal_token_ids, step_generator
from stages.config.caption import Config, DecodeConfig  # noqa: F401 - the kind's config
from stages.data import caption_image_path, coco_captions_file, load_coco_captions, open_rgb
from stages.metrics import caption_scores
from stages.train import autocast, fit, to_device
from stages.vl import (VLP, RegionTable, build_model, caption_data, check_length, mlm_head_params,
                       open_regions, regions_of, save_vl, transfer_blocks)


# ----------------------------------------------------------------------------------------------
# decoding


def _banned(model: VLP, vocab: int, device) -> torch.Tensor:
    """(V,) additive logit bias that forbids generating [PAD] [CLS] [MASK] (and [UNK])."""
    bias = torch.zeros(vocab, device=device)
    for key in ("pad", "cls", "mask", "unk"):
        if key in model.special:
            bias[model.special[key]] = float("-inf")
    return bias


def _next_logits(model: VLP, text: torch.Tensor, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """VLP's step: text (N, t) so far -> logits (N, V) of a [MASK] appended at position t (seq2seq mask)."""
    N = text.shape[0]
    inp = torch.cat([text, torch.full((N, 1), model.special["mask"], dtype=text.dtype, device=text.device)], 1)
    h = model(inp, regions, torch.ones(N, dtype=torch.bool, device=text.device))  # (N, L, H)
    return model.mlm.cls(h[:, -1]).float()


@torch.no_grad()
def greedy_decode(model: VLP, regions: dict[str, torch.Tensor], max_len: int) -> list[list[int]]:
    """Batched greedy decoding: one token list (without [SEP]) per image of ``regions``."""
    model.eval()
    N, dev = regions["feats"].shape[0], regions["feats"].device
    sep, pad = model.special["sep"], model.special["pad"]
    text = torch.empty(N, 0, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    banned = None
    for _ in range(max_len):
        logits = _next_logits(model, text, regions)
        banned = _banned(model, logits.shape[-1], dev) if banned is None else banned
        nxt = (logits + banned).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)  # finished rows get [PAD] (invisible)
        text = torch.cat([text, nxt[:, None]], 1)
        done |= nxt == sep
        if done.all():
            break
    return [[t for t in row if t not in (sep, pad)] for row in _cut_at_sep(text.tolist(), sep)]


@torch.no_grad()
def beam_decode(model: VLP, regions: dict[str, torch.Tensor], beam: int, max_len: int,
                length_penalty: float) -> list[list[int]]:
    """Batched beam search: the best of ``beam`` hypotheses per image by log p / length**length_penalty
    (length counts the closing [SEP]). Finished hypotheses are carried with [PAD] at no cost."""
    model.eval()
    N, dev = regions["feats"].shape[0], regions["feats"].device
    sep, pad = model.special["sep"], model.special["pad"]
    regions = {k: v.repeat_interleave(beam, 0) for k, v in regions.items()}  # (N*beam, ...)
    text = torch.empty(N * beam, 0, dtype=torch.long, device=dev)
    scores = torch.full((N, beam), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(N, beam, dtype=torch.bool, device=dev)
    lengths = torch.zeros(N, beam, device=dev)
    banned = None
    for _ in range(max_len):
        logits = _next_logits(model, text, regions)  # (N*beam, V)
        V = logits.shape[-1]
        banned = _banned(model, V, dev) if banned is None else banned
        logp = torch.log_softmax(logits + banned, -1).view(N, beam, V)
        pad_only = torch.full((V,), float("-inf"), device=dev)
        pad_only[pad] = 0.0
        logp = torch.where(finished[..., None], pad_only, logp)
        top, idx = (scores[..., None] + logp).view(N, beam * V).topk(beam, -1)  # (N, beam)
        src, tok = idx // V, idx % V
        text = torch.cat([text.view(N, beam, -1).gather(1, src[..., None].expand(-1, -1, text.shape[1])),
                          tok[..., None]], 2).view(N * beam, -1)
        finished, lengths = finished.gather(1, src), lengths.gather(1, src)
        lengths = lengths + (~finished).float()
        finished = finished | (tok == sep)
        scores = top
        if finished.all():
            break
    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(-1)  # (N,)
    rows = text.view(N, beam, -1)[torch.arange(N, device=dev), best].tolist()
    return [[t for t in row if t not in (sep, pad)] for row in _cut_at_sep(rows, sep)]


def _cut_at_sep(rows: list[list[int]], sep: int) -> list[list[int]]:
    return [row[:row.index(sep)] if sep in row else row for row in rows]


def decode_images(ctx: StageContext, model: VLP, tok, table: RegionTable, image_ids: list[int],
                  cfg: DecodeConfig) -> tuple[dict[int, str], float]:
    """Captions for ``image_ids`` -> ({image_id: caption}, captions per second)."""
    model.to(ctx.device).eval()
    out: dict[int, str] = {}
    t0 = time.perf_counter()
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
    secs = time.perf_counter() - t0
    return out, len(image_ids) / max(secs, 1e-9)


# ----------------------------------------------------------------------------------------------
# samples a person can look at


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


# ----------------------------------------------------------------------------------------------
# the stage


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    store = open_regions(ctx, cfg.regions)
    built = build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, store)
    model, tok = built.model, built.tokenizer
    check_length(model, store.k, max(cfg.max_caption_len, cfg.decode.max_len), "max_caption_len/decode.max_len")
    train_ds, train_caps = caption_data(ctx, cfg.data, "train", tok, store, cfg.max_caption_len)
    val_json = coco_captions_file(ctx.input(cfg.data, "coco"), "val")
    val_caps, val_info = load_coco_captions(val_json)
    val_ids = sorted(val_caps)
    val_table = RegionTable(store, val_ids)
    pad, normal = tok.pad_token_id, normal_token_ids(tok)
    ctx.tracker.log_params({"data.train_pairs": len(train_ds), "data.val_images": len(val_ids),
                            "init.origin": built.origin, "model.params": sum(p.numel() for p in model.parameters())})

    def loss_fn(m: VLP, batch, step: int):
        text = batch["text"]  # (B, T): caption + [SEP]
        k = batch["feats"].shape[1]
        masked, labels = mask_tokens(text, text != pad, cfg.mask_prob, tok.mask_token_id, normal,
                                     step_generator(ctx.seed, step), max_pred=cfg.max_pred)
        h = m(masked, regions_of(batch), torch.ones(len(text), dtype=torch.bool, device=text.device))[:, k + 2:]
        sel = labels != -100
        logits = m.mlm.cls(h[sel])
        return nn.functional.cross_entropy(logits, labels[sel]), \
            {"masked_acc": (logits.argmax(-1) == labels[sel]).float().mean().detach()}

    blocks = transfer_blocks(model, visual_in_backbone=built.origin == "vl")
    head = mlm_head_params(model) + ([] if built.origin == "vl" else list(model.visual.parameters()))

    def evaluate(m: VLP) -> dict[str, float]:
        gen, _ = decode_images(ctx, m, tok, val_table, val_ids, cfg.decode)
        scores = caption_scores({i: c if c.strip() else "unk" for i, c in gen.items()}, val_caps)
        return {f"val/{k}": v for k, v in scores.items()}

    res = fit(ctx, model, train_ds, train_ds.collate, loss_fn, cfg.train, blocks, head, evaluate=evaluate,
              best_metric=("val/CIDEr", "max"))

    generated, caps_per_s = decode_images(ctx, model, tok, val_table, val_ids, cfg.decode)
    empty = [i for i, c in generated.items() if not c.strip()]
    for i in empty:  # the scorers refuse empty captions; an empty output scores as one unknown word
        generated[i] = "unk"
    metrics = {f"val/{k}": v for k, v in caption_scores(generated, val_caps).items()}
    common = Counter(c for cs in train_caps.values() for c in cs).most_common(1)[0][0]
    baselines = {f"val/{k}_most_common_caption": v
                 for k, v in caption_scores({i: common for i in val_ids}, val_caps).items()}
    ctx.tracker.log_metrics(metrics, step=res.step)

    out = ctx.outputs
    save_vl(model.cpu(), out / "model")
    tok.save_pretrained(out / "tokenizer")
    (out / "captions_val.json").write_text(json.dumps([{"image_id": i, "caption": generated[i]} for i in val_ids]))
    samples = [{"image_id": i, "generated": generated[i], "references": val_caps[i]} for i in val_ids[:cfg.num_samples]]
    (out / "samples.json").write_text(json.dumps(samples, indent=2))
    drawn, not_drawn = write_sample_images(val_json, val_info, val_ids, generated, val_caps, out / "samples",
                                           cfg.sample_images)
    ctx.tracker.log_artifact(out / "samples.json", "samples")
    if drawn:
        ctx.tracker.log_artifact(out / "samples", "samples")
    return ctx.result(outputs={"model": "outputs/model", "tokenizer": "outputs/tokenizer",
                               "captions": "outputs/captions_val.json", "samples": "outputs/samples.json",
                               "sample_images": "outputs/samples"},
                      metrics=metrics, baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds, "init": built.origin,
                            "decode_captions_per_s": caps_per_s, "decode": cfg.decode.model_dump(),
                            "empty_captions": len(empty), "baseline_caption": common,
                            "sample_images": drawn, "sample_images_skipped": not_drawn})
