"""Held-out evaluation passes shared by several stage kinds."""
from __future__ import annotations

import math

import torch
from torch import nn

from stages.contract import StageContext
from stages.data.text_regions import TextRegionData, regions_of
from stages.models.masking import EVAL_MASK_SEED, mask_tokens, normal_token_ids
from stages.models.vlp import VLP
from stages.train.device import autocast, to_device


@torch.no_grad()
def held_out_mlm(ctx: StageContext, model: VLP, ds: TextRegionData, cfg, tok, s2s: bool,
                 text_only: bool = False, unigram: torch.Tensor | None = None) -> dict[str, float]:
    """Masked-LM perplexity of caption words on ``ds`` with the fixed EVAL_MASK_SEED masks (the same
    tokens every call; the closing [SEP] is never scored: a text-only BERT was not trained to predict it).
    ``text_only``: the BERT inside reads ``[CLS] caption [SEP]`` without regions (token type 0).
    Returns {"ppl", "acc"} (+ "unigram_ppl" of the same tokens when ``unigram`` is given)."""
    model.eval()
    normal = normal_token_ids(tok)
    gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
    pad = tok.pad_token_id
    nll = uni = correct = n = 0.0
    for batch in ds.batches(cfg.eval_batch_size):
        text = batch["text"]
        words = (text != pad) & (text != tok.sep_token_id)
        masked, labels = mask_tokens(text, words, cfg.mask_prob, tok.mask_token_id, normal, gen, max_pred=cfg.max_pred)
        sel = labels != -100
        batch = to_device(batch | {"masked": masked}, ctx.device)
        with autocast(ctx):
            if text_only:
                ids = torch.cat([torch.full_like(batch["masked"][:, :1], tok.cls_token_id), batch["masked"]], 1)
                valid = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), batch["text"] != pad], 1)
                h = model.mlm.bert(input_ids=ids, attention_mask=valid).last_hidden_state[:, 1:]
            else:
                k = batch["feats"].shape[1]
                s = torch.full((len(text),), s2s, dtype=torch.bool, device=ctx.device)
                h = model(batch["masked"], regions_of(batch), s)[:, k + 2:]
            logits = model.mlm.cls(h[sel.to(ctx.device)]).float().cpu()
        nll += nn.functional.cross_entropy(logits, labels[sel], reduction="sum").item()
        correct += (logits.argmax(-1) == labels[sel]).sum().item()
        if unigram is not None:
            uni -= unigram[labels[sel]].sum().item()
        n += sel.sum().item()
    out = {"ppl": math.exp(nll / n), "acc": correct / n}
    if unigram is not None:
        out["unigram_ppl"] = math.exp(uni / n)
    return out
