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
:class:`TextRegionData`, :func:`transfer_blocks`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from stages.base import StageContext, StageError, StageResult
from stages.bert import (EVAL_MASK_SEED, BertSizes, build_bert_config, load_tokenizer, mask_tokens, normal_token_ids,
                         special_ids, step_generator, unigram_logprobs)
from stages.checkpoint import load_into, load_weights, save_weights
from stages.config.vl import Config  # noqa: F401 - the kind's config
from stages.data import coco_captions_file, load_coco_captions
from stages.regions import GEOMETRY_DIM, RegionStore
from stages.train import autocast, fit, to_device

VL_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# the model


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
    model: VLP
    tokenizer: object
    origin: Literal["scratch", "bert", "vl"]  # where the weights came from


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


def transfer_blocks(model: VLP, visual_in_backbone: bool) -> list[list[nn.Parameter]]:
    """Backbone blocks for stages.transfer: [embeddings (+ visual embedding), layer 0, layer 1, ...].
    The visual embedding belongs to the backbone once it is pretrained (caption/vqa after vl)."""
    emb = list(model.mlm.bert.embeddings.parameters())
    if visual_in_backbone:
        emb += list(model.visual.parameters())
    return [emb] + [list(layer.parameters()) for layer in model.mlm.bert.encoder.layer]


def mlm_head_params(model: VLP) -> list[nn.Parameter]:
    """The MLM head minus its decoder weight, which is tied to the word embeddings (block 0)."""
    tied = model.mlm.bert.embeddings.word_embeddings.weight
    return [p for p in model.mlm.cls.parameters() if p is not tied]


# ----------------------------------------------------------------------------------------------
# data


def open_regions(ctx: StageContext, stage: str, field: str = "regions") -> RegionStore:
    """The RegionStore named by config field ``field`` (= ``stage``): the ``regions`` output of a detector
    stage, or of a real-data world stage with ``paths.regions`` (an imported bottom-up-attention store).
    A missing output or store is an error naming the key."""
    src = f"stages.{ctx.name}.{field} = {stage!r}"
    res = ctx.upstream.get(stage)
    if res is not None and "regions" not in res.outputs:
        hint = (f"set stages.{stage}.paths.regions to a region store (python -m stages.regions import-tsv ...)"
                if res.kind == "world" else "that stage writes no region store")
        raise StageError(f"{src}: stage {stage!r} has no `regions` output ({hint})")
    path = ctx.input(stage, "regions")
    try:
        store = RegionStore(path)
    except StageError as e:
        raise StageError(f"{src}: {e}") from None
    store.source = src
    return store


class RegionTable:
    """The regions of a set of images, read lazily from a RegionStore's float16 memory maps.

    ``table.row[image_id]`` -> row index; ``table.batch(rows)`` -> the ``regions`` dict :class:`VLP` reads:
    only those images' K rows are gathered from the maps (100k images x K=100 x D=2048 is 41 GB as
    float16: never all in memory). The batch stays float16 (half the bytes to pin and copy) and becomes
    float32 in :class:`VisualEmbedding`, on the device: numpy's float16 -> float32 conversion is ~10x
    slower than the gather on a CPU. In a DataLoader the gather runs in the workers
    (``TextRegionData.collate``). Pickles without the maps; a copy re-opens the store by path (DataLoader
    workers under spawn)."""

    def __init__(self, store: RegionStore, image_ids: list[int]):
        missing = [i for i in image_ids if i not in store]
        if missing:
            src = store.source
            raise StageError(f"{src + ': ' if src else ''}region store {store.path} has no regions for "
                             f"{len(missing)} image(s), e.g. image_id {missing[:5]} (was the detector run on "
                             f"these images, or the store imported from their features?)")
        self.path, self.k = store.path, store.k
        self.row = {iid: r for r, iid in enumerate(image_ids)}
        self.store_rows = np.array([store.row[i] for i in image_ids], dtype=np.int64)  # table row -> store image
        self.n_boxes = torch.tensor([store.num_boxes[j] for j in self.store_rows.tolist()], dtype=torch.long)
        self._store: RegionStore | None = store

    def __len__(self) -> int:
        return len(self.store_rows)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_store": None}

    def _maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._store is None:
            self._store = RegionStore(self.path)
        s = self._store
        return (s.features.reshape(-1, s.k, s.feature_dim), s.geometry.reshape(-1, s.k, GEOMETRY_DIM),
                s.probs.reshape(-1, s.k, s.prob_dim))

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = self.store_rows[rows.numpy()]
        feats, geom, probs = (torch.from_numpy(a[idx]) for a in self._maps())  # float16 (B, K, *)
        return {"feats": feats, "geom": geom, "probs": probs, "n_boxes": self.n_boxes[rows]}


def encode_texts(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """WordPiece ids of each text, cut to ``max_len``, then [SEP]."""
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [ids[:max_len] + [tok.sep_token_id] for ids in enc]


class TextRegionData(torch.utils.data.Dataset):
    """(image row, text ids) pairs. Items are indices; :meth:`collate` builds the whole batch:
    {"text": (B, T) ids [PAD]-padded to the batch's longest, "row": (B,), + the regions dict},
    plus every extra per-example tensor in ``extras`` (e.g. VQA targets)."""

    def __init__(self, table: RegionTable, rows: list[int], texts: list[list[int]], pad_id: int,
                 extras: dict[str, torch.Tensor] | None = None):
        self.table, self.rows, self.texts, self.pad = table, torch.tensor(rows, dtype=torch.long), texts, pad_id
        self.extras = extras or {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        T = max(len(self.texts[i]) for i in idx)
        text = torch.full((len(idx), T), self.pad, dtype=torch.long)
        for b, i in enumerate(idx):
            text[b, :len(self.texts[i])] = torch.tensor(self.texts[i])
        rows = self.rows[idx]
        ix = torch.tensor(idx)
        return {"text": text, "row": rows, **self.table.batch(rows), **{k: v[ix] for k, v in self.extras.items()}}

    def batches(self, batch_size: int):
        """In order, for evaluation."""
        for s in range(0, len(self), batch_size):
            yield self.collate(list(range(s, min(s + batch_size, len(self)))))


def caption_data(ctx: StageContext, data: str, split: str, tok, store: RegionStore, max_len: int,
                 table: RegionTable | None = None) -> tuple[TextRegionData, dict[int, list[str]]]:
    """Every (image, caption) pair of a COCO captions split -> (dataset, image_id -> captions)."""
    caps, _ = load_coco_captions(coco_captions_file(ctx.input(data, "coco"), split))
    image_ids = sorted(caps)
    table = table or RegionTable(store, image_ids)
    pairs = [(iid, c) for iid in image_ids for c in caps[iid]]
    texts = encode_texts(tok, [c for _, c in pairs], max_len)
    return TextRegionData(table, [table.row[i] for i, _ in pairs], texts, tok.pad_token_id), caps


def regions_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The regions dict of a :class:`TextRegionData` batch."""
    return {k: batch[k] for k in ("feats", "geom", "probs", "n_boxes")}


# ----------------------------------------------------------------------------------------------
# evaluation


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


# ----------------------------------------------------------------------------------------------
# the stage


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

    blocks = transfer_blocks(model, visual_in_backbone=built.origin == "vl")
    head = mlm_head_params(model) + ([] if built.origin == "vl" else list(model.visual.parameters()))
    head += list(model.itm.parameters()) if model.itm is not None else []
    res = fit(ctx, model, train_ds, train_ds.collate, loss_fn, cfg.train, blocks, head,
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
