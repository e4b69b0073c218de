"""Image captions: COCO captions JSON, the Karpathy split JSON, Conceptual-Captions-style TSV."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.contract import StageError
from stages.data.common import _WS, _get, _int, _list, read_json


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
