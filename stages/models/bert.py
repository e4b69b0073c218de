"""BERT (transformers' BertForMaskedLM) built from sizes given as numbers, and its transfer blocks."""
from __future__ import annotations

from transformers import BertConfig, BertForMaskedLM

from stages.config.bert import BertSizes
from stages.train.transfer import TransferBlocks


def build_bert_config(sizes: BertSizes, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
    """Sizes + vocabulary -> a ``BertConfig`` (sdpa attention, 2 token types).

    >>> BertForMaskedLM(build_bert_config(BertSizes(), vocab_size=100)).config.hidden_size
    64"""
    return BertConfig(vocab_size=vocab_size, hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_layers,
                      num_attention_heads=sizes.num_heads, intermediate_size=sizes.intermediate_size,
                      max_position_embeddings=sizes.max_position, hidden_dropout_prob=sizes.dropout,
                      attention_probs_dropout_prob=sizes.dropout, type_vocab_size=2, pad_token_id=pad_token_id,
                      attn_implementation="sdpa")


def transfer_blocks(mlm: BertForMaskedLM) -> TransferBlocks:
    """A ``BertForMaskedLM`` -> blocks: [embeddings, layer 0, layer 1, ...]; head: the MLM head minus its
    decoder weight, which is tied to the word embeddings (so it trains with block 0). The VLP models
    (:mod:`stages.models.vlp`) build on this rule."""
    emb = mlm.bert.embeddings
    blocks = [list(emb.parameters())] + [list(layer.parameters()) for layer in mlm.bert.encoder.layer]
    return TransferBlocks(blocks, [p for p in mlm.cls.parameters() if p is not emb.word_embeddings.weight])
