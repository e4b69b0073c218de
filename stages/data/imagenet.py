"""ImageNet: ``root/<wnid>/*.JPEG`` class folders, ``synset_words.txt``, and the classification dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.contract import StageError, log
from stages.data.common import IMAGE_EXTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
