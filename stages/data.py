"""Loaders for the real public dataset formats (DESIGN.md "Data").

The synthetic world (``stages.world``) writes these same formats, so real datasets plug in the
same way. Every malformed input raises :class:`stages.base.StageError` naming the file, the
record (index or id) and the key. Pure python / numpy / torch / PIL.

- ImageNet: ``root/<wnid>/*.JPEG`` class folders -> :func:`load_imagefolder`, :class:`ImageClassDataset`
  (unreadable images: an error naming the file, or skipped and counted); ``synset_words.txt`` ->
  :func:`read_synset_words`, :func:`class_index`
- Visual Genome: ``image_data.json``, ``objects.json``, ``attributes.json`` -> :func:`load_vg`;
  vocabularies -> :func:`vg_vocabularies`; train/val from id lists or seeded -> :func:`vg_splits`
- text corpus: ``*.txt``, one document per blank-line block -> :func:`read_corpus`
- COCO captions JSON -> :func:`load_coco_captions`; an image's file -> :func:`caption_image_path`
- Karpathy split JSON (``dataset_coco.json``) -> :func:`load_karpathy`; Conceptual-Captions-style TSV
  -> :func:`load_cc_tsv`; either -> COCO captions JSON with :func:`write_coco_captions`
- VQA v2 questions + annotations JSON -> :func:`load_vqa`
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.base import StageError, log

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# helpers


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None


def _get(rec: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(rec, dict):
        raise StageError(f"{path}: {where}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise StageError(f"{path}: {where}: missing key {key!r}")
    return rec[key]


def _get_any(rec: Any, keys: tuple[str, ...], path: Path, where: str) -> Any:
    if not isinstance(rec, dict):
        raise StageError(f"{path}: {where}: expected an object, got {type(rec).__name__}")
    for k in keys:
        if k in rec:
            return rec[k]
    alt = " or ".join(repr(k) for k in keys[1:])
    raise StageError(f"{path}: {where}: missing key {keys[0]!r}" + (f" (or {alt})" if alt else ""))


def _int(v: Any, key: str, path: Path, where: str) -> int:
    try:
        if isinstance(v, bool) or v is None:
            raise TypeError
        f = float(v)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise StageError(f"{path}: {where}: key {key!r} must be an integer, got {v!r}") from None


def _num(v: Any, key: str, path: Path, where: str) -> float:
    try:
        if isinstance(v, bool) or v is None:
            raise TypeError
        return float(v)
    except (TypeError, ValueError):
        raise StageError(f"{path}: {where}: key {key!r} must be a number, got {v!r}") from None


def _list(v: Any, key: str, path: Path, where: str) -> list:
    if not isinstance(v, list):
        raise StageError(f"{path}: {where}: key {key!r} must be a list, got {type(v).__name__}")
    return v


_WS = re.compile(r"\s+")


def normalize_name(s: str) -> str:
    """Lowercase, strip, collapse whitespace."""
    return _WS.sub(" ", str(s).strip().lower())


def open_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; unreadable -> StageError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise StageError(f"{path}: cannot read image ({e})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; unreadable -> StageError naming the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise StageError(f"{path}: cannot read image ({e})") from None


# ----------------------------------------------------------------------------------------------
# ImageNet


def load_imagefolder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet layout ``root/<wnid>/*.(JPEG|jpg|jpeg|png)``. Classes = sorted wnid folder names.

    Returns (paths, labels, classes); paths sorted by (class, file name)."""
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise StageError(f"{root}: no class folders (expected <root>/<wnid>/*.JPEG)")
    paths: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        paths.extend(files)
        labels.extend([ci] * len(files))
    if not paths:
        raise StageError(f"{root}: no images ({'/'.join(IMAGE_EXTS)}) in {len(classes)} class folders")
    return paths, labels, classes


SYNSET_FILES = ("synset_words.txt", "LOC_synset_mapping.txt")  # ILSVRC devkit / Kaggle names of the same file


def read_synset_words(root: Path) -> dict[str, str]:
    """wnid -> readable name from ``root/synset_words.txt`` (or ``LOC_synset_mapping.txt``): lines
    ``n01440764 tench, Tinca tinca``. {} when neither file is there."""
    for name in SYNSET_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        out: dict[str, str] = {}
        for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            wnid, _, words = line.strip().partition(" ")
            if not words.strip():
                raise StageError(f"{path}: line {ln}: expected '<wnid> <name>', got {line.strip()!r}")
            out[wnid] = words.strip()
        return out
    return {}


