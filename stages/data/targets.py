"""The four target sets of the 2x2 advisor, in ImageNet layout (``root/{train,val}/<wnid>/*.JPEG`` and
``synset_words.txt``, read by :mod:`stages.data.imagenet`). Deterministic from the seed.

- similar: the world's classification rendering (:func:`stages.data.synthetic.render`, one shape on a noisy
  grey background, world colours and sizes) with NEW labels: shape x size (12 classes; colour is random and
  not part of the label, while the world's 36 classes are colour x shape).
- different: another image domain, textures: 8 classes of periodic or blob patterns (horizontal,
  vertical, diagonal and anti-diagonal stripes, checkerboard, dot grid, rings, smooth blobs) at a random
  frequency and phase, in two random (non-palette) colours, with the same pixel noise.

Each domain has a small and a large train split (``small_per_class`` / ``large_per_class`` images per
class, drawn from different RNG streams) and one val split written into both roots."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from stages.config.targets import Config
from stages.data.synthetic import CLASSIF_SIZE_FRAC, COLOUR_NAMES, SHAPES, SIZES, Obj, _rng, _save_jpeg, _side, render

SIMILAR_CLASSES: list[tuple[str, str]] = [(size, shape) for shape in SHAPES for size in SIZES]
TEXTURES: tuple[str, ...] = ("hstripes", "vstripes", "diagonal", "antidiagonal", "checker", "dots", "rings", "blobs")
_STREAMS = {("similar", "small"): 11, ("similar", "large"): 12, ("similar", "val"): 13,
            ("different", "small"): 21, ("different", "large"): 22, ("different", "val"): 23}


def similar_image(rng: np.random.Generator, label: int, size: int, cfg: Config) -> Image.Image:
    """One world-style image of class ``label`` of :data:`SIMILAR_CLASSES` (any colour)."""
    obj_size, shape = SIMILAR_CLASSES[label]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    s = _side(rng, obj_size, size, CLASSIF_SIZE_FRAC)
    x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
    return render(rng, [Obj(shape, colour, obj_size, x, y, s)], size, noise=cfg.noise)


def _pattern(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A texture in [0, 1], (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    f = rng.uniform(2.5, 5.0)  # cycles per image
    ph = rng.uniform(0, 2 * np.pi)
    wave = {"hstripes": yy, "vstripes": xx, "diagonal": (xx + yy) / np.sqrt(2), "antidiagonal": (xx - yy) / np.sqrt(2)}
    if kind in wave:
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * wave[kind] + ph)
    if kind == "checker":
        return ((np.sin(2 * np.pi * f * xx + ph) > 0) ^ (np.sin(2 * np.pi * f * yy + ph) > 0)).astype(np.float64)
    if kind == "dots":
        return ((np.sin(2 * np.pi * f * xx + ph) * np.sin(2 * np.pi * f * yy + ph)) > 0.55).astype(np.float64)
    if kind == "rings":
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy) + ph)
    # blobs: a smooth random field from a few low-frequency cosines, thresholded at its median
    field = np.zeros_like(xx)
    for _ in range(6):
        kx, ky = rng.uniform(-2.0, 2.0, size=2)
        field += np.cos(2 * np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2 * np.pi))
    return (field > np.median(field)).astype(np.float64)


def texture_image(rng: np.random.Generator, label: int, size: int, cfg: Config) -> Image.Image:
    """One image of texture class ``label`` of :data:`TEXTURES` in two random colours, plus pixel noise."""
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
    p = _pattern(rng, TEXTURES[label], size)[..., None]  # (H, W, 1)
    arr = c0 + (c1 - c0) * (0.5 - cfg.texture_contrast / 2 + cfg.texture_contrast * p)
    arr = arr + rng.normal(0.0, cfg.noise, size=arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _wnid(domain: str, i: int) -> str:
    return f"{domain[0]}{i + 1:08d}"


def _write_split(root: Path, domain: str, split: str, n_per_class: int, classes: list[str],
                 draw: Callable[[np.random.Generator, int], Image.Image], stream: int, seed: int) -> int:
    rng = _rng(seed, stream)
    labels = rng.permutation(np.repeat(np.arange(len(classes)), n_per_class))  # interleaved classes, fixed count
    counts = [0] * len(classes)
    for i in range(len(classes)):
        (root / split / _wnid(domain, i)).mkdir(parents=True, exist_ok=True)
    for lab in labels:
        lab = int(lab)
        _save_jpeg(draw(rng, lab), root / split / _wnid(domain, lab) / f"{_wnid(domain, lab)}_{counts[lab]}.JPEG")
        counts[lab] += 1
    return len(labels)


def write_targets(out: Path, cfg: Config, seed: int) -> dict[str, int]:
    """Write ``out/{similar,different}_{small,large}/`` (ImageNet roots); returns image counts per split."""
    domains = {"similar": ([f"{a} {b}" for a, b in SIMILAR_CLASSES], similar_image),
               "different": ([f"{t} texture" for t in TEXTURES], texture_image)}
    counts: dict[str, int] = {}
    for domain, (names, image) in domains.items():
        def draw(rng, lab, image=image):
            return image(rng, lab, cfg.image_size, cfg)
        for scale, n in (("small", cfg.small_per_class), ("large", cfg.large_per_class)):
            root = out / f"{domain}_{scale}"
            root.mkdir(parents=True)
            (root / "synset_words.txt").write_text("".join(f"{_wnid(domain, i)} {c}\n" for i, c in enumerate(names)))
            counts[f"{domain}_{scale}_train"] = _write_split(root, domain, "train", n, names, draw,
                                                             _STREAMS[(domain, scale)], seed)
            counts[f"{domain}_{scale}_val"] = _write_split(root, domain, "val", cfg.val_per_class, names, draw,
                                                           _STREAMS[(domain, "val")], seed)
        counts[f"{domain}_classes"] = len(names)
    return counts
