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

The model (:class:`stages.models.vlp.VLP`, its masks, :func:`~stages.models.vlp.build_model`,
:func:`~stages.models.vlp.load_vl`, :func:`~stages.models.vlp.transfer_blocks`) and the region/text
datasets (:mod:`stages.data.text_regions`) live in models/ and data/, shared with caption and vqa."""
from __future__ import annotations

import torch
from torch import nn

from stages.config.vl import Config  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageResult
from stages.data.text import special_ids, unigram_logprobs
from stages.data.text_regions import caption_data, open_regions, regions_of
from stages.models.masking import mask_tokens, normal_token_ids
from stages.models.vlp import VLP, build_model, check_length, save_vl, transfer_blocks
from stages.train.evaluate import held_out_mlm
from stages.train.distributed import ExampleRandom, example_random, gather_rows, global_token_mean, rank
from stages.train.loop import fit


def pretrain_loss(ctx: StageContext, cfg: Config, tok):
    """The training loss -> ``loss_fn(m, batch, step)``: masked LM on the caption tokens, each example under
    the seq2seq mask with probability ``s2s_prob`` (else bidirectional), plus image-text matching when the
    model has an ITM head. Masks and draws are per example, keyed by (seed, step, position in the step's
    global batch): a resume, or a run on another number of ranks, redraws the same; the MLM loss is the
    global batch's token mean."""
    pad, normal = tok.pad_token_id, normal_token_ids(tok)

    def loss_fn(m: VLP, batch, step: int):
        text = batch["text"]  # (B, T)
        gen = example_random(ctx.seed, step, len(text))
        k = batch["feats"].shape[1]
        s2s = (gen.rand(1, 3)[:, 0] < cfg.s2s_prob).to(text.device)  # else bidirectional
        masked, labels = mask_tokens(text, text != pad, cfg.mask_prob, tok.mask_token_id, normal, gen,
                                     max_pred=cfg.max_pred)
        h = m(masked, regions_of(batch), s2s)[:, k + 2:]  # (B, T, H)
        sel = labels != -100
        logits = m.mlm.cls(h[sel])
        loss = global_token_mean(nn.functional.cross_entropy(logits, labels[sel]), sel.sum())
        logs = {"masked_acc": (logits.argmax(-1) == labels[sel]).float().mean().detach()}
        if m.itm is not None:
            itm_loss, logs["itm_acc"] = itm_step(m, batch, gen)
            loss = loss + itm_loss
        return loss, logs
    return loss_fn


def itm_step(m: VLP, batch: dict[str, torch.Tensor], gen: ExampleRandom) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching: half the examples get another example's regions (those of the example before it
    in the global micro-batch, gathered from every rank); the ITM head on the final [CLS] state predicts
    1 = mismatch. -> (loss, accuracy)."""
    text = batch["text"]
    n, dev = len(text), text.device
    swap = (gen.rand(1, 4)[:, 0] < 0.5).to(dev)
    rows = gather_rows(batch["row"])  # (world * n,) the global micro-batch
    mine = torch.arange(n, device=dev) + rank() * n
    other = (mine - 1) % len(rows)
    swap &= rows[other] != batch["row"]
    src = torch.where(swap, other, mine)
    regions = {key: gather_rows(v)[src] for key, v in regions_of(batch).items()}
    itm_logits = m.itm(m(text, regions, torch.zeros_like(swap))[:, 0])  # (B, 2)
    loss = nn.functional.cross_entropy(itm_logits, swap.long())
    return loss, (itm_logits.argmax(-1) == swap.long()).float().mean().detach()


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    store = open_regions(ctx, cfg.regions)
    built = build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, store, itm=cfg.itm)
    model, tok = built.model, built.tokenizer
    check_length(model, store.k, cfg.max_caption_len, "max_caption_len")
    train_ds, _ = caption_data(ctx, cfg.data, "train", tok, store, cfg.max_caption_len)
    val_ds, _ = caption_data(ctx, cfg.data, "val", tok, store, cfg.max_caption_len)
    all_train = torch.cat([torch.tensor(t) for t in train_ds.texts])
    unigram = unigram_logprobs(all_train, model.mlm.config.vocab_size, special_ids(tok))  # over words
    ctx.tracker.log_params({"data.train_pairs": len(train_ds), "data.val_pairs": len(val_ds), "regions.k": store.k,
                            "init.origin": built.origin, "model.params": sum(p.numel() for p in model.parameters())})

    # baselines before training: the init's BERT reading captions without regions
    baselines = {"val/mlm_ppl_unigram": held_out_mlm(ctx, model.to(ctx.device), val_ds, cfg, tok, s2s=False,
                                                     unigram=unigram)["unigram_ppl"]}
    if built.origin != "scratch":
        text_only = held_out_mlm(ctx, model, val_ds, cfg, tok, False, text_only=True)
        baselines["val/mlm_ppl_text_only_init"] = text_only["ppl"]

    tb = transfer_blocks(model, built.visual_pretrained, train_itm=True)
    res = fit(ctx, model, train_ds, train_ds.collate, pretrain_loss(ctx, cfg, tok), cfg.train,
              blocks=tb.blocks, head=tb.head,
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
