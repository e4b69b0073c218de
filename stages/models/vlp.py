"""The unified VLP transformer (Zhou et al. 2020): BERT over [CLS] regions [SEP] text [SEP] under bidirectional
or seq2seq masks; how a vl/caption/vqa stage builds it from its init stage, and its transfer blocks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from stages.config.bert import BertSizes
from stages.contract import StageContext, StageError
from stages.data.regions import GEOMETRY_DIM, RegionStore
from stages.data.text import load_tokenizer
from stages.models.bert import build_bert_config
from stages.models.bert import transfer_blocks as bert_transfer_blocks
from stages.train.checkpoint import load_into, load_weights, save_weights
from stages.train.transfer import TransferBlocks

VL_FORMAT = 1


class VisualEmbedding(nn.Module):
    """Regions -> input embeddings: LayerNorm(MLP(feature) + Linear([geometry, class probs])).

    feats (B, K, D), geom (B, K, 6), probs (B, K, C+1) -> (B, K, hidden). The MLP starts with a
    LayerNorm so the detector's feature scale does not matter. Inputs may be float16 (the region store's
    dtype, as :class:`RegionTable` batches them): they become float32 here, on the model's device."""

    def __init__(self, feature_dim: int, prob_dim: int, hidden: int):
        super().__init__()
        self.feature_dim, self.prob_dim = feature_dim, prob_dim
        self.feat = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden))
        self.loc = nn.Linear(GEOMETRY_DIM + prob_dim, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, feats: torch.Tensor, geom: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        feats, geom, probs = feats.float(), geom.float(), probs.float()
        return self.norm(self.feat(feats) + self.loc(torch.cat([geom, probs], -1)))


def vlp_attention(valid: torch.Tensor, text_start: int, s2s: torch.Tensor) -> torch.Tensor:
    """Which key each query may attend to: (B, L, L) bool, True = visible.

    valid (B, L) bool: non-padding positions; positions < text_start form the first segment
    ([CLS] regions [SEP]); s2s (B,) bool picks the seq2seq mask for an example, else bidirectional.
      bidirectional: query i sees every valid key j.
      seq2seq:       first-segment keys are seen by every query; a text key j is seen only by text
                     queries i >= j. So the first segment attends within itself, text is causal.
    Padding keys are never seen; every row sees at least [CLS] (no empty softmax)."""
    L = valid.shape[1]
    pos = torch.arange(L, device=valid.device)
    first = pos < text_start  # (L,)
    causal = pos[None, :] <= pos[:, None]  # (L, L) key j <= query i
    s2s_rule = first[None, :] | (~first[:, None] & causal)  # (L, L)
    rule = torch.where(s2s[:, None, None], s2s_rule[None], torch.ones_like(s2s_rule)[None])  # (B, L, L)
    return rule & valid[:, None, :]


def bert_attention_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> the 4D mask transformers' BertModel passes through untouched to attention:
    bool (B, 1, L, L) for sdpa (True = attend), additive float (0 / dtype min) for eager."""
    if attn_implementation == "sdpa":
        return allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    raise StageError(f"attention implementation {attn_implementation!r} is not supported by the VLP masks "
                     "(use sdpa or eager)")


class VLP(nn.Module):
    """The unified VLP encoder: transformers' ``BertForMaskedLM`` (as ``self.mlm``, so BERT weights
    load 1:1) whose first segment's word embeddings are replaced by :class:`VisualEmbedding`.

    Layout of every input (``forward`` builds it from the text and the regions):
        0: [CLS]   1..K: regions   K+1: [SEP]   K+2..: text (caption or question, ending in [SEP])
    token type 0 for the first segment, 1 for the text.

    >>> m = VLP(BertForMaskedLM(build_bert_config(BertSizes(), 50)), feature_dim=8, prob_dim=4,
    ...         special={"cls": 2, "sep": 3, "pad": 0, "mask": 4})
    >>> r = {"feats": torch.zeros(2, 3, 8), "geom": torch.zeros(2, 3, 6), "probs": torch.zeros(2, 3, 4),
    ...      "n_boxes": torch.tensor([3, 1])}
    >>> m(torch.tensor([[7, 8, 3], [9, 3, 0]]), r, s2s=torch.tensor([True, False])).shape
    torch.Size([2, 8, 64])"""

    def __init__(self, mlm: BertForMaskedLM, feature_dim: int, prob_dim: int, special: dict[str, int],
                 itm: bool = False):
        super().__init__()
        self.mlm = mlm
        self.visual = VisualEmbedding(feature_dim, prob_dim, mlm.config.hidden_size)
        self.itm = nn.Linear(mlm.config.hidden_size, 2) if itm else None
        self.special = dict(special)

    @property
    def hidden_size(self) -> int:
        return self.mlm.config.hidden_size

    def layout(self, text: torch.Tensor, n_boxes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T) ids -> (ids (B, K+2+T) with [PAD] in the region slots, valid (B, K+2+T) bool)."""
        B = text.shape[0]
        col = lambda v: torch.full((B, 1), v, dtype=text.dtype, device=text.device)  # noqa: E731
        ids = torch.cat([col(self.special["cls"]), col(self.special["pad"]).expand(B, k), col(self.special["sep"]),
                         text], 1)
        regions_valid = torch.arange(k, device=text.device)[None] < n_boxes[:, None]  # (B, K)
        ones = torch.ones(B, 1, dtype=torch.bool, device=text.device)
        valid = torch.cat([ones, regions_valid, ones, text != self.special["pad"]], 1)
        return ids, valid

    def forward(self, text: torch.Tensor, regions: dict[str, torch.Tensor], s2s: torch.Tensor) -> torch.Tensor:
        """text (B, T) ids, regions {feats (B,K,D), geom (B,K,6), probs (B,K,C+1), n_boxes (B,)},
        s2s (B,) bool -> last hidden states (B, K+2+T, hidden)."""
        k = regions["feats"].shape[1]
        ids, valid = self.layout(text, regions["n_boxes"], k)
        word = self.mlm.bert.embeddings.word_embeddings(ids)  # (B, L, H)
        vis = self.visual(regions["feats"], regions["geom"], regions["probs"])  # (B, K, H)
        x = torch.cat([word[:, :1], vis.to(word.dtype), word[:, k + 1:]], 1)
        types = (torch.arange(ids.shape[1], device=ids.device) >= k + 2).long().expand_as(ids)
        mask = bert_attention_mask(vlp_attention(valid, k + 2, s2s), self.mlm.config._attn_implementation, x.dtype)
        return self.mlm.bert(inputs_embeds=x, token_type_ids=types, attention_mask=mask).last_hidden_state

    def config_dict(self) -> dict:
        return {"vlp_format": VL_FORMAT, "bert": self.mlm.config.to_dict(), "feature_dim": self.visual.feature_dim,
                "prob_dim": self.visual.prob_dim, "special": self.special, "itm": self.itm is not None}


