"""The region-feature store: what the detector stage hands to the vision-language stages.

Layout of a store directory (all arrays float16, memory-mapped on read; row i*K..(i+1)*K-1 belongs
to the i-th image of ``index.json``):
    features.npy   (N*K, D)     pooled box features
    geometry.npy   (N*K, 6)     x1, y1, x2, y2 (normalised to [0, 1]), area (normalised), confidence
    probs.npy      (N*K, C+1)   class probabilities (column 0 = background)
    index.json     {"image_ids": [...], "num_boxes": [...], "k": K, "feature_dim": D,
                    "num_classes": C, "classes": [...], "format": 1}
Rows past ``num_boxes[i]`` are zero padding. The store is written into ``<dir>.tmp-<pid>`` and
renamed into place after everything is fsynced, and ``index.json`` is written last, so a store that
has an index is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from stages.base import StageError, fsync_dir

FORMAT = 1
GEOMETRY_DIM = 6


class RegionStoreWriter:
    """Append images one at a time (or in batches) then ``close()`` to publish atomically."""

    def __init__(self, path: Path, n_images: int, k: int, feature_dim: int, classes: list[str]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.n, self.k, self.d, self.classes = n_images, k, feature_dim, classes
        c1 = len(classes) + 1
        mk = lambda name, dim: np.lib.format.open_memmap(self.tmp / name, mode="w+", dtype=np.float16,
                                                          shape=(n_images * k, dim))
        self.features, self.geometry, self.probs = mk("features.npy", feature_dim), mk("geometry.npy", GEOMETRY_DIM), mk("probs.npy", c1)
        self.image_ids: list[int] = []
        self.num_boxes: list[int] = []

    def add(self, image_id: int, features: np.ndarray, geometry: np.ndarray, probs: np.ndarray) -> None:
        """features (n, D), geometry (n, 6), probs (n, C+1) with n <= K (padded with zeros)."""
        i, n = len(self.image_ids), min(len(features), self.k)
        if i >= self.n:
            raise StageError(f"region store {self.path}: more images than the {self.n} announced")
        rows = slice(i * self.k, i * self.k + n)
        self.features[rows] = features[:n]
        self.geometry[rows] = geometry[:n]
        self.probs[rows] = probs[:n]
        self.image_ids.append(int(image_id))
        self.num_boxes.append(int(n))

    def close(self) -> Path:
        if len(self.image_ids) != self.n:
            raise StageError(f"region store {self.path}: {len(self.image_ids)} images written, {self.n} announced")
        for a in (self.features, self.geometry, self.probs):
            a.flush()
        del self.features, self.geometry, self.probs
        for name in ("features.npy", "geometry.npy", "probs.npy"):
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        index = {"image_ids": self.image_ids, "num_boxes": self.num_boxes, "k": self.k, "feature_dim": self.d,
                 "num_classes": len(self.classes), "classes": self.classes, "format": FORMAT}
        with open(self.tmp / "index.json", "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path


class RegionStore:
    """Read side: ``store[image_id] -> (features (K, D), geometry (K, 6), probs (K, C+1), n)`` as float16 views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.exists():
            raise StageError(f"region store {self.path} is incomplete or missing (no index.json)")
        idx = json.loads(index_file.read_text())
        if idx.get("format") != FORMAT:
            raise StageError(f"region store {self.path}: format {idx.get('format')} != {FORMAT}")
        self.k, self.feature_dim, self.classes = idx["k"], idx["feature_dim"], idx["classes"]
        self.num_classes = idx["num_classes"]
        self.image_ids: list[int] = idx["image_ids"]
        self.num_boxes: list[int] = idx["num_boxes"]
        self.row = {iid: i for i, iid in enumerate(self.image_ids)}
        self.features = np.load(self.path / "features.npy", mmap_mode="r")
        self.geometry = np.load(self.path / "geometry.npy", mmap_mode="r")
        self.probs = np.load(self.path / "probs.npy", mmap_mode="r")
        if self.features.shape != (len(self.image_ids) * self.k, self.feature_dim):
            raise StageError(f"region store {self.path}: features.npy shape {self.features.shape} does not match index")

    @property
    def prob_dim(self) -> int:
        return self.num_classes + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.row

    def __getitem__(self, image_id: int):
        try:
            i = self.row[image_id]
        except KeyError:
            raise StageError(f"region store {self.path} has no image {image_id}") from None
        s = slice(i * self.k, (i + 1) * self.k)
        return self.features[s], self.geometry[s], self.probs[s], self.num_boxes[i]
