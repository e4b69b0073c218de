"""Stage 4 `vl`: vision-language pretraining of the VLP unified transformer (Zhou et al. 2020).

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
One BERT encoder reads ``[CLS] r1 .. rK [SEP] w1 .. wT [SEP]``: the K detector regions of an image
(the ``regions`` output of the stage named by ``regions``) then a caption (COCO captions JSON, the ``coco``
output of the ``data`` stage). It is trained with masked LM on the caption tokens under two
self-attention masks, drawn per example:

  bidirectional  every token sees every (non-padding) token;
  seq2seq        ``[CLS] regions [SEP]`` see only each other; caption token t sees that segment and
                 caption tokens 1..t (so the model can generate captions left to right).

Weights and tokenizer come from ``init`` (a ``bert`` stage; or a vl/caption stage to continue);
``init: null`` builds the same architecture from ``model`` with random weights and takes the
tokenizer from ``tokenizer_from``. Writes ``outputs/model/`` (model.safetensors + config.json, read
back by :func:`load_vl`) and ``outputs/tokenizer/``; reports held-out masked-LM perplexity on val
captions against (a) the init BERT reading the caption alone (no regions) and (b) a unigram model.

Also the library of the stage-5 tasks (caption, vqa): :class:`VLP`, :class:`VisualEmbedding`,
:func:`vlp_attention` (the two masks), :func:`build_model` / :func:`load_vl`, :class:`RegionTable`,
:class:`TextRegionData`, :func:`transfer_blocks`."""
from __future__ import annotations

import torch
from torch import nn

from stages.config.vl import Config  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageResult
from stages.data.text import special_ids, unigram_logprobs
from stages.data.text_regions import caption_data, open_regions, regions_of
from stages.models.masking import mask_tokens, normal_token_ids, step_generator
from stages.models.vlp import VLP, build_model, check_length, save_vl, transfer_blocks
from stages.train.evaluate import held_out_mlm
from stages.train.loop import fit


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    store = open_regions(ctx, cfg.regions)
    built = build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, store, itm=cfg.itm)
    model, tok = built.model, built.tokenizer
    check_length(model, store.k, cfg.max_caption_len, "max_caption_len")
    train_ds, _ = caption_data(ctx, cfg.data, "train", tok, store, cfg.max_caption_len)
    val_ds, _ = caption_data(ctx, cfg.data, "val", tok, store, cfg.max_caption_len)
    pad, normal = tok.pad_token_id, normal_token_ids(tok)
    all_train = torch.cat([torch.tensor(t) for t in train_ds.texts])
    unigram = unigram_logprobs(all_train, model.mlm.config.vocab_size, special_ids(tok))  # over words
    ctx.tracker.log_params({"data.train_pairs": len(train_ds), "data.val_pairs": len(val_ds), "regions.k": store.k,
                            "init.origin": built.origin, "model.params": sum(p.numel() for p in model.parameters())})

    # baselines before training: the init's BERT reading captions without regions
    baselines = {"val/mlm_ppl_unigram": held_out_mlm(ctx, model.to(ctx.device), val_ds, cfg, tok, s2s=False,
                                                     unigram=unigram)["unigram_ppl"]}
    if built.origin != "scratch":
        baselines["val/mlm_ppl_text_only_init"] = held_out_mlm(ctx, model, val_ds, cfg, tok, False, text_only=True)["ppl"]

    def loss_fn(m: VLP, batch, step: int):
        gen = step_generator(ctx.seed, step)
        text = batch["text"]  # (B, T)
        k = batch["feats"].shape[1]
        s2s = (torch.rand(len(text), generator=gen) < cfg.s2s_prob).to(text.device)  # else bidirectional
        masked, labels = mask_tokens(text, text != pad, cfg.mask_prob, tok.mask_token_id, normal, gen,
                                     max_pred=cfg.max_pred)
        h = m(masked, regions_of(batch), s2s)[:, k + 2:]  # (B, T, H)
        sel = labels != -100
        logits = m.mlm.cls(h[sel])
        loss = nn.functional.cross_entropy(logits, labels[sel])
        logs = {"masked_acc": (logits.argmax(-1) == labels[sel]).float().mean().detach()}
        if m.itm is not None:
            # half the examples get another example's regions (rolled batch); label 1 = mismatch
            swap = (torch.rand(len(text), generator=gen) < 0.5).to(text.device)
            other = torch.roll(torch.arange(len(text), device=text.device), 1)
            swap &= batch["row"][other] != batch["row"]
            src = torch.where(swap, other, torch.arange(len(text), device=text.device))
            regions = {key: v[src] for key, v in regions_of(batch).items()}
            itm_logits = m.itm(m(text, regions, torch.zeros_like(swap))[:, 0])
            loss = loss + nn.functional.cross_entropy(itm_logits, swap.long())
            logs["itm_acc"] = (itm_logits.argmax(-1) == swap.long()).float().mean().detach()
        return loss, logs

    tb = transfer_blocks(model, built.visual_pretrained, train_itm=True)
    res = fit(ctx, model, train_ds, train_ds.collate, loss_fn, cfg.train, blocks=tb.blocks, head=tb.head,
              evaluate=lambda m: {"val/mlm_ppl": held_out_mlm(ctx, m, val_ds, cfg, tok, s2s=False)["ppl"]},
              best_metric=("val/mlm_ppl", "min"))

    bi = held_out_mlm(ctx, model, val_ds, cfg, tok, s2s=False)
    s2s = held_out_mlm(ctx, model, val_ds, cfg, tok, s2s=True)
    metrics = {"val/mlm_ppl": bi["ppl"], "val/mlm_acc": bi["acc"], "val/s2s_ppl": s2s["ppl"], "val/s2s_acc": s2s["acc"]}
    ctx.tracker.log_metrics(metrics, step=res.step)
    save_vl(model.cpu(), ctx.outputs / "model")
    tok.save_pretrained(ctx.outputs / "tokenizer")
    return ctx.result(outputs={"model": "outputs/model", "tokenizer": "outputs/tokenizer"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds, "init": built.origin,
                            "pairs_per_s": res.steps_per_s * cfg.train.batch_size,
                            "baseline_note": "text_only_init = the init BERT on the caption alone (no regions), "
                                             "same masked tokens; unigram = train caption token frequencies"})