def class_index(classes: list[str], root: Path) -> dict[str, Any]:
    """The class-index file of a classifier: {"wnid_to_index": {wnid: i}, "names": {wnid: name}}, names
    from :func:`read_synset_words` (only the classes it lists; {} without the file)."""
    names = read_synset_words(root)
    return {"wnid_to_index": {c: i for i, c in enumerate(classes)},
            "names": {c: names[c] for c in classes if c in names}}


def decode_resized(path: Path, size: int) -> np.ndarray:
    """Decode an image to RGB uint8 (size, size, 3). JPEGs use PIL's draft mode: libjpeg decodes at 1/2, 1/4
    or 1/8 scale (DCT scaling) when the image is at least that much larger than ``size``, so a 500x375
    ImageNet JPEG read at 64 px costs a fraction of a full decode; then a bilinear resize to ``size``.
    Unreadable -> StageError naming the file."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im.load()
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise StageError(f"{path}: cannot read image ({e})") from None
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.array(im, dtype=np.uint8)


def normalize_images(x: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float, horizontally flipped where ``flip`` (B,) is true,
    normalised with the ImageNet mean/std. Runs on the GPU when ``x`` is there (4x less to copy than float)."""
    x = x.float().div_(255.0)
    if flip is not None and bool(flip.any()):
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageClassDataset(torch.utils.data.Dataset):
    """(CHW float tensor normalised with ImageNet mean/std, int label); ``raw=True``: (CHW uint8, label),
    for batch-side normalisation and augmentation (:func:`normalize_images`).

    Caching is a memory decision: ``cache=True`` decodes every image once into ``self.images`` (uint8,
    N x 3 x H x W), ``cache=False`` decodes per item (in DataLoader workers), ``cache=None`` caches only
    when the decoded set (``decoded_mb``) fits ``cache_mb``. Both give the same pixels
    (:func:`decode_resized`). ``train=True`` without ``raw`` applies a random horizontal flip drawn from
    the torch RNG of the process that loads the item. An unreadable image is a StageError naming the file,
    or with ``skip_bad=True`` it is left out and listed in ``self.skipped`` (without the cache the check is
    PIL's ``verify()``, which catches bad headers but not every truncated body)."""

    def __init__(self, paths: list[Path], labels: list[int], image_size: int, train: bool, cache: bool | None = True,
                 skip_bad: bool = False, cache_mb: float = float("inf"), raw: bool = False):
        if len(paths) != len(labels):
            raise StageError(f"ImageClassDataset: {len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.image_size = int(image_size)
        self.train = bool(train)
        self.raw = bool(raw)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.images: torch.Tensor | None = None
        self.decoded_mb = len(self.paths) * 3 * self.image_size ** 2 / 2 ** 20
        if cache is None:
            cache = self.decoded_mb <= cache_mb
        self.skipped: list[tuple[Path, str]] = []  # (file, why) of unreadable images left out (skip_bad=True)
        if cache:
            s = self.image_size
            buf = np.empty((len(self.paths), s, s, 3), dtype=np.uint8)
            keep: list[int] = []
            for i, p in enumerate(self.paths):
                try:
                    buf[len(keep)] = self._decode(p)
                except StageError as e:
                    if not skip_bad:
                        raise
                    self.skipped.append((p, str(e)))
                    continue
                keep.append(i)
            self.images = torch.from_numpy(buf[:len(keep)]).permute(0, 3, 1, 2).contiguous()
        elif skip_bad:  # no decode pass: check that every file opens as an image (header + structure)
            keep = []
            for i, p in enumerate(self.paths):
                try:
                    with Image.open(p) as im:
                        im.verify()
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                    self.skipped.append((p, f"{p}: cannot read image ({e})"))
                    continue
                keep.append(i)
        if self.skipped:
            self.paths = [self.paths[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            log.warning("skipped %d unreadable image(s), e.g. %s", len(self.skipped), self.skipped[0][1])

    @property
    def cached(self) -> bool:
        return self.images is not None

    def _decode(self, path: Path) -> np.ndarray:
        return decode_resized(path, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def uint8(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return torch.from_numpy(self._decode(self.paths[i])).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.raw:
            return self.uint8(i), self.labels[i]
        x = self.uint8(i).float().div_(255.0)
        if self.train and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        x = (x - self.mean) / self.std
        return x, self.labels[i]


# ----------------------------------------------------------------------------------------------
# Visual Genome


@dataclass
class VGImage:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 (N, 4) x1 y1 x2 y2, clipped to the image
    names: list[str]  # normalised object name per box
    attributes: list[list[str]] = field(default_factory=list)  # normalised attributes per box


def load_vg(vg_dir: Path, image_dir: Path | None = None, bad_boxes: str = "drop") -> tuple[list[VGImage], dict]:
    """Read ``image_data.json``, ``objects.json`` and optional ``attributes.json`` (v1.0-v1.4 keys).

    Images (not opened here) are ``image_dir/<image_id>.jpg`` when ``image_dir`` is given; else the
    folder named in the record's ``url`` when it exists under ``vg_dir`` (the real download unpacks into
    ``VG_100K/`` and ``VG_100K_2/``), else ``vg_dir/images/<image_id>.jpg``.
    Boxes are clipped to the image (VG has many that cross the border by a few pixels). A box with no
    area inside its image (entirely outside it, or of zero/negative size) is dropped and counted with
    ``bad_boxes="drop"``; with ``"error"`` it is an error naming the file, record and object_id.
    Objects listed in another object's ``merged_object_ids`` are skipped (their attributes go
    to the object they were merged into). Returns (images in image_data order, stats)."""
    vg_dir = Path(vg_dir)
    explicit_dir = image_dir is not None
    image_dir = Path(image_dir) if explicit_dir else vg_dir / "images"
    subdirs = {d.name for d in vg_dir.iterdir() if d.is_dir()} if vg_dir.is_dir() and not explicit_dir else set()
    stats = {"images": 0, "objects": 0, "dropped_degenerate": 0, "clipped": 0, "dropped_unnamed": 0,
             "merged": 0, "with_attributes": 0}

    # image_data.json
    p_img = vg_dir / "image_data.json"
    data = read_json(p_img)
    if not isinstance(data, list):
        raise StageError(f"{p_img}: expected a list of image records, got {type(data).__name__}")
    order: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    paths: dict[int, Path] = {}
    for i, rec in enumerate(data):
        where = f"record {i}"
        iid = _int(_get_any(rec, ("image_id", "id"), p_img, where), "image_id", p_img, where)
        where = f"record {i} (image_id {iid})"
        w = _int(_get(rec, "width", p_img, where), "width", p_img, where)
        h = _int(_get(rec, "height", p_img, where), "height", p_img, where)
        if w <= 0 or h <= 0:
            raise StageError(f"{p_img}: {where}: non-positive size {w}x{h}")
        if iid in sizes:
            raise StageError(f"{p_img}: {where}: duplicate image_id {iid}")
        sizes[iid] = (w, h)
        order.append(iid)
        folder = str(rec.get("url") or "").rstrip("/").split("/")[-2:-1]
        paths[iid] = (vg_dir / folder[0] if folder and folder[0] in subdirs else image_dir) / f"{iid}.jpg"

    # objects.json
    p_obj = vg_dir / "objects.json"
    objs = read_json(p_obj)
    if not isinstance(objs, list):
        raise StageError(f"{p_obj}: expected a list of per-image records, got {type(objs).__name__}")
    per_image: dict[int, list[tuple[int, list[float], str]]] = {}
    alias: dict[int, int] = {}  # object id (incl. merged ids) -> kept object id
    for i, rec in enumerate(objs):
        where = f"record {i}"
        iid = _int(_get_any(rec, ("image_id", "id"), p_obj, where), "image_id", p_obj, where)
        where = f"record {i} (image_id {iid})"
        if iid not in sizes:
            raise StageError(f"{p_obj}: {where}: image_id {iid} is not in {p_img.name}")
        if iid in per_image:
            raise StageError(f"{p_obj}: {where}: duplicate image_id {iid}")
        w, h = sizes[iid]
        olist = _list(_get(rec, "objects", p_obj, where), "objects", p_obj, where)
        merged_away: set[int] = set()
        for o in olist:
            if isinstance(o, dict):
                for m in o.get("merged_object_ids") or []:
                    merged_away.add(int(m))
        kept: list[tuple[int, list[float], str]] = []
        for j, o in enumerate(olist):
            ow = f"record {i} (image_id {iid}) object {j}"
            oid = _int(_get_any(o, ("object_id", "id"), p_obj, ow), "object_id", p_obj, ow)
            ow = f"record {i} (image_id {iid}) object {j} (object_id {oid})"
            if oid in merged_away:
                stats["merged"] += 1
                continue
            x = _num(_get(o, "x", p_obj, ow), "x", p_obj, ow)
            y = _num(_get(o, "y", p_obj, ow), "y", p_obj, ow)
            bw = _num(_get(o, "w", p_obj, ow), "w", p_obj, ow)
            bh = _num(_get(o, "h", p_obj, ow), "h", p_obj, ow)
            if "names" in o:
                names = _list(o["names"], "names", p_obj, ow)
                name = normalize_name(names[0]) if names else ""
            elif "name" in o:
                name = normalize_name(o["name"])
            else:
                raise StageError(f"{p_obj}: {ow}: missing key 'names' (or 'name')")
            if not name:
                stats["dropped_unnamed"] += 1
                continue
            box = [x, y, x + bw, y + bh]
            cb = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h),
                  min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
            if cb[2] <= cb[0] or cb[3] <= cb[1]:
                if bad_boxes == "error":
                    raise StageError(
                        f"{p_obj}: {ow}: box x={x:g} y={y:g} w={bw:g} h={bh:g} has no area inside its {w}x{h} image "
                        f"(set bad_boxes: drop in the stage's config to skip such boxes)")
                stats["dropped_degenerate"] += 1
                continue
            if cb != box:
                stats["clipped"] += 1
            kept.append((oid, cb, name))
            alias[oid] = oid
            for m in o.get("merged_object_ids") or []:
                alias[int(m)] = oid
        per_image[iid] = kept

    # attributes.json (optional)
    attrs: dict[int, dict[int, list[str]]] = {}
    p_att = vg_dir / "attributes.json"
    if p_att.is_file():
        arecs = read_json(p_att)
        if not isinstance(arecs, list):
            raise StageError(f"{p_att}: expected a list of per-image records, got {type(arecs).__name__}")
        for i, rec in enumerate(arecs):
            where = f"record {i}"
            iid = _int(_get_any(rec, ("image_id", "id"), p_att, where), "image_id", p_att, where)
            where = f"record {i} (image_id {iid})"
            alist = rec.get("attributes") or []
            _list(alist, "attributes", p_att, where)
            d = attrs.setdefault(iid, {})
            for j, a in enumerate(alist):
                aw = f"record {i} (image_id {iid}) attribute entry {j}"
                oid = _int(_get_any(a, ("object_id", "id"), p_att, aw), "object_id", p_att, aw)
                vals = a.get("attributes") or []
                _list(vals, "attributes", p_att, aw)
                target = alias.get(oid, oid)
                lst = d.setdefault(target, [])
                for v in vals:
                    nv = normalize_name(v)
                    if nv and nv not in lst:
                        lst.append(nv)

    images: list[VGImage] = []
    for iid in order:
        w, h = sizes[iid]
        kept = per_image.get(iid, [])
        ad = attrs.get(iid, {})
        boxes = np.asarray([b for _, b, _ in kept], dtype=np.float32).reshape(-1, 4)
        att = [list(ad.get(oid, [])) for oid, _, _ in kept]
        stats["objects"] += len(kept)
        stats["with_attributes"] += sum(1 for a in att if a)
        images.append(VGImage(image_id=iid, path=paths[iid], width=w, height=h, boxes=boxes,
                              names=[n for _, _, n in kept], attributes=att))
    stats["images"] = len(images)
    return images, stats


def build_vocab(name_lists: Iterable[Iterable[str]], k: int) -> list[str]:
    """The k most frequent names (ties broken alphabetically)."""
    c: Counter[str] = Counter()
    for names in name_lists:
        c.update(names)
    return [n for n, _ in sorted(c.items(), key=lambda t: (-t[1], t[0]))[: max(int(k), 0)]]


def vg_vocabularies(images: list[VGImage], num_objects: int, num_attributes: int) -> tuple[list[str], list[str], dict]:
    """Object and attribute vocabularies of a set of images: the K most frequent normalised names
    (:func:`build_vocab`; K = 0 means every name). Returns (objects, attributes, stats) where stats
    counts the boxes / attribute mentions whose name fell outside the vocabulary."""
    objects = build_vocab((im.names for im in images), num_objects or 1 << 30)
    attributes = build_vocab(((a for al in im.attributes for a in al) for im in images), num_attributes or 1 << 30)
    obj_set, att_set = set(objects), set(attributes)
    stats = {"boxes": sum(len(im.names) for im in images),
             "boxes_unknown_name": sum(n not in obj_set for im in images for n in im.names),
             "attributes": sum(len(al) for im in images for al in im.attributes),
             "attributes_unknown": sum(a not in att_set for im in images for al in im.attributes for a in al)}
    return objects, attributes, stats


def vg_splits(vg_dir: Path, images: list[VGImage], seed: int, val_fraction: float = 0.05,
              lists: tuple[str, str] = ("train_ids.txt", "val_ids.txt")) -> tuple[dict[str, list[int]], str]:
    """Train/val split of ``images`` as indices into it: ({"train": [...], "val": [...]}, how).

    From the id-list files ``vg_dir/train_ids.txt`` and ``vg_dir/val_ids.txt`` (:func:`read_id_list`)
    when they exist; with only one of them the other split is every remaining image. With neither, a
    seeded split: ``round(val_fraction * N)`` images (at least one) drawn by a numpy permutation of
    ``seed``, the same for the same images and seed. Both splits keep ``images`` order."""
    vg_dir = Path(vg_dir)
    by_id = {im.image_id: i for i, im in enumerate(images)}
    files = {split: vg_dir / name for split, name in zip(("train", "val"), lists)}
    present = {split: f for split, f in files.items() if f.is_file()}
    if present:
        chosen: dict[str, list[int]] = {}
        for split, f in present.items():
            ids = read_id_list(f)
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise StageError(f"{f}: {len(missing)} image id(s) not in image_data.json, e.g. {missing[:5]}")
            dup = [i for i, c in Counter(ids).items() if c > 1]
            if dup:
                raise StageError(f"{f}: image id {dup[0]} is listed more than once")
            chosen[split] = sorted(by_id[i] for i in ids)
        if len(chosen) == 2:
            both = set(chosen["train"]) & set(chosen["val"])
            if both:
                iid = images[min(both)].image_id
                raise StageError(f"{files['train']} and {files['val']}: {len(both)} image id(s) in both, "
                                 f"e.g. {iid}")
        else:
            (given, idx), = chosen.items()
            other = "val" if given == "train" else "train"
            taken = set(idx)
            chosen[other] = [i for i in range(len(images)) if i not in taken]
        how = "id lists " + ", ".join(str(f) for f in present.values())
    else:
        if not 0.0 < val_fraction < 1.0:
            raise StageError(f"val_fraction={val_fraction} must be in (0, 1) for a seeded split")
        if len(images) < 2:
            raise StageError(f"{vg_dir}: {len(images)} image(s): a seeded train/val split needs at least 2")
        n_val = min(max(1, round(val_fraction * len(images))), len(images) - 1)
        perm = np.random.default_rng(np.random.SeedSequence([abs(int(seed)), int(seed < 0), 7919])).permutation(len(images))
        val = set(perm[:n_val].tolist())
        chosen = {"train": [i for i in range(len(images)) if i not in val], "val": sorted(val)}
        how = f"seeded split (seed {seed}, val_fraction {val_fraction}: no {lists[0]} / {lists[1]} in {vg_dir})"
    for split in ("train", "val"):
        if not chosen[split]:
            raise StageError(f"{vg_dir}: the {split} split is empty ({how})")
    return {"train": chosen["train"], "val": chosen["val"]}, how


def read_id_list(path: Path) -> list[int]:
    """One integer id per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: id list not found")
    out: list[int] = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            try:
                out.append(int(s))
            except ValueError:
                raise StageError(f"{path}: line {ln}: not an integer id: {s!r}") from None
    return out


# ----------------------------------------------------------------------------------------------
# text corpus


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


# ----------------------------------------------------------------------------------------------
# COCO captions


def load_coco_captions(path: Path) -> tuple[dict[int, list[str]], dict[int, dict]]:
    """COCO captions JSON -> (image_id -> captions, image_id -> {file_name, width, height[, file_path]}).

    Only images with at least one caption appear in the first dict; every listed image in the second."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected an object with 'images' and 'annotations'")
    imgs = _list(_get(data, "images", path, "top level"), "images", path, "top level")
    anns = _list(_get(data, "annotations", path, "top level"), "annotations", path, "top level")
    info: dict[int, dict] = {}
    for i, rec in enumerate(imgs):
        where = f"images[{i}]"
        iid = _int(_get(rec, "id", path, where), "id", path, where)
        where = f"images[{i}] (id {iid})"
        fn = _get(rec, "file_name", path, where)
        # width/height: in every real COCO file, not needed here (absent from converted Karpathy/CC files)
        w = _int(rec["width"], "width", path, where) if rec.get("width") is not None else None
        h = _int(rec["height"], "height", path, where) if rec.get("height") is not None else None
        if iid in info:
            raise StageError(f"{path}: {where}: duplicate image id {iid}")
        info[iid] = {"file_name": str(fn), "width": w, "height": h}
        if rec.get("file_path"):
            info[iid]["file_path"] = str(rec["file_path"])
    caps: dict[int, list[str]] = {}
    for i, rec in enumerate(anns):
        where = f"annotations[{i}]"
        aid = _get(rec, "id", path, where)
        where = f"annotations[{i}] (id {aid})"
        iid = _int(_get(rec, "image_id", path, where), "image_id", path, where)
        cap = _get(rec, "caption", path, where)
        if not isinstance(cap, str) or not cap.strip():
            raise StageError(f"{path}: annotation id {aid} (annotations[{i}]): empty caption")
        if iid not in info:
            raise StageError(f"{path}: {where}: image_id {iid} is not in 'images'")
        caps.setdefault(iid, []).append(_WS.sub(" ", cap.strip()))
    return caps, info


def coco_captions_file(coco_dir: Path, split: str) -> Path:
    """``captions_<split>*.json`` anywhere under coco_dir (synthetic: captions_train.json;
    real COCO: annotations/captions_train2014.json)."""
    coco_dir = Path(coco_dir)
    hits = sorted(coco_dir.rglob(f"captions_{split}*.json"))
    if not hits:
        raise StageError(f"{coco_dir}: no captions_{split}*.json")
    return hits[0]


def caption_image_path(captions_json: Path, info: dict, split: str) -> Path | None:
    """The local image file of a captions-JSON image record, or None (not on disk, or a URL).

    Tried in order: the record's ``file_path`` (baton's extension, written by the world stage for
    synthetic, Karpathy and CC data: an absolute path, a path relative to the JSON's folder, or a
    URL), then ``file_name`` in the JSON's folder, its parent (real COCO keeps the JSON under
    ``annotations/``), and their ``images/`` and ``<split>*/`` sub-folders (``val2014/``)."""
    here = Path(captions_json).parent

    def candidates():
        fp = info.get("file_path")
        if fp:
            if "://" in str(fp):
                return
            yield Path(fp) if Path(fp).is_absolute() else here / fp
        fn = info.get("file_name")
        if fn:
            for base in (here, here.parent):
                yield base / fn
                yield base / "images" / fn
                yield from (d / fn for d in sorted(base.glob(f"{split}*")) if d.is_dir())

    return next((c for c in candidates() if c.is_file()), None)


# ----------------------------------------------------------------------------------------------
# Karpathy split JSON and Conceptual-Captions-style TSV (the world stage converts both to COCO captions)


@dataclass
class CaptionImage:
    """One image of a captions dataset, in any of the supported formats."""
    image_id: int
    file_name: str
    file_path: str  # absolute local path or URL ("" if unknown)
    captions: list[str]


KARPATHY_SPLITS = ("train", "val", "test", "restval")


def load_karpathy(path: Path, image_root: Path | None = None, restval: str = "train"
                  ) -> tuple[dict[str, list[CaptionImage]], dict[str, int]]:
    """Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) -> ({split: images}, stats).

    ``{"images": [{"filepath"?, "filename", "imgid", "cocoid"?, "split", "sentences": [{"raw", ...}]}]}``.
    Image id = ``cocoid`` where the record has one (so ids match COCO-keyed region features), else
    ``imgid``; a repeated id is an error. ``restval`` images go to train (``restval="train"``, the
    usual practice) or are left out (``"drop"``). The image file is ``image_root/filepath/filename``
    (image_root defaults to the JSON's folder). Captions are ``raw``, whitespace-collapsed."""
    path = Path(path)
    if restval not in ("train", "drop"):
        raise StageError(f"restval must be 'train' or 'drop', got {restval!r}")
    root = Path(image_root) if image_root is not None else path.parent
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected an object with an 'images' list (Karpathy split JSON)")
    imgs = _list(_get(data, "images", path, "top level"), "images", path, "top level")
    if not imgs:
        raise StageError(f"{path}: 'images' is empty")
    out: dict[str, list[CaptionImage]] = {"train": [], "val": [], "test": []}
    seen: dict[int, int] = {}
    stats = {"id_from_cocoid": 0, "id_from_imgid": 0, "restval": 0}
    for i, rec in enumerate(imgs):
        where = f"images[{i}]"
        key = "cocoid" if isinstance(rec, dict) and "cocoid" in rec else "imgid"
        iid = _int(_get(rec, key, path, where), key, path, where)
        where = f"images[{i}] ({key} {iid})"
        fn = _get(rec, "filename", path, where)
        if not isinstance(fn, str) or not fn.strip():
            raise StageError(f"{path}: {where}: key 'filename' must be a non-empty string, got {fn!r}")
        split = _get(rec, "split", path, where)
        if split not in KARPATHY_SPLITS:
            raise StageError(f"{path}: {where}: unknown split {split!r} (expected one of {', '.join(KARPATHY_SPLITS)})")
        sents = _list(_get(rec, "sentences", path, where), "sentences", path, where)
        if not sents:
            raise StageError(f"{path}: {where}: no sentences")
        caps = []
        for j, s in enumerate(sents):
            raw = _get(s, "raw", path, f"{where} sentences[{j}]")
            if not isinstance(raw, str) or not raw.strip():
                raise StageError(f"{path}: {where} sentences[{j}]: empty caption ('raw' = {raw!r})")
            caps.append(_WS.sub(" ", raw.strip()))
        if iid in seen:
            raise StageError(f"{path}: {where}: image id {iid} repeats images[{seen[iid]}]")
        seen[iid] = i
        stats[f"id_from_{key}"] += 1
        if split == "restval":
            stats["restval"] += 1
            if restval == "drop":
                continue
            split = "train"
        fp = rec.get("filepath") or ""
        out[split].append(CaptionImage(iid, fn, str((root / str(fp) / fn).resolve()), caps))
    return out, stats


CC_CAPTION_HEADERS = ("caption", "captions", "text", "title")
CC_IMAGE_HEADERS = ("url", "image", "image_url", "image_path", "path", "filepath", "file_path", "file_name", "filename")
CC_VAL_ID_BASE = 1_000_000_000


def load_cc_tsv(path: Path, id_base: int = 0) -> list[CaptionImage]:
    """Conceptual-Captions-style TSV: ``caption<TAB>image`` per line, image a URL or a path (relative
    to the TSV's folder, or absolute). No quoting (captions may contain quotes). The first line is
    skipped only if it is exactly a header (both cells header words, e.g. ``caption<TAB>url``); blank
    lines are skipped; any other line without exactly two non-empty cells is an error naming the line.

    CC has no image ids: image id = ``id_base`` + the 1-based line number, stable for a given file
    (the world stage uses id_base 0 for train and :data:`CC_VAL_ID_BASE` for val)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    out: list[CaptionImage] = []
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise StageError(f"{path}: line {ln}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != 2:
                raise StageError(f"{path}: line {ln}: expected 2 tab-separated columns (caption, image), "
                                 f"got {len(cells)}")
            cap, img = cells[0].strip(), cells[1].strip()
            if ln == 1 and cap.lower() in CC_CAPTION_HEADERS and img.lower() in CC_IMAGE_HEADERS:
                continue
            if not cap:
                raise StageError(f"{path}: line {ln}: empty caption")
            if not img:
                raise StageError(f"{path}: line {ln}: empty image path/url")
            local = "://" not in img
            fp = str((path.parent / img).resolve()) if local else img
            name = Path(img).name if local else img.rstrip("/").rsplit("/", 1)[-1]
            out.append(CaptionImage(id_base + ln, name, fp, [_WS.sub(" ", cap)]))
    if not out:
        raise StageError(f"{path}: no caption rows")
    return out


def write_coco_captions(path: Path, images: list[CaptionImage], description: str) -> int:
    """COCO captions JSON of ``images`` (+ baton's ``file_path`` per image; no width/height: unknown
    without opening every image). Returns the number of captions."""
    cimages = [{"id": im.image_id, "file_name": im.file_name, "file_path": im.file_path} for im in images]
    pairs = [(im.image_id, c) for im in images for c in im.captions]
    anns = [{"id": k + 1, "image_id": iid, "caption": c} for k, (iid, c) in enumerate(pairs)]
    with open(path, "w") as f:
        json.dump({"info": {"description": description}, "licenses": [], "images": cimages, "annotations": anns},
                  f, separators=(",", ":"))
    return len(anns)


# ----------------------------------------------------------------------------------------------
# VQA v2


@dataclass
class VQARecord:
    question_id: int
    image_id: int
    question: str
    answers: list[str]  # the (10) human answers
    answer_type: str
    question_type: str
    multiple_choice_answer: str


def load_vqa(questions_path: Path, annotations_path: Path | None) -> list[VQARecord]:
    """Join VQA v2 questions and annotations on question_id (questions order).

    ``annotations_path=None`` (test-dev style) gives records with no answers."""
    qp = Path(questions_path)
    qd = read_json(qp)
    qs = _list(_get(qd, "questions", qp, "top level"), "questions", qp, "top level")
    anns: dict[int, dict] = {}
    ap = Path(annotations_path) if annotations_path is not None else None
    if ap is not None:
        ad = read_json(ap)
        al = _list(_get(ad, "annotations", ap, "top level"), "annotations", ap, "top level")
        for i, rec in enumerate(al):
            where = f"annotations[{i}]"
            qid = _int(_get(rec, "question_id", ap, where), "question_id", ap, where)
            where = f"annotations[{i}] (question_id {qid})"
            iid = _int(_get(rec, "image_id", ap, where), "image_id", ap, where)
            answers = _list(_get(rec, "answers", ap, where), "answers", ap, where)
            if not answers:
                raise StageError(f"{ap}: {where}: key 'answers' is empty")
            ans = []
            for j, a in enumerate(answers):
                aw = f"{where} answers[{j}]"
                v = _get(a, "answer", ap, aw)
                ans.append(str(v))
            if qid in anns:
                raise StageError(f"{ap}: {where}: duplicate question_id {qid}")
            mca = rec.get("multiple_choice_answer")
            if mca is None:
                mca = Counter(ans).most_common(1)[0][0]
            anns[qid] = {
                "image_id": iid,
                "answers": ans,
                "answer_type": str(_get(rec, "answer_type", ap, where)),
                "question_type": str(_get(rec, "question_type", ap, where)),
                "multiple_choice_answer": str(mca),
            }
    out: list[VQARecord] = []
    seen: set[int] = set()
    for i, rec in enumerate(qs):
        where = f"questions[{i}]"
        qid = _int(_get(rec, "question_id", qp, where), "question_id", qp, where)
        where = f"questions[{i}] (question_id {qid})"
        iid = _int(_get(rec, "image_id", qp, where), "image_id", qp, where)
        q = _get(rec, "question", qp, where)
        if not isinstance(q, str) or not q.strip():
            raise StageError(f"{qp}: {where}: empty question")
        if qid in seen:
            raise StageError(f"{qp}: {where}: duplicate question_id {qid}")
        seen.add(qid)
        if ap is None:
            out.append(VQARecord(qid, iid, q.strip(), [], "", "", ""))
            continue
        a = anns.get(qid)
        if a is None:
            raise StageError(f"{ap}: no annotation for question_id {qid} ({qp.name} {where})")
        if a["image_id"] != iid:
            raise StageError(f"{ap}: question_id {qid}: image_id {a['image_id']} != {iid} in {qp.name}")
        out.append(VQARecord(qid, iid, q.strip(), a["answers"], a["answer_type"], a["question_type"],
                             a["multiple_choice_answer"]))
    extra = sorted(set(anns) - seen)
    if extra:
        raise StageError(f"{ap}: {len(extra)} annotation(s) without a question in {qp.name}, "
                         f"e.g. question_id {extra[0]}")
    return out


def vqa_files(vqa_dir: Path, split: str) -> tuple[Path, Path]:
    """(questions, annotations) for a split: ``*<split>*questions.json`` and ``*<split>*annotations.json``
    under vqa_dir (synthetic: v2_OpenEnded_mscoco_train_questions.json; real: ..._train2014_...)."""
    vqa_dir = Path(vqa_dir)
    q = sorted(vqa_dir.rglob(f"*OpenEnded*_{split}*_questions.json")) or sorted(
        vqa_dir.rglob(f"*_{split}*questions.json"))
    a = sorted(vqa_dir.rglob(f"*_{split}*_annotations.json")) or sorted(vqa_dir.rglob(f"*_{split}*annotations.json"))
    if not q:
        raise StageError(f"{vqa_dir}: no VQA questions file for split {split!r}")
    if not a:
        raise StageError(f"{vqa_dir}: no VQA annotations file for split {split!r}")
    return q[0], a[0]
