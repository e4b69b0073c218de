"""Caption decoding with a VLP model (VLP's: append [MASK] at position t under the seq2seq mask, predict it):
batched greedy and beam search."""
from __future__ import annotations

import torch

from stages.models.vlp import VLP


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
