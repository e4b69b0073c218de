"""Visual Genome: ``image_data.json``, ``objects.json``, ``attributes.json`` (v1.0-v1.4 keys), vocabularies, splits, and the detection datasets."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from stages.contract import StageError
from stages.data.common import _get, _get_any, _int, _list, _num, image_size, normalize_name, open_rgb, read_json


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
    stats = {"images": 0, "objects": 0, "dropped_degenerate": 0, "clipped": 0, "dropped_unnamed": 0,
             "merged": 0, "with_attributes": 0}
    sizes, paths = _read_image_data(vg_dir, image_dir)
    per_image, alias = _read_objects(vg_dir / "objects.json", sizes, bad_boxes, stats)
    attrs = _read_attributes(vg_dir / "attributes.json", alias)
    images = [_vg_image(iid, paths[iid], sizes[iid], per_image.get(iid, []), attrs.get(iid, {})) for iid in sizes]
    stats["objects"] = sum(len(im.names) for im in images)
    stats["with_attributes"] = sum(1 for im in images for a in im.attributes if a)
    stats["images"] = len(images)
    return images, stats


# one kept object: (object_id, box x1 y1 x2 y2 clipped to the image, normalised name)
_Object = tuple[int, list[float], str]
IMAGE_DATA = "image_data.json"


def _read_records(path: Path, what: str) -> list:
    """A VG json file, which must hold a list (of ``what``)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise StageError(f"{path}: expected a list of {what}, got {type(data).__name__}")
    return data


def _record_id(rec, path: Path, i: int) -> tuple[int, str]:
    """(image_id, "record i (image_id n)") of the i-th record of a VG file (``image_id`` or v1.0's ``id``)."""
    where = f"record {i}"
    iid = _int(_get_any(rec, ("image_id", "id"), path, where), "image_id", path, where)
    return iid, f"record {i} (image_id {iid})"


def _read_image_data(vg_dir: Path, image_dir: Path | None) -> tuple[dict[int, tuple[int, int]], dict[int, Path]]:
    """``image_data.json`` -> ({image_id: (width, height)} in file order, {image_id: image file})."""
    explicit_dir = image_dir is not None
    image_dir = Path(image_dir) if explicit_dir else vg_dir / "images"
    subdirs = {d.name for d in vg_dir.iterdir() if d.is_dir()} if vg_dir.is_dir() and not explicit_dir else set()
    p_img = vg_dir / IMAGE_DATA
    sizes: dict[int, tuple[int, int]] = {}
    paths: dict[int, Path] = {}
    for i, rec in enumerate(_read_records(p_img, "image records")):
        iid, where = _record_id(rec, p_img, i)
        w = _int(_get(rec, "width", p_img, where), "width", p_img, where)
        h = _int(_get(rec, "height", p_img, where), "height", p_img, where)
        if w <= 0 or h <= 0:
            raise StageError(f"{p_img}: {where}: non-positive size {w}x{h}")
        if iid in sizes:
            raise StageError(f"{p_img}: {where}: duplicate image_id {iid}")
        sizes[iid] = (w, h)
        folder = str(rec.get("url") or "").rstrip("/").split("/")[-2:-1]
        paths[iid] = (vg_dir / folder[0] if folder and folder[0] in subdirs else image_dir) / f"{iid}.jpg"
    return sizes, paths


def _read_objects(p_obj: Path, sizes: dict[int, tuple[int, int]], bad_boxes: str,
                  stats: dict) -> tuple[dict[int, list[_Object]], dict[int, int]]:
    """``objects.json`` -> ({image_id: kept objects}, {object id, merged ids included: kept object id})."""
    per_image: dict[int, list[_Object]] = {}
    alias: dict[int, int] = {}
    for i, rec in enumerate(_read_records(p_obj, "per-image records")):
        iid, where = _record_id(rec, p_obj, i)
        if iid not in sizes:
            raise StageError(f"{p_obj}: {where}: image_id {iid} is not in {IMAGE_DATA}")
        if iid in per_image:
            raise StageError(f"{p_obj}: {where}: duplicate image_id {iid}")
        olist = _list(_get(rec, "objects", p_obj, where), "objects", p_obj, where)
        per_image[iid] = _image_objects(olist, p_obj, where, sizes[iid], bad_boxes, stats, alias)
    return per_image, alias


