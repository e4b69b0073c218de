"""Stage 3 `bert`: BERT masked-LM pretraining on the text corpus.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads the `corpus` output of the ``data`` stage (``train.txt`` / ``val.txt``, one document per
blank-line block), learns a WordPiece vocabulary on the train split (deterministically, see
:func:`learn_wordpiece_vocab`; or loads ``tokenizer.path``),
packs the documents into fixed-length ``[CLS] ... [SEP]`` sequences and trains a
``transformers.BertForMaskedLM`` (15% of the tokens masked 80/10/10, whole words optional).
Writes ``outputs/model/`` (``save_pretrained``: model.safetensors + config.json) and
``outputs/tokenizer/``; reports held-out masked-token perplexity against a unigram baseline.

The masking helpers (:func:`step_generator`, :func:`mask_tokens`) and the model builder
(:func:`build_bert_config`) are shared with the vision-language stages.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast
from transformers.utils import logging as hf_logging

from stages.base import StageContext, StageError, StageResult
from stages.config.bert import SPECIAL_TOKENS, BertSizes, Config, TokenizerConfig  # noqa: F401 - the kind's config
from stages.data import read_corpus
from stages.train import autocast, fit, to_device

hf_logging.disable_progress_bar()

EVAL_MASK_SEED = 12_345  # masking seed of every held-out evaluation: the same tokens are scored each time

# ----------------------------------------------------------------------------------------------
# model and tokenizer builders


def build_bert_config(sizes: BertSizes, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
    """Sizes + vocabulary -> a ``BertConfig`` (sdpa attention, 2 token types).

    >>> BertForMaskedLM(build_bert_config(BertSizes(), vocab_size=100)).config.hidden_size
    64"""
    return BertConfig(vocab_size=vocab_size, hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_layers,
                      num_attention_heads=sizes.num_heads, intermediate_size=sizes.intermediate_size,
                      max_position_embeddings=sizes.max_position, hidden_dropout_prob=sizes.dropout,
                      attention_probs_dropout_prob=sizes.dropout, type_vocab_size=2, pad_token_id=pad_token_id,
                      attn_implementation="sdpa")


def learn_wordpiece_vocab(docs: list[str], vocab_size: int, lowercase: bool, initial_alphabet: str = "") -> list[str]:
    """A WordPiece vocabulary learned from ``docs``, the way tokenizers' ``WordPieceTrainer`` learns one
    (BERT normalisation + pre-tokenisation, then BPE-style merges of the most frequent adjacent pieces,
    continuation pieces prefixed ``##``) but deterministically: ties go to the alphabetically first pair.
    tokenizers' trainer breaks ties in hash order, so the same corpus gave a different vocabulary on every
    run, which changed downstream results. ``initial_alphabet`` characters are in the vocabulary even if
    the corpus lacks them (letters and digits also as ``##`` pieces), so words outside the corpus are
    spelled out rather than [UNK]. Pure python, meant for small corpora (for a large one, pass a ready
    tokenizer as ``tokenizer.path``). Returns the tokens in id order, special tokens first."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm, pre = BertNormalizer(lowercase=lowercase), BertPreTokenizer()
    counts = Counter(w for d in docs for w, _ in pre.pre_tokenize_str(norm.normalize_str(d)))
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in sorted(counts)}  # word -> its current pieces
    extra = {c for c in initial_alphabet} | {"##" + c for c in initial_alphabet if c.isalnum()}
    alphabet = sorted({p for pieces in words.values() for p in pieces} | extra, key=lambda p: (p.startswith("##"), p))
    vocab = SPECIAL_TOKENS + alphabet
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, pieces in words.items():
            for a, b in zip(pieces, pieces[1:]):
                pairs[a, b] += counts[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[2:]
        for w, pieces in words.items():
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[w] = out
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
    return vocab


def train_tokenizer(docs: list[str], cfg: TokenizerConfig) -> BertTokenizerFast:
    """:func:`learn_wordpiece_vocab` as a ``BertTokenizerFast``; special tokens get ids 0..4
    ([PAD] [UNK] [CLS] [SEP] [MASK])."""
    vocab = learn_wordpiece_vocab(docs, cfg.vocab_size, cfg.lowercase, cfg.initial_alphabet)
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=cfg.lowercase)


def special_ids(tok) -> list[int]:
    return sorted({tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id})


def load_tokenizer(path: str | Path) -> BertTokenizerFast:
    try:
        tok = BertTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise StageError(f"cannot load a BERT tokenizer from {path}: {e}") from e
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        if getattr(tok, name) is None:
            raise StageError(f"tokenizer {path} has no {name.removesuffix('_id')}")
    return tok


# ----------------------------------------------------------------------------------------------
# masking (shared with vl / caption)


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the noise of optimizer step ``step``: a resumed run draws the same masks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def mask_tokens(ids: torch.Tensor, candidates: torch.Tensor, mask_prob: float, mask_id: int, normal_ids: torch.Tensor,
                gen: torch.Generator, word_start: torch.Tensor | None = None,
                max_pred: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``ids`` (B, L) at ``candidates`` (B, L bool): each candidate is chosen with
    ``mask_prob`` (at least one per row that has a candidate, at most ``max_pred``); chosen tokens
    become [MASK] 80%, a random token from ``normal_ids`` 10%, stay 10%.
    ``word_start`` (B, L bool) makes a word's WordPieces share one draw (whole-word masking).
    Returns (masked ids, labels: the original id where chosen, -100 elsewhere). Runs on CPU with
    ``gen``; results are moved to ``ids.device``."""
    dev = ids.device
    ids_c, cand = ids.cpu(), candidates.cpu()
    B, L = ids_c.shape
    r = torch.rand(B, L, generator=gen)
    if word_start is not None:
        pos = torch.arange(L).expand(B, L)
        start = torch.cummax(torch.where(word_start.cpu(), pos, 0), dim=1).values  # (B, L) index of the word's first piece
        r = r.gather(1, start)
    r = r.masked_fill(~cand, 2.0)
    chosen = r < mask_prob
    chosen |= (r == r.min(1, keepdim=True).values) & cand  # at least one per row
    if max_pred is not None:
        rank = r.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        chosen &= rank < max_pred
    u = torch.rand(B, L, generator=gen)
    rand_tok = normal_ids[torch.randint(len(normal_ids), (B, L), generator=gen)]
    out = torch.where(chosen & (u < 0.8), torch.full_like(ids_c, mask_id), ids_c)
    out = torch.where(chosen & (u >= 0.8) & (u < 0.9), rand_tok, out)
    labels = torch.where(chosen, ids_c, torch.full_like(ids_c, -100))
    return out.to(dev), labels.to(dev)


def normal_token_ids(tok) -> torch.Tensor:
    """Ids a random replacement may use: the vocabulary minus the special tokens."""
    sp = set(special_ids(tok))
    return torch.tensor([i for i in range(len(tok)) if i not in sp], dtype=torch.long)


def unigram_logprobs(token_ids: torch.Tensor, vocab_size: int, exclude: list[int]) -> torch.Tensor:
    """log p(token) from counts in ``token_ids`` (add-one smoothed over the non-excluded vocabulary)."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double() + 1.0
    counts[exclude] = 0.0
    return (counts / counts.sum()).log()


# ----------------------------------------------------------------------------------------------
# data


def pack_documents(tok, docs: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the documents ([SEP] after each) and cut the stream into ``[CLS] x[seq_len-2] [SEP]``
    rows (the last one [PAD]-padded). Returns (ids (N, seq_len), word_start (N, seq_len) bool)."""
    enc = tok(docs, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in enc:
        stream.extend(ids)
        stream.append(tok.sep_token_id)
    body = seq_len - 2
    n = math.ceil(len(stream) / body)
    out = torch.full((n, seq_len), tok.pad_token_id, dtype=torch.long)
    for i in range(n):
        chunk = stream[i * body:(i + 1) * body]
        out[i, 0] = tok.cls_token_id
        out[i, 1:1 + len(chunk)] = torch.tensor(chunk)
        out[i, 1 + len(chunk)] = tok.sep_token_id
    pieces = tok.convert_ids_to_tokens(out.flatten().tolist())
    word_start = torch.tensor([not p.startswith("##") for p in pieces]).view(n, seq_len)
    return out, word_start


# ----------------------------------------------------------------------------------------------
# evaluation


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


# ----------------------------------------------------------------------------------------------
# the stage


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    corpus = ctx.input(cfg.data, "corpus")
    train_docs, val_docs = read_corpus(corpus / "train.txt"), read_corpus(corpus / "val.txt")

    tok_src = cfg.tokenizer.path or cfg.model.pretrained
    tok = load_tokenizer(tok_src) if tok_src else train_tokenizer(train_docs, cfg.tokenizer)
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

    train_ids, train_ws = pack_documents(tok, train_docs, cfg.seq_len)
    val_ids, val_ws = pack_documents(tok, val_docs, cfg.seq_len)
    sp = torch.tensor(special_ids(tok))
    normal = normal_token_ids(tok)
    unigram = unigram_logprobs(train_ids, model.config.vocab_size, sp.tolist())
    ctx.tracker.log_params({"data.train_docs": len(train_docs), "data.train_seqs": len(train_ids),
                            "data.val_seqs": len(val_ids), "tokenizer.size": len(tok),
                            "model.params": sum(p.numel() for p in model.parameters())})

    def loss_fn(m: BertForMaskedLM, batch, step: int):
        ids, ws = batch  # (B, seq_len) each
        masked, labels = mask_tokens(ids, ~torch.isin(ids, sp.to(ids.device)), cfg.mask_prob, tok.mask_token_id,
                                     normal, step_generator(ctx.seed, step), ws if cfg.whole_word else None)
        out = m(input_ids=masked, attention_mask=ids != tok.pad_token_id, labels=labels)
        sel = labels != -100
        acc = (out.logits[sel].argmax(-1) == labels[sel]).float().mean().detach()
        return out.loss, {"masked_acc": acc}

    emb = model.bert.embeddings
    blocks = [list(emb.parameters())] + [list(layer.parameters()) for layer in model.bert.encoder.layer]
    head = [p for p in model.cls.parameters() if p is not emb.word_embeddings.weight]
    dataset = torch.utils.data.TensorDataset(train_ids, train_ws)
    res = fit(ctx, model, dataset, None, loss_fn, cfg.train, blocks, head,
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
