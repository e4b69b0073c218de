"""(image regions, text) datasets for vl / caption / vqa: region rows gathered lazily from the store's float16 maps per batch."""
from __future__ import annotations

import numpy as np
import torch

from stages.contract import StageContext, StageError
from stages.data.captions import coco_captions_file, load_coco_captions
from stages.data.regions import GEOMETRY_DIM, RegionStore


def open_regions(ctx: StageContext, stage: str, field: str = "regions") -> RegionStore:
    """The RegionStore named by config field ``field`` (= ``stage``): the ``regions`` output of a detector
    stage, or of a real-data world stage with ``paths.regions`` (an imported bottom-up-attention store).
    A missing output or store is an error naming the key."""
    src = f"stages.{ctx.name}.{field} = {stage!r}"
    res = ctx.upstream.get(stage)
    if res is not None and "regions" not in res.outputs:
        hint = (f"set stages.{stage}.paths.regions to a region store (python -m stages.data.regions import-tsv ...)"
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
    plus every extra per-example tensor in ``extras`` (e.g. VQA targets). ``collate`` draws no random numbers:
    the training loop may build batches in a prefetch thread (stages.train.prefetch) while the step runs."""

    prefetchable = True

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