def _image_objects(olist: list, p_obj: Path, where: str, size: tuple[int, int], bad_boxes: str,
                   stats: dict, alias: dict[int, int]) -> list[_Object]:
    """The kept objects of one image; objects merged into another are skipped, their ids go to ``alias``."""
    merged_away = {m for j, o in enumerate(olist) if isinstance(o, dict)
                   for m in _merged_ids(o, p_obj, f"{where} object {j}")}
    kept: list[_Object] = []
    for j, o in enumerate(olist):
        ow = f"{where} object {j}"
        oid = _int(_get_any(o, ("object_id", "id"), p_obj, ow), "object_id", p_obj, ow)
        ow = f"{where} object {j} (object_id {oid})"
        if oid in merged_away:
            stats["merged"] += 1
            continue
        box_name = _object_box_name(o, p_obj, ow, size, bad_boxes, stats)
        if box_name is None:
            continue
        kept.append((oid, *box_name))
        alias[oid] = oid
        for m in _merged_ids(o, p_obj, ow):
            alias[m] = oid
    return kept


def _object_box_name(o: dict, p_obj: Path, ow: str, size: tuple[int, int], bad_boxes: str,
                     stats: dict) -> tuple[list[float], str] | None:
    """(box clipped to the image, name) of one object; None (counted in ``stats``) when it is dropped."""
    x = _num(_get(o, "x", p_obj, ow), "x", p_obj, ow)
    y = _num(_get(o, "y", p_obj, ow), "y", p_obj, ow)
    bw = _num(_get(o, "w", p_obj, ow), "w", p_obj, ow)
    bh = _num(_get(o, "h", p_obj, ow), "h", p_obj, ow)
    name = _object_name(o, p_obj, ow)
    if not name:
        stats["dropped_unnamed"] += 1
        return None
    w, h = size
    box = [x, y, x + bw, y + bh]
    cb = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h),
          min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    if cb[2] <= cb[0] or cb[3] <= cb[1]:
        if bad_boxes == "error":
            raise StageError(
                f"{p_obj}: {ow}: box x={x:g} y={y:g} w={bw:g} h={bh:g} has no area inside its {w}x{h} image "
                f"(set bad_boxes: drop in the stage's config to skip such boxes)")
        stats["dropped_degenerate"] += 1
        return None
    if cb != box:
        stats["clipped"] += 1
    return cb, name


def _object_name(o: dict, p_obj: Path, ow: str) -> str:
    """The normalised name of an object: the first of ``names`` (v1.2+) or ``name`` (v1.0); "" if none."""
    if "names" in o:
        names = _list(o["names"], "names", p_obj, ow)
        return normalize_name(names[0]) if names else ""
    if "name" in o:
        return normalize_name(o["name"])
    raise StageError(f"{p_obj}: {ow}: missing key 'names' (or 'name')")


def _read_attributes(p_att: Path, alias: dict[int, int]) -> dict[int, dict[int, list[str]]]:
    """Optional ``attributes.json`` -> {image_id: {kept object id: normalised attributes}}; {} without the file."""
    attrs: dict[int, dict[int, list[str]]] = {}
    if not p_att.is_file():
        return attrs
    for i, rec in enumerate(_read_records(p_att, "per-image records")):
        iid, where = _record_id(rec, p_att, i)
        alist = rec.get("attributes") or []
        _list(alist, "attributes", p_att, where)
        d = attrs.setdefault(iid, {})
        for j, a in enumerate(alist):
            aw = f"{where} attribute entry {j}"
            oid = _int(_get_any(a, ("object_id", "id"), p_att, aw), "object_id", p_att, aw)
            vals = a.get("attributes") or []
            _list(vals, "attributes", p_att, aw)
            lst = d.setdefault(alias.get(oid, oid), [])
            for v in vals:
                nv = normalize_name(v)
                if nv and nv not in lst:
                    lst.append(nv)
    return attrs


def _vg_image(iid: int, path: Path, size: tuple[int, int], kept: list[_Object],
              attrs: dict[int, list[str]]) -> VGImage:
    boxes = np.asarray([b for _, b, _ in kept], dtype=np.float32).reshape(-1, 4)
    return VGImage(image_id=iid, path=path, width=size[0], height=size[1], boxes=boxes,
                   names=[n for _, _, n in kept], attributes=[list(attrs.get(oid, [])) for oid, _, _ in kept])


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


