"""The region-feature store: what the detector stage hands to the vision-language stages.

Layout of a store directory (all arrays float16, memory-mapped on read; row i*K..(i+1)*K-1 belongs
to the i-th image of ``index.json``):
    features.npy   (N*K, D)     pooled box features
    geometry.npy   (N*K, 6)     x1, y1, x2, y2 (normalised to [0, 1]), area (normalised), confidence
    probs.npy      (N*K, C+1)   class probabilities (column 0 = background)
    index.json     {"image_ids": [...], "num_boxes": [...], "k": K, "feature_dim": D,
                    "num_classes": C, "classes": [...], "format": 1}
Rows past ``num_boxes[i]`` are zero padding. The store is written into ``.<dir>.tmp-<pid>`` and
renamed into place after everything is fsynced, and ``index.json`` is written last, so a store that
has an index is complete; a writer killed at any point leaves either no store or the previous one.

Precomputed bottom-up-attention features (the TSV dumps of ``generate_tsv.py``) are imported with
:func:`import_bua_tsv`, or from the shell:

    python -m stages.data.regions import-tsv trainval_36.tsv.0 trainval_36.tsv.1 /data/regions/coco_bua36 \\
        --classes objects_vocab.txt
"""
from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.contract import StageError
from stages.fsio import fsync_dir, pid_alive, temp_owner, temp_path, temps_of

FORMAT = 1
GEOMETRY_DIM = 6
STORE_FILES = ("features.npy", "geometry.npy", "probs.npy")