def special_of(tok) -> dict[str, int]:
    """A tokenizer -> the ids of its special tokens by role (cls, sep, pad, mask, unk)."""
    return {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id,
            "unk": tok.unk_token_id}


def save_vl(model: VLP, out: Path, extra: dict | None = None) -> None:
    """``out/model.safetensors`` + ``out/config.json`` (what :func:`load_vl` needs)."""
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(model.config_dict() | (extra or {}), indent=2))


def is_vl_dir(model_dir: Path) -> bool:
    """True for a directory written by :func:`save_vl` (vs a transformers ``save_pretrained`` BERT)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("vlp_format") == VL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_vl(model_dir: Path) -> VLP:
    """A directory written by :func:`save_vl` (the ``model`` output of vl/caption) -> the VLP model."""
    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise StageError(f"{model_dir}/config.json: cannot read a VLP config ({e})") from e
    if cfg.get("vlp_format") != VL_FORMAT:
        raise StageError(f"{model_dir}: not a VLP model directory (config.json vlp_format {cfg.get('vlp_format')!r})")
    bert_cfg = BertConfig.from_dict(cfg["bert"])
    bert_cfg._attn_implementation = "sdpa"
    model = VLP(BertForMaskedLM(bert_cfg), cfg["feature_dim"], cfg["prob_dim"], cfg["special"], cfg.get("itm", False))
    state = load_weights(model_dir / "model.safetensors")
    load_into(model, state, str(model_dir), strict=True)
    return model


@dataclass
class Built:
    """What :func:`build_model` returns: the model, its tokenizer and where its weights came from."""

    model: VLP
    tokenizer: object
    origin: Literal["scratch", "bert", "vl"]  # where the weights came from

    @property
    def visual_pretrained(self) -> bool:
        """The visual embedding came with the weights (init from a vl/caption stage)."""
        return self.origin == "vl"


def build_model(ctx: StageContext, init: str | None, tokenizer_from: str | None, sizes: BertSizes,
                store: RegionStore, itm: bool = False) -> Built:
    """The VLP model of a vl/caption/vqa stage, initialised as its config says.

    init = a bert stage: its BertForMaskedLM + tokenizer, new visual embedding (and ITM head);
    init = a vl/caption stage: its whole VLP model + tokenizer (region dims must match ``store``);
    init = None: ``sizes`` with random weights, tokenizer of ``tokenizer_from``."""
    torch.manual_seed(ctx.seed)  # the new parts' random init is reproducible
    if init is None:
        tok = load_tokenizer(ctx.input(tokenizer_from, "tokenizer"))
        mlm = BertForMaskedLM(build_bert_config(sizes, len(tok), tok.pad_token_id))
        return Built(VLP(mlm, store.feature_dim, store.prob_dim, special_of(tok), itm), tok, "scratch")
    model_dir, tok = ctx.input(init, "model"), load_tokenizer(ctx.input(init, "tokenizer"))
    if is_vl_dir(model_dir):
        model = load_vl(model_dir)
        if (model.visual.feature_dim, model.visual.prob_dim) != (store.feature_dim, store.prob_dim):
            raise StageError(f"init={init!r}: its visual embedding reads features of dim {model.visual.feature_dim} "
                             f"and {model.visual.prob_dim} class probs, but the region store {store.path} has "
                             f"{store.feature_dim} and {store.prob_dim}")
        if itm and model.itm is None:
            model.itm = nn.Linear(model.hidden_size, 2)
        return Built(model, tok, "vl")
    mlm = BertForMaskedLM.from_pretrained(str(model_dir), attn_implementation="sdpa")
    if len(tok) > mlm.config.vocab_size:
        raise StageError(f"init={init!r}: tokenizer has {len(tok)} tokens, model vocab_size {mlm.config.vocab_size}")
    return Built(VLP(mlm, store.feature_dim, store.prob_dim, special_of(tok), itm), tok, "bert")


def check_length(model: VLP, k: int, max_text: int, field: str) -> None:
    """The longest input, [CLS] K regions [SEP] text [SEP], must fit the position embeddings."""
    need = k + 3 + max_text
    have = model.mlm.config.max_position_embeddings
    if need > have:
        raise StageError(f"{field}={max_text} with K={k} regions needs {need} positions but the model has "
                         f"max_position={have}: lower {field} or use a model with more positions")


class AnswerHead(nn.Module):
    """The VQA answer classifier: an MLP on the final [CLS] state, optionally beside ``counters`` soft counts.

    Attention pools with softmax weights, so "how many" is hard for a [CLS] state to carry: one matching
    region and two weigh the same once normalised (Zhang et al. 2018, "Learning to Count Objects in Natural
    Images for VQA"). A soft counter is a sum, not a mean: c_j = sum over the image's valid regions of
    sigmoid(w_j . h_r + b_j) with h_r the region's final state (which has attended to the question), so
    it grows with the number of regions that match."""

    def __init__(self, h: int, hidden: int, num_answers: int, counters: int = 0):
        super().__init__()
        self.counters = counters
        self.counter = nn.Linear(h, counters) if counters else None
        self.mlp = nn.Sequential(nn.Linear(h + counters, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, num_answers))

    @property
    def hidden(self) -> int:
        return self.mlp[0].out_features

    def forward(self, states: torch.Tensor, n_boxes: torch.Tensor, k: int) -> torch.Tensor:
        x = states[:, 0]
        if self.counter is not None:
            valid = (torch.arange(k, device=states.device)[None] < n_boxes[:, None]).to(states.dtype)  # (B, K)
            gates = torch.sigmoid(self.counter(states[:, 1:1 + k]))  # (B, K, counters)
            x = torch.cat([x, (gates * valid[..., None]).sum(1)], -1)
        return self.mlp(x)


class VQAModel(nn.Module):
    """VLP encoder + :class:`AnswerHead` on its final states: (B, A) logits."""

    def __init__(self, vlp: VLP, num_answers: int, hidden: int, counters: int = 0):
        super().__init__()
        self.vlp = vlp
        self.head = AnswerHead(vlp.hidden_size, hidden, num_answers, counters)

    def forward(self, text: torch.Tensor, regions: dict[str, torch.Tensor]) -> torch.Tensor:
        bi = torch.zeros(len(text), dtype=torch.bool, device=text.device)
        return self.head(self.vlp(text, regions, bi), regions["n_boxes"], regions["feats"].shape[1])


def transfer_blocks(model: VLP | VQAModel, visual_pretrained: bool, train_itm: bool = False) -> TransferBlocks:
    """A VLP model (vl, caption) or a :class:`VQAModel` -> its BERT's blocks and head
    (:func:`stages.models.bert.transfer_blocks`), with these rules of the VLP family:

    - the visual embedding is part of block 0 once it is pretrained (``visual_pretrained``: the init was
      a vl/caption stage), else it is new and trains with the head;
    - the head is the task's own: for a VQAModel its answer MLP (the MLM head is left out), else the MLM
      head; then the new visual embedding; then, with ``train_itm`` (the vl stage), the ITM head if the
      model has one. Parameters in neither (caption's inherited ITM head, VQA's MLM head) are in no
      optimizer group: they are never updated."""
    vlp = model.vlp if isinstance(model, VQAModel) else model
    bert = bert_transfer_blocks(vlp.mlm)
    visual = list(vlp.visual.parameters())
    blocks = [bert.blocks[0] + visual, *bert.blocks[1:]] if visual_pretrained else bert.blocks
    head = list(model.head.parameters()) if isinstance(model, VQAModel) else bert.head
    head = head + ([] if visual_pretrained else visual)
    if train_itm and vlp.itm is not None:
        head += list(vlp.itm.parameters())
    return TransferBlocks(blocks, head)
