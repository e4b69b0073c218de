"""Stage 3 `bert`: BERT masked-LM pretraining on the text corpus.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads the `corpus` output of the ``data`` stage (``train.txt`` / ``val.txt``, one document per
blank-line block), learns a WordPiece vocabulary on the train split (deterministically, see
:func:`learn_wordpiece_vocab`; or loads ``tokenizer.path``),
packs the documents into fixed-length ``[CLS] ... [SEP]`` sequences and trains a
``transformers.BertForMaskedLM`` (15% of the tokens masked 80/10/10, whole words optional).
Writes ``outputs/model/`` (``save_pretrained``: model.safetensors + config.json) and
``outputs/tokenizer/``; reports held-out masked-token perplexity against a unigram baseline.

The masking helpers (:mod:`stages.models.masking`) and the model builder and transfer blocks
(:mod:`stages.models.bert`) are shared with the vision-language stages."""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertForMaskedLM
from transformers.utils import logging as hf_logging

from stages.config.bert import SPECIAL_TOKENS, BertSizes, Config, TokenizerConfig  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageError, StageResult
from stages.data.text import load_tokenizer, pack_documents, read_corpus, special_ids, train_tokenizer, unigram_logprobs
from stages.models.bert import build_bert_config, transfer_blocks
from stages.models.masking import EVAL_MASK_SEED, mask_tokens, normal_token_ids
from stages.train.distributed import example_random, global_token_mean
from stages.train.device import autocast, to_device
from stages.train.loop import fit

hf_logging.disable_progress_bar()


@torch.no_grad()
def masked_lm_eval(ctx: StageContext, model: BertForMaskedLM, ids: torch.Tensor, word_start: torch.Tensor,
                   cfg: Config, tok, unigram: torch.Tensor) -> tuple[float, float, float]:
    """Held-out masked-token cross-entropy with the fixed EVAL_MASK_SEED masks.
    Returns (model perplexity, masked-token accuracy, unigram perplexity of the same tokens)."""
    model.eval()
    sp = torch.tensor(special_ids(tok))
    normal = normal_token_ids(tok)
    gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
    nll = uni = correct = n = 0.0
    for s in range(0, len(ids), cfg.eval_batch_size):
        x, ws = ids[s:s + cfg.eval_batch_size], word_start[s:s + cfg.eval_batch_size]
        masked, labels = mask_tokens(x, ~torch.isin(x, sp), cfg.mask_prob, tok.mask_token_id, normal, gen,
                                     ws if cfg.whole_word else None)
        sel = labels != -100
        with autocast(ctx):
            logits = model(**to_device({"input_ids": masked, "attention_mask": x != tok.pad_token_id},
                                       ctx.device)).logits.float().cpu()
        nll += nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
        correct += (logits[sel].argmax(-1) == labels[sel]).sum().item()
        uni -= unigram[labels[sel]].sum().item()
        n += sel.sum().item()
    return math.exp(nll / n), correct / n, math.exp(uni / n)


def build_mlm(ctx: StageContext, cfg: Config, tok, tok_src: str | None) -> BertForMaskedLM:
    """``model.pretrained`` (checked against seq_len) or ``model`` sizes with seeded random weights; the
    tokenizer must fit the model's vocabulary."""
    if cfg.model.pretrained:
        model = BertForMaskedLM.from_pretrained(cfg.model.pretrained, attn_implementation="sdpa")
        if cfg.seq_len > model.config.max_position_embeddings:
            raise StageError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings="
                             f"{model.config.max_position_embeddings} of model.pretrained={cfg.model.pretrained!r}")
    else:
        torch.manual_seed(ctx.seed)
        model = BertForMaskedLM(build_bert_config(cfg.model, len(tok), tok.pad_token_id))
    if len(tok) > model.config.vocab_size:
        raise StageError(f"tokenizer ({tok_src or 'trained'}) has {len(tok)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model


def masked_lm_loss(ctx: StageContext, cfg: Config, tok):
    """The training loss -> ``loss_fn(m, batch, step)``: masked LM with the step's masks (80/10/10,
    whole words when ``whole_word``), drawn per example (a resumed run, or a run on another number of
    ranks, masks what the unbroken 1-rank run masked); the loss is the global batch's token mean."""
    sp = torch.tensor(special_ids(tok))
    normal = normal_token_ids(tok)

    def loss_fn(m: BertForMaskedLM, batch, step: int):
        ids, ws = batch  # (B, seq_len) each
        masked, labels = mask_tokens(ids, ~torch.isin(ids, sp.to(ids.device)), cfg.mask_prob, tok.mask_token_id,
                                     normal, example_random(ctx.seed, step, len(ids)), ws if cfg.whole_word else None)
        out = m(input_ids=masked, attention_mask=ids != tok.pad_token_id, labels=labels)
        sel = labels != -100
        acc = (out.logits[sel].argmax(-1) == labels[sel]).float().mean().detach()
        return global_token_mean(out.loss, sel.sum()), {"masked_acc": acc}
    return loss_fn


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    corpus = ctx.input(cfg.data, "corpus")
    train_docs, val_docs = read_corpus(corpus / "train.txt"), read_corpus(corpus / "val.txt")
    tok_src = cfg.tokenizer.path or cfg.model.pretrained
    tok = load_tokenizer(tok_src) if tok_src else train_tokenizer(train_docs, cfg.tokenizer)
    model = build_mlm(ctx, cfg, tok, tok_src)
    train_ids, train_ws = pack_documents(tok, train_docs, cfg.seq_len)  # (N, seq_len) each
    val_ids, val_ws = pack_documents(tok, val_docs, cfg.seq_len)
    unigram = unigram_logprobs(train_ids, model.config.vocab_size, special_ids(tok))
    ctx.tracker.log_params({"data.train_docs": len(train_docs), "data.train_seqs": len(train_ids),
                            "data.val_seqs": len(val_ids), "tokenizer.size": len(tok),
                            "model.params": sum(p.numel() for p in model.parameters())})

    tb = transfer_blocks(model)
    dataset = torch.utils.data.TensorDataset(train_ids, train_ws)
    res = fit(ctx, model, dataset, None, masked_lm_loss(ctx, cfg, tok), cfg.train, blocks=tb.blocks, head=tb.head,
              evaluate=lambda m: {"val/perplexity": masked_lm_eval(ctx, m, val_ids, val_ws, cfg, tok, unigram)[0]},
              best_metric=("val/perplexity", "min"))

    ppl, acc, uni_ppl = masked_lm_eval(ctx, model, val_ids, val_ws, cfg, tok, unigram)
    metrics = {"val/perplexity": ppl, "val/masked_acc": acc}
    baselines = {"val/perplexity_unigram": uni_ppl}
    ctx.tracker.log_metrics(metrics, step=res.step)
    model.cpu().save_pretrained(ctx.outputs / "model")
    tok.save_pretrained(ctx.outputs / "tokenizer")
    return ctx.result(outputs={"model": "outputs/model", "tokenizer": "outputs/tokenizer"}, metrics=metrics,
                      baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds,
                            "tokens_per_s": res.steps_per_s * cfg.train.batch_size * cfg.seq_len,
                            "vocab_size": len(tok)})