def _remove_stale(path: Path) -> None:
    """Leftovers of writers of ``path`` that died (its temp names whose writer pid is gone)."""
    for d in temps_of(path):
        pid = temp_owner(d.name)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class RegionStoreWriter:
    """Append images one at a time (or in batches) then ``close()`` to publish atomically.

    ``abort()`` (or an exception inside ``with RegionStoreWriter(...)``) removes the temp dir; a
    writer that was killed leaves it behind, and the next writer of the same path removes it."""

    def __init__(self, path: Path, n_images: int, k: int, feature_dim: int, classes: list[str]):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        _remove_stale(self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.n, self.k, self.d, self.classes = n_images, k, feature_dim, list(classes)
        c1 = len(classes) + 1
        mk = lambda name, dim: np.lib.format.open_memmap(self.tmp / name, mode="w+", dtype=np.float16,
                                                          shape=(n_images * k, dim))
        self.features, self.geometry, self.probs = mk("features.npy", feature_dim), mk("geometry.npy", GEOMETRY_DIM), mk("probs.npy", c1)
        self.image_ids: list[int] = []
        self.num_boxes: list[int] = []

    def __enter__(self) -> "RegionStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

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

    def abort(self) -> None:
        for name in ("features", "geometry", "probs"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> Path:
        if len(self.image_ids) != self.n:
            raise StageError(f"region store {self.path}: {len(self.image_ids)} images written, {self.n} announced")
        for a in (self.features, self.geometry, self.probs):
            a.flush()
        del self.features, self.geometry, self.probs
        for name in STORE_FILES:
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        index = {"image_ids": self.image_ids, "num_boxes": self.num_boxes, "k": self.k, "feature_dim": self.d,
                 "num_classes": len(self.classes), "classes": self.classes, "format": FORMAT}
        with open(self.tmp / "index.json", "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        # publish: move an old store aside (one rename), move the new one in (one rename), then delete
        # the old one. A reader sees the old store, no store, or the new store; never a half-deleted one.
        old = temp_path(self.path, "old")
        if self.path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        shutil.rmtree(old, ignore_errors=True)
        return self.path


class RegionStore:
    """Read side: ``store[image_id] -> (features (K, D), geometry (K, 6), probs (K, C+1), n)`` as float16 views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.source: str | None = None  # which config key named this store (for error messages)
        index_file = self.path / "index.json"
        if not index_file.exists():
            raise StageError(f"region store {self.path} is incomplete or missing (no index.json)")
        try:
            idx = json.loads(index_file.read_text())
            if idx.get("format") != FORMAT:
                raise StageError(f"region store {self.path}: format {idx.get('format')} != {FORMAT}")
            self.k, self.feature_dim, self.classes = idx["k"], idx["feature_dim"], idx["classes"]
            self.num_classes = idx["num_classes"]
            self.image_ids: list[int] = idx["image_ids"]
            self.num_boxes: list[int] = idx["num_boxes"]
        except (json.JSONDecodeError, AttributeError, KeyError) as e:
            raise StageError(f"region store {self.path}: unreadable index.json ({type(e).__name__}: {e})") from None
        self.row = {iid: i for i, iid in enumerate(self.image_ids)}
        rows = len(self.image_ids) * self.k
        expect = {"features.npy": (rows, self.feature_dim), "geometry.npy": (rows, GEOMETRY_DIM),
                  "probs.npy": (rows, self.num_classes + 1)}
        arrays = {}
        for name, shape in expect.items():
            try:
                arrays[name] = np.load(self.path / name, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise StageError(f"region store {self.path}: cannot read {name} ({e})") from None
            if arrays[name].shape != shape:
                raise StageError(f"region store {self.path}: {name} shape {arrays[name].shape} does not match "
                                 f"index.json ({shape})")
        self.features, self.geometry, self.probs = (arrays[n] for n in STORE_FILES)

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


# ----------------------------------------------------------------------------------------------
# import of bottom-up-attention TSV dumps

BUA_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# other spellings of the same columns (LXMERT-style dumps: img_id, img_h, img_w, ..., objects_conf)
_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h"}


def _field_size_unlimited() -> None:
    limit = sys.maxsize
    while True:  # a C long may be narrower than sys.maxsize (Windows)
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _b64_len(s: str) -> int:
    """Decoded byte length of a base64 string, without decoding it."""
    s = _unwrap(s)
    return len(s) * 3 // 4 - s[-2:].count("=") if s else 0


def _unwrap(s: str) -> str:
    s = s.strip()
    if s.startswith(("b'", 'b"')) and s[-1:] == s[1]:  # str(bytes) written by some python-3 ports
        s = s[2:-1]
    return s


def read_class_vocab(path: Path) -> list[str]:
    """bottom-up-attention ``objects_vocab.txt``: one class per line, synonyms comma-separated
    (``man,men``); the first synonym names the class."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: class vocabulary not found")
    return [line.split(",")[0].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tsv_rows(path: Path, fieldnames: list[str] | None):
    """Yield (line number, {column: text}) for each row of one TSV; columns named by ``fieldnames``,
    else by a header row (first cell ``image_id``/``img_id``), else the generate_tsv.py order
    (+ cls_prob when a row has one more column)."""
    names = list(fieldnames) if fieldnames else None
    with open(path, newline="", encoding="utf-8") as f:
        for ln, r in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not r:
                continue
            if names is None:
                header = r[0].strip() in ("image_id", "img_id")
                names = [c.strip() for c in r] if header else \
                    list(BUA_FIELDS) + (["cls_prob"] if len(r) == len(BUA_FIELDS) + 1 else [])
                missing = [n for n in BUA_FIELDS if n not in {_ALIASES.get(c, c) for c in names}]
                if missing:
                    raise StageError(f"{path}: columns {names} lack {missing} (a headerless file has the columns "
                                     f"{', '.join(BUA_FIELDS)}[, cls_prob]; pass fieldnames for other orders)")
                if header:
                    continue
            if len(r) != len(names):
                raise StageError(f"{path}: line {ln}: {len(r)} columns, expected {len(names)} ({', '.join(names)})")
            yield ln, {_ALIASES.get(n, n): v for n, v in zip(names, r)}


def _image_id(v: str, where: str) -> int:
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        m = re.search(r"(\d+)(?:\.\w+)?$", v)  # COCO_train2014_000000000009(.jpg) -> 9
        if not m:
            raise StageError(f"{where}: image_id {v!r} is not an integer and does not end in one") from None
        return int(m.group(1))


def _decode(s: str, n: int, name: str, where: str, width: int | None = None) -> np.ndarray:
    try:
        a = np.frombuffer(base64.b64decode(_unwrap(s)), dtype=np.float32)
    except (binascii.Error, ValueError) as e:
        raise StageError(f"{where}: column {name!r} is not base64 float32 ({e})") from None
    if n == 0:
        if a.size:
            raise StageError(f"{where}: num_boxes is 0 but column {name!r} holds {a.size} values")
        return a.reshape(0, width or 0)
    if a.size % n or (width is not None and a.size != n * width):
        want = f"{n} x {width}" if width is not None else f"a multiple of {n}"
        raise StageError(f"{where}: column {name!r} holds {a.size} float32 values, expected {want} "
                         f"(num_boxes = {n})")
    return a.reshape(n, -1)


def import_bua_tsv(tsv_path: Path | str | list, out_dir: Path, classes: list[str] | Path | str | None = None,
                   k: int | None = None, fieldnames: list[str] | None = None) -> RegionStore:
    """Bottom-up-attention TSV file(s) -> a RegionStore at ``out_dir`` (written atomically).

    Columns (tab-separated, no header in ``generate_tsv.py`` dumps; a header row starting with
    ``image_id`` is recognised): image_id, image_w, image_h, num_boxes, boxes = base64 float32 (n, 4)
    x1 y1 x2 y2 in pixels, features = base64 float32 (n, D), and optionally cls_prob = base64 float32
    (n, C+1) (background first) and objects_conf = base64 float32 (n,). Other column orders (LXMERT:
    img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features)
    need ``fieldnames``. A non-integer image_id uses its trailing digits (COCO_val2014_000000000042 -> 42).

    Store rows: geometry = boxes / image size (clipped to [0, 1]), normalised area, confidence =
    objects_conf or 1.0; probs = cls_prob or zeros. ``classes``: a list or an ``objects_vocab.txt``
    (:func:`read_class_vocab`); without it, cls_prob columns are named class_1..class_C. K = ``k`` or
    the largest num_boxes in the files; an image with more boxes keeps the K most confident (first K
    without objects_conf). Duplicate image ids are an error naming both lines.

    >>> store = import_bua_tsv("coco_36.tsv", "/data/regions/coco_bua36")   # doctest: +SKIP
    >>> feats, geom, probs, n = store[42]                                   # (K, D), (K, 6), (K, C+1)
    """
    _field_size_unlimited()
    paths = [Path(p) for p in (tsv_path if isinstance(tsv_path, (list, tuple)) else [tsv_path])]
    for p in paths:
        if not p.is_file():
            raise StageError(f"{p}: TSV file not found")
    names = read_class_vocab(Path(classes)) if isinstance(classes, (str, Path)) else (
        list(classes) if classes is not None else None)
    scan = _scan_tsv(paths, fieldnames)  # pass 1: count, check ids and shapes (no decoding)
    names = _cls_prob_names(names, scan.cls_width)
    k = int(k) if k else max(scan.max_n, 1)
    # pass 2: decode and write
    with RegionStoreWriter(Path(out_dir), len(scan.seen), k, scan.dim, names) as writer:
        for p in paths:
            for ln, r in _tsv_rows(p, fieldnames):
                iid = _image_id(r["image_id"], f"{p}: line {ln}")
                where = f"{p}: line {ln} (image_id {iid})"
                writer.add(iid, *_region_rows(r, where, scan, len(names), k))
        writer.close()
    return RegionStore(out_dir)


@dataclass
class _TsvScan:
    """What pass 1 of :func:`import_bua_tsv` learns from the rows, from base64 lengths only."""
    seen: dict[int, str] = field(default_factory=dict)  # image_id -> "<file> line <n>" of its row
    columns: tuple[set[str], str] | None = None  # the first row's columns, and where that row is
    max_n: int = 0  # the largest num_boxes
    dim: int | None = None  # feature dimension D
    cls_width: int | None = None  # cls_prob columns (C+1, or C without a background column)

    def add(self, p: Path, ln: int, r: dict[str, str]) -> None:
        where = f"{p}: line {ln}"
        if self.columns is None:
            self.columns = (set(r), where)
        elif set(r) != self.columns[0]:
            raise StageError(f"{where}: columns {sorted(r)} differ from those at {self.columns[1]} "
                             f"({sorted(self.columns[0])}): shards must have the same columns")
        iid = _image_id(r["image_id"], where)
        where = f"{p}: line {ln} (image_id {iid})"
        if iid in self.seen:
            raise StageError(f"{where}: duplicate image_id, first at {self.seen[iid]}")
        self.seen[iid] = f"{p.name} line {ln}"
        n = _num_boxes(r, where)
        self.max_n = max(self.max_n, n)
        if not n:
            return
        self.dim = _b64_width(r, "features", n, self.dim, "D", where)
        if "cls_prob" in r:
            self.cls_width = _b64_width(r, "cls_prob", n, self.cls_width, "C+1", where)


def _scan_tsv(paths: list[Path], fieldnames: list[str] | None) -> _TsvScan:
    scan = _TsvScan()
    for p in paths:
        for ln, r in _tsv_rows(p, fieldnames):
            scan.add(p, ln, r)
    if not scan.seen:
        raise StageError(f"{', '.join(map(str, paths))}: no rows")
    if scan.dim is None:
        raise StageError(f"{', '.join(map(str, paths))}: every row has num_boxes 0 (no feature dimension)")
    return scan


def _num_boxes(r: dict[str, str], where: str) -> int:
    try:
        n = int(r["num_boxes"])
    except ValueError:
        raise StageError(f"{where}: num_boxes {r['num_boxes']!r} is not an integer") from None
    if n < 0:
        raise StageError(f"{where}: negative num_boxes {n}")
    return n


def _b64_width(r: dict[str, str], name: str, n: int, known: int | None, symbol: str, where: str) -> int:
    """Width of column ``name`` as n x width float32, from its base64 length; it must equal ``known``."""
    width, rem = divmod(_b64_len(r[name]), 4 * n)
    if rem or (known is not None and width != known):
        raise StageError(f"{where}: column '{name}' is not {n} x {known or symbol} float32")
    return width


def _cls_prob_names(names: list[str] | None, cls_width: int | None) -> list[str]:
    """The class names of the store: ``names``, or class_1..class_C for unnamed cls_prob columns."""
    if cls_width is not None:
        if names is None:
            names = [f"class_{i}" for i in range(1, cls_width)]
        elif cls_width not in (len(names) + 1, len(names)):
            raise StageError(f"cls_prob has {cls_width} columns but classes has {len(names)} names "
                             f"(expected {len(names) + 1}: background + classes)")
    return names or []


def _region_rows(r: dict[str, str], where: str, scan: _TsvScan, n_classes: int,
                 k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One TSV row -> the store rows of its image: features (m, D), geometry (m, 6), probs (m, C+1), m <= k."""
    try:
        w, h = float(r["image_w"]), float(r["image_h"])
    except ValueError:
        raise StageError(f"{where}: image_w/image_h are not numbers") from None
    if not (0 < w < float("inf") and 0 < h < float("inf")):  # NaN fails too
        raise StageError(f"{where}: image size {w}x{h} is not a positive number")
    n = int(r["num_boxes"])
    boxes = _decode(r["boxes"], n, "boxes", where, 4)  # (n, 4) pixels
    feats = _decode(r["features"], n, "features", where, scan.dim)  # (n, D)
    has_conf = "objects_conf" in r
    conf = _decode(r["objects_conf"], n, "objects_conf", where, 1)[:, 0] if has_conf else np.ones(n, np.float32)
    if scan.cls_width is None:
        probs = np.zeros((n, n_classes + 1), np.float32)
    else:
        probs = _decode(r["cls_prob"], n, "cls_prob", where, scan.cls_width)  # (n, C+1) or (n, C)
        if scan.cls_width == n_classes:  # no background column: add an empty one
            probs = np.concatenate([np.zeros((n, 1), np.float32), probs], 1)
    order = np.argsort(-conf, kind="stable")[:k] if n > k and has_conf else np.arange(min(n, k))
    b = np.clip(boxes[order] / np.array([w, h, w, h], np.float32), 0.0, 1.0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    geometry = np.concatenate([b, area[:, None], conf[order, None]], 1)  # (m, 6)
    return feats[order], geometry, probs[order]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stages.data.regions", description="Region-feature store tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-tsv", help="bottom-up-attention TSV file(s) -> a RegionStore directory")
    imp.add_argument("tsv", nargs="+", type=Path, help="TSV file(s) (shards are concatenated in order)")
    imp.add_argument("out_dir", type=Path, help="store directory to write (replaced atomically)")
    imp.add_argument("--classes", type=Path, default=None, help="objects_vocab.txt naming the cls_prob columns")
    imp.add_argument("--k", type=int, default=None, help="regions per image (default: the largest num_boxes)")
    imp.add_argument("--fieldnames", default=None, help="comma-separated column names of a headerless file "
                                                         "whose columns are not the generate_tsv.py order")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        store = import_bua_tsv(args.tsv, args.out_dir, args.classes, k=args.k,
                               fieldnames=args.fieldnames.split(",") if args.fieldnames else None)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = time.perf_counter() - t0
    print(json.dumps({"store": str(store.path), "images": len(store), "k": store.k, "feature_dim": store.feature_dim,
                      "num_classes": store.num_classes, "seconds": round(s, 2),
                      "rows_per_s": round(len(store) * store.k / max(s, 1e-9))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
