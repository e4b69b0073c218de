"""Masked-LM masking (BERT's 80/10/10) from a generator keyed by (seed, step): the masks of step k do not
depend on what ran before."""
from __future__ import annotations

import torch

from stages.data.text import special_ids

EVAL_MASK_SEED = 12_345  # masking seed of every held-out evaluation: the same tokens are scored each time


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
    ``gen``: a torch.Generator (one stream for the whole batch: evaluation) or a per-example source with
    ``rand(length, stream)`` / ``randint(high, length, stream)`` (training: stages.train.distributed.
    ExampleRandom, the same draws for an example whatever rank or micro-batch it is in); results are moved
    to ``ids.device``."""
    dev = ids.device
    ids_c, cand = ids.cpu(), candidates.cpu()
    B, L = ids_c.shape
    r = _rand(gen, B, L, 0)
    if word_start is not None:
        pos = torch.arange(L).expand(B, L)
        # (B, L) index of the word's first piece
        start = torch.cummax(torch.where(word_start.cpu(), pos, 0), dim=1).values
        r = r.gather(1, start)
    r = r.masked_fill(~cand, 2.0)
    chosen = r < mask_prob
    chosen |= (r == r.min(1, keepdim=True).values) & cand  # at least one per row
    if max_pred is not None:
        rank = r.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        chosen &= rank < max_pred
    u = _rand(gen, B, L, 1)
    rand_tok = normal_ids[torch.randint(len(normal_ids), (B, L), generator=gen) if isinstance(gen, torch.Generator)
                          else gen.randint(len(normal_ids), L, 2)]
    out = torch.where(chosen & (u < 0.8), torch.full_like(ids_c, mask_id), ids_c)
    out = torch.where(chosen & (u >= 0.8) & (u < 0.9), rand_tok, out)
    labels = torch.where(chosen, ids_c, torch.full_like(ids_c, -100))
    return out.to(dev), labels.to(dev)


def _rand(gen, B: int, L: int, stream: int) -> torch.Tensor:
    """(B, L) uniform draws from a torch.Generator, or stream ``stream`` of a per-example source."""
    return torch.rand(B, L, generator=gen) if isinstance(gen, torch.Generator) else gen.rand(L, stream)


def normal_token_ids(tok) -> torch.Tensor:
    """Ids a random replacement may use: the vocabulary minus the special tokens."""
    sp = set(special_ids(tok))
    return torch.tensor([i for i in range(len(tok)) if i not in sp], dtype=torch.long)