def _merged_ids(obj: dict, path: Path, where: str) -> list[int]:
    """An object's ``merged_object_ids`` (v1.2+: the duplicates merged into it), each an integer."""
    ids = _list(obj.get("merged_object_ids") or [], "merged_object_ids", path, where)
    return [_int(m, "merged_object_ids", path, where) for m in ids]


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


class VGPixels(torch.utils.data.Dataset):
    """VG images decoded on access, as uint8 (3, H, W): nothing is held in memory, so a DataLoader's
    workers decode them per item (Visual Genome's 108k images would be ~90 GB decoded). ``pixels[i]``,
    ``pixels[a:b]`` (a list), ``pixels.subset(indices)``."""

    def __init__(self, images: list[VGImage]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: list[int]) -> "VGPixels":
        return VGPixels([self.images[i] for i in indices])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        im = self.images[i]
        rgb = open_rgb(im.path)
        _check_size(im, rgb.size)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _check_size(im: VGImage, size: tuple[int, int]) -> None:
    if size != (im.width, im.height):
        raise StageError(f"{im.path}: image is {size[0]}x{size[1]} but image_data.json says "
                         f"{im.width}x{im.height} (image_id {im.image_id})")


def decode_images(images: list[VGImage]) -> VGPixels:
    """The images as a lazily decoding :class:`VGPixels`. Every file's header is read now (no pixel
    decoding), so a missing or unreadable file or a size that differs from image_data.json is an error
    naming the file before training starts."""
    for im in images:
        _check_size(im, image_size(im.path))
    return VGPixels(images)


class DetectionDataset(torch.utils.data.Dataset):
    """(image (3, H, W) uint8, {"boxes": (n, 4) float x1y1x2y2, "labels": (n,) int64 in 1..C}); boxes whose
    name is not a class are left out. ``pixels``: uint8 images by position (a lazily decoding
    :class:`VGPixels`, or a list of tensors), decoded in the loader's workers. Scaling to [0, 1] and the
    random flip happen on the batch in the main process (:func:`prepare_batch`), so they do not depend
    on ``num_workers`` and a resumed run draws the flips the unbroken run drew (the RNG is checkpointed).
    With ``attribute_ids`` each target also has "attributes": (n, A) multi-hot float."""

    def __init__(self, images: list[VGImage], pixels, class_ids: dict[str, int], train: bool,
                 attribute_ids: dict[str, int] | None = None):
        self.pixels, self.train = pixels, train
        self.targets = []
        for im in images:
            keep = [i for i, n in enumerate(im.names) if n in class_ids]
            t = {"boxes": torch.from_numpy(im.boxes[keep]).reshape(-1, 4).float(),
                 "labels": torch.tensor([class_ids[im.names[i]] for i in keep], dtype=torch.int64)}
            if attribute_ids:
                att = torch.zeros(len(keep), len(attribute_ids))
                for row, i in enumerate(keep):
                    for a in (im.attributes[i] if i < len(im.attributes) else []):
                        if a in attribute_ids:
                            att[row, attribute_ids[a]] = 1.0
                t["attributes"] = att
            self.targets.append(t)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        return self.pixels[i], self.targets[i]


def prepare_batch(xs: list[torch.Tensor], targets: list[dict], train: bool, flips: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], list[dict]]:
    """uint8 images (on any device) -> float in [0, 1]; ``train``: each image and its boxes flipped
    horizontally where ``flips`` (B,) is true (default: probability 1/2 from the main-process torch RNG, one
    draw per image)."""
    out_x, out_t = [], []
    if flips is None:
        flips = torch.rand(len(xs)) < 0.5 if train else torch.zeros(len(xs), dtype=torch.bool)
    for x, t, f in zip(xs, targets, flips.tolist()):
        x = x.float().div_(255.0)
        if f:
            w = x.shape[-1]
            x = x.flip(-1)
            b = t["boxes"]
            t = t | {"boxes": torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)}
        out_x.append(x)
        out_t.append(t)
    return out_x, out_t


def collate(batch):
    """-> (list of images, list of targets): Faster R-CNN takes images of different sizes."""
    return [x for x, _ in batch], [t for _, t in batch]
