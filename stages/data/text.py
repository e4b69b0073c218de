"""Text: the corpus (``*.txt``, one document per blank-line block), WordPiece tokenizers, packed sequences."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from stages.config.bert import SPECIAL_TOKENS, TokenizerConfig
from stages.contract import StageError


def read_corpus(path: Path) -> list[str]:
    """Documents from a ``.txt`` file or a directory of ``*.txt`` files (sorted by name).

    A document is a block of lines separated by blank lines; its lines are joined with spaces."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise StageError(f"{path}: corpus not found")
    docs: list[str] = []
    for fp in files:
        try:
            text = fp.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise StageError(f"{fp}: not UTF-8 text ({e})") from None
        cur: list[str] = []
        for line in text.splitlines():
            s = line.strip()
            if s:
                cur.append(s)
            elif cur:
                docs.append(" ".join(cur))
                cur = []
        if cur:
            docs.append(" ".join(cur))
    if not docs:
        raise StageError(f"{path}: empty corpus (no documents in {len(files)} .txt file(s))")
    return docs


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


def unigram_logprobs(token_ids: torch.Tensor, vocab_size: int, exclude: list[int]) -> torch.Tensor:
    """log p(token) from counts in ``token_ids`` (add-one smoothed over the non-excluded vocabulary)."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double() + 1.0
    counts[exclude] = 0.0
    return (counts / counts.sum()).log()


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
