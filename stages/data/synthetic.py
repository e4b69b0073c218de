"""The synthetic world: a deterministic generator of coloured-shape scenes in the real public formats.

Scenes are shapes (circle, square, triangle, diamond, cross, star) in colours (red, green, blue,
yellow, purple, orange) and sizes (small, large) at non-overlapping positions on a lightly
noisy grey background. Captions, corpus sentences and VQA answers are all TRUE of the scene
they describe. Everything derives from the seed: the same config gives byte-identical files.

Usable without a stage context: :func:`sample_objects`, :func:`render`, :func:`captions_for`,
:func:`questions_for`, :func:`corpus_document`, :func:`generate`."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stages.config.world import Config

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")


PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "diamond": "diamonds", "cross": "crosses", "star": "stars"}


SYNSETS: dict[str, str] = {"circle": "circle.n.01", "square": "square.n.01", "triangle": "triangle.n.01",
                           "diamond": "diamond.n.02", "cross": "cross.n.01", "star": "star.n.03"}


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 80, 220),
    "yellow": (235, 215, 35),
    "purple": (145, 50, 185),
    "orange": (245, 135, 25),
}


COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


SIZES: tuple[str, ...] = ("small", "large")


RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine", "ten", "eleven", "twelve")


# object side as a fraction of the image side
SCENE_SIZE_FRAC = {"small": (0.15, 0.21), "large": (0.27, 0.35)}


CLASSIF_SIZE_FRAC = {"small": (0.40, 0.58), "large": (0.60, 0.85)}


# shape outlines in the unit square (mapped onto the object's box)
_CROSS_T = 1.0 / 3.0


_POLYS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [(_CROSS_T, 0.0), (1 - _CROSS_T, 0.0), (1 - _CROSS_T, _CROSS_T), (1.0, _CROSS_T),
              (1.0, 1 - _CROSS_T), (1 - _CROSS_T, 1 - _CROSS_T), (1 - _CROSS_T, 1.0), (_CROSS_T, 1.0),
              (_CROSS_T, 1 - _CROSS_T), (0.0, 1 - _CROSS_T), (0.0, _CROSS_T), (_CROSS_T, _CROSS_T)],
}


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -np.pi / 2 + k * np.pi / 5
        pts.append((r * np.cos(a), r * np.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


_POLYS["star"] = _star()


def class_names() -> list[tuple[str, str]]:
    """(colour, shape) per classification class, in wnid order (n00000001 = first)."""
    return [(c, s) for s in SHAPES for c in COLOUR_NAMES]


def wnid(i: int) -> str:
    return f"n{i + 1:08d}"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: int
    y: int
    s: int  # side of the (square) box

    @property
    def box(self) -> tuple[int, int, int, int]:
        """x1, y1, x2, y2 (x2/y2 exclusive)."""
        return self.x, self.y, self.x + self.s, self.y + self.s

    @property
    def cx(self) -> float:
        return self.x + self.s / 2

    @property
    def cy(self) -> float:
        return self.y + self.s / 2

    def np(self, size: bool = True) -> str:
        """Noun phrase with article: 'a small red circle' / 'an orange star'."""
        words = ([self.size] if size else []) + [self.colour, self.shape]
        return f"{article(words[0])} {' '.join(words)}"

    def the(self, size: bool = False) -> str:
        return "the " + " ".join(([self.size] if size else []) + [self.colour, self.shape])


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([abs(int(seed)), int(seed < 0), int(stream)]))


def _side(rng: np.random.Generator, size: str, image_size: int, frac: dict) -> int:
    lo, hi = frac[size]
    return max(6, int(round(rng.uniform(lo, hi) * image_size)))


def sample_objects(rng: np.random.Generator, image_size: int, n: int, frac: dict = SCENE_SIZE_FRAC,
                   gap: int = 2, tries: int = 100) -> list[Obj]:
    """Up to n objects with distinct (colour, shape) pairs and boxes at least ``gap`` px apart.
    An object that does not fit after ``tries`` placements is retried small, then skipped."""
    pairs = [(c, s) for s in SHAPES for c in COLOUR_NAMES]
    chosen = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    objs: list[Obj] = []
    for pi in chosen:
        colour, shape = pairs[int(pi)]
        size = SIZES[int(rng.integers(2))]
        for attempt_size in ([size, "small"] if size == "large" else [size]):
            s = _side(rng, attempt_size, image_size, frac)
            placed = None
            for _ in range(tries):
                x = int(rng.integers(0, image_size - s + 1))
                y = int(rng.integers(0, image_size - s + 1))
                if all(x + s + gap <= o.x or o.x + o.s + gap <= x or y + s + gap <= o.y or o.y + o.s + gap <= y
                       for o in objs):
                    placed = Obj(shape, colour, attempt_size, x, y, s)
                    break
            if placed is not None:
                objs.append(placed)
                break
    return objs


def relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b, along an axis on which their boxes are separated."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    hsep = a.x + a.s <= b.x or b.x + b.s <= a.x
    vsep = a.y + a.s <= b.y or b.y + b.s <= a.y
    if hsep and (not vsep or abs(dx) >= abs(dy)):
        return "left of" if dx < 0 else "right of"
    if vsep:
        return "above" if dy < 0 else "below"
    # overlapping boxes (not produced by sample_objects): dominant axis
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = o.x, o.y, o.x + o.s - 1, o.y + o.s - 1
    if o.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _POLYS[o.shape]]
        draw.polygon(pts, fill=fill)


def render(rng: np.random.Generator, objs: list[Obj], image_size: int, noise: float = 6.0) -> Image.Image:
    """Objects (colour-jittered) on a grey, slightly tinted background, plus Gaussian pixel noise."""
    g = int(rng.integers(95, 176))
    tint = rng.integers(-8, 9, size=3)
    bg = tuple(int(np.clip(g + t, 0, 255)) for t in tint)
    im = Image.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(im)
    for o in objs:
        base = np.asarray(COLOURS[o.colour])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-18, 19, size=3), 0, 255))
        _draw(draw, o, fill)
    arr = np.asarray(im, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _save_jpeg(im: Image.Image, path: Path) -> None:
    im.save(path, format="JPEG", quality=95, subsampling=0)


def _listing(objs: list[Obj], size: bool = True) -> str:
    nps = [o.np(size) for o in objs]
    if len(nps) == 1:
        return nps[0]
    return " , ".join(nps[:-1]) + " and " + nps[-1]


def _pick(rng: np.random.Generator, seq: list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _caption(rng: np.random.Generator, objs: list[Obj], template: str) -> str:
    if template in ("pair_full", "pair_short", "pair_the"):
        i, j = rng.choice(len(objs), size=2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        rel = relation(a, b)
        if template == "pair_full":
            return f"{a.np(True)} {rel} {b.np(True)}"
        if template == "pair_short":
            return f"{a.np(False)} {rel} {b.np(False)}"
        return f"{a.the()} is {rel} {b.the()}"
    if template == "there_is":
        order = [objs[int(k)] for k in rng.permutation(len(objs))]
        return f"there is {_listing(order, bool(rng.integers(2)) or len(objs) == 1)}"
    if template == "count":
        order = [objs[int(k)] for k in rng.permutation(len(objs))]
        n = len(objs)
        return f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} : {_listing(order)}"
    if template == "background":
        return f"{_pick(rng, objs).np(True)} on a gray background"
    if template == "picture":
        o = _pick(rng, objs)
        if len(objs) == 1:
            return f"a picture of {o.np(True)}"
        return f"a picture of {NUMBER_WORDS[len(objs)]} shapes including {o.np(bool(rng.integers(2)))}"
    if template == "image_with":
        order = [objs[int(k)] for k in rng.permutation(len(objs))]
        return f"an image with {_listing(order, bool(rng.integers(2)))}"
    raise ValueError(template)


CAPTION_TEMPLATES = ("pair_full", "pair_short", "pair_the", "there_is", "count", "background", "picture", "image_with")


def captions_for(rng: np.random.Generator, objs: list[Obj], n: int) -> list[str]:
    """n varied template captions, all true of the scene. The first mentions sizes and (with two
    or more objects) a spatial relation; the rest are as distinct as the scene allows."""
    if not objs:
        return ["an empty gray picture"] * n
    multi = len(objs) >= 2
    templates = [t for t in CAPTION_TEMPLATES if multi or not t.startswith("pair")]
    out: list[str] = [_caption(rng, objs, "pair_full" if multi else "there_is")]
    while len(out) < n:
        cap = None
        for _ in range(12):
            cap = _caption(rng, objs, _pick(rng, templates))
            if cap not in out:
                break
        out.append(cap)
    return out[:n]


def corpus_sentences(rng: np.random.Generator, objs: list[Obj], n: int) -> list[str]:
    """n sentences about a scene, in the caption grammar plus simple facts, each ending ' .'."""
    pool: list[str] = []
    by_shape = Counter(o.shape for o in objs)
    for _ in range(4 * n):
        if len(pool) == n:
            break
        k = int(rng.integers(6))
        if k <= 2 or (k == 5 and len(objs) < 2):
            t = _pick(rng, [t for t in CAPTION_TEMPLATES if len(objs) >= 2 or not t.startswith("pair")])
            pool.append(_caption(rng, objs, t))
        elif k == 3:
            o = _pick(rng, objs)
            pool.append(f"the {o.shape} is {o.colour}" if by_shape[o.shape] == 1 else f"{o.the()} is {o.size}")
        elif k == 4:
            sh = _pick(rng, list(SHAPES))
            c = by_shape[sh]
            pool.append(f"there {'is' if c == 1 else 'are'} {NUMBER_WORDS[c]} {sh if c == 1 else PLURALS[sh]}")
        else:
            a, b = (objs[int(i)] for i in rng.choice(len(objs), size=2, replace=False))
            pool.append(f"{a.np(True)} is {relation(a, b)} {b.np(True)}")
        if pool[-1] in pool[:-1]:
            pool.pop()
    return [s + " ." for s in pool]


def corpus_document(rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int) -> str:
    objs = sample_objects(rng, image_size, int(rng.integers(min_objects, max_objects + 1)))
    return " ".join(corpus_sentences(rng, objs, int(rng.integers(3, 7))))


_OTHER = "other"


def _noisy_answers(rng: np.random.Generator, truth: str, kind: str) -> list[dict]:
    """10 annotator answers: mostly the truth, each wrong with a per-question chance (<= 20%)."""
    p_wrong = float(rng.uniform(0.0, 0.2))
    answers = []
    for k in range(10):
        if rng.random() < p_wrong:
            if kind == "yes/no":
                a = "no" if truth == "yes" else "yes"
            elif kind == "number":
                t = int(truth)
                a = str(t + 1 if t == 0 or rng.random() < 0.5 else t - 1)
            elif kind == "colour":
                a = _pick(rng, [c for c in COLOUR_NAMES if c != truth])
            else:
                a = _pick(rng, [s for s in SHAPES if s != truth])
            conf = "maybe" if rng.random() < 0.7 else "yes"
        else:
            a, conf = truth, "yes"
        answers.append({"answer": a, "answer_confidence": conf, "answer_id": k + 1})
    return answers


def _question(rng: np.random.Generator, objs: list[Obj], kind: str) -> dict | None:
    if kind == "exist":
        with_size = rng.random() < 0.3
        present = {(o.size, o.colour, o.shape) if with_size else (o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            key = _pick(rng, sorted(present))
            ans = "yes"
        else:
            allk = [(z, c, s) for z in SIZES for c in COLOUR_NAMES for s in SHAPES] if with_size else \
                [(c, s) for c in COLOUR_NAMES for s in SHAPES]
            absent = [k for k in allk if k not in present]
            # half the negatives are near misses: a present shape or colour in another combination
            near = [k for k in absent if any(k[-1] == o.shape or k[-2] == o.colour for o in objs)]
            key = _pick(rng, near if near and rng.random() < 0.5 else absent)
            ans = "no"
        return {"question": f"is there {article(key[0])} {' '.join(key)}?", "question_type": "is there a",
                "answer_type": "yes/no", "truth": ans, "noise": "yes/no"}
    if kind == "count":
        if rng.random() < 0.7:
            present = sorted({o.shape for o in objs})
            sh = _pick(rng, present) if rng.random() < 0.8 else _pick(rng, list(SHAPES))
            n = sum(o.shape == sh for o in objs)
            q = f"how many {PLURALS[sh]} are there?"
        else:
            present = sorted({o.colour for o in objs})
            c = _pick(rng, present) if rng.random() < 0.8 else _pick(rng, list(COLOUR_NAMES))
            n = sum(o.colour == c for o in objs)
            q = f"how many {c} shapes are there?"
        return {"question": q, "question_type": "how many", "answer_type": "number", "truth": str(n),
                "noise": "number"}
    if kind == "colour":
        shapes = Counter(o.shape for o in objs)
        sized = Counter((o.size, o.shape) for o in objs)
        cands = [(o, f"the {o.shape}") for o in objs if shapes[o.shape] == 1]
        cands += [(o, f"the {o.size} {o.shape}") for o in objs if shapes[o.shape] > 1 and sized[(o.size, o.shape)] == 1]
        if not cands:
            return None
        o, ref = _pick(rng, cands)
        return {"question": f"what color is {ref}?", "question_type": "what color is the", "answer_type": "other",
                "truth": o.colour, "noise": "colour"}
    if kind == "shape":
        colours = Counter(o.colour for o in objs)
        cands = [o for o in objs if colours[o.colour] == 1]
        if not cands:
            return None
        o = _pick(rng, cands)
        return {"question": f"what shape is the {o.colour} object?", "question_type": "what shape is",
                "answer_type": "other", "truth": o.shape, "noise": "shape"}
    raise ValueError(kind)


QUESTION_KINDS = ("exist", "count", "colour", "shape")


def questions_for(rng: np.random.Generator, objs: list[Obj], n: int) -> list[dict]:
    """n distinct-where-possible questions covering the kinds in turn (random order per image).
    Each: question, question_type, answer_type, answers (10 VQA answer dicts), multiple_choice_answer."""
    order = [QUESTION_KINDS[int(k)] for k in rng.permutation(len(QUESTION_KINDS))]
    out: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        q = None
        for attempt in range(16):
            kind = order[(i + attempt) % len(order)] if attempt < len(order) else _pick(rng, ["exist", "count"])
            q = _question(rng, objs, kind)
            if q is not None and q["question"] not in seen:
                break
        if q is None:  # unreachable: exist/count always produce a question
            q = _question(rng, objs, "count")
        seen.add(q["question"])
        answers = _noisy_answers(rng, q.pop("truth"), q.pop("noise"))
        q["answers"] = answers
        q["multiple_choice_answer"] = Counter(a["answer"] for a in answers).most_common(1)[0][0]
        out.append(q)
    return out


def _dump(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def write_classification(out: Path, cfg: Config, seed: int) -> dict[str, int]:
    classes = class_names()
    root = out / "imagenet"
    root.mkdir(parents=True)
    with open(root / "synset_words.txt", "w") as f:
        for i, (c, s) in enumerate(classes):
            f.write(f"{wnid(i)} {c} {s}\n")
    S = cfg.classification.image_size
    counts = {}
    for split, n, stream in (("train", cfg.classification.train, 1), ("val", cfg.classification.val, 2)):
        rng = _rng(seed, stream)
        for i in range(len(classes)):
            (root / split / wnid(i)).mkdir(parents=True)
        labels = rng.permutation(np.arange(n) % len(classes))
        per_class = [0] * len(classes)
        for lab in labels:
            lab = int(lab)
            colour, shape = classes[lab]
            size = SIZES[int(rng.integers(2))]
            s = _side(rng, size, S, CLASSIF_SIZE_FRAC)
            x, y = int(rng.integers(0, S - s + 1)), int(rng.integers(0, S - s + 1))
            im = render(rng, [Obj(shape, colour, size, x, y, s)], S)
            _save_jpeg(im, root / split / wnid(lab) / f"{wnid(lab)}_{per_class[lab]}.JPEG")
            per_class[lab] += 1
        counts[f"classification_{split}"] = int(n)
    counts["classes"] = len(classes)
    return counts


def write_scenes(out: Path, cfg: Config, seed: int) -> dict[str, int]:
    sc = cfg.scenes
    S = sc.image_size
    vg, coco, vqa = out / "vg", out / "coco", out / "vqa"
    (vg / "images").mkdir(parents=True)
    coco.mkdir()
    vqa.mkdir()
    image_data, objects_json, attributes_json = [], [], []
    counts: dict[str, int] = {"objects": 0}
    next_id, next_obj, next_ann = 1, 1, 1
    for split, n, stream in (("train", sc.train, 3), ("val", sc.val, 4)):
        rng = _rng(seed, stream)
        ids: list[int] = []
        cimages, canns, vq, va = [], [], [], []
        for _ in range(n):
            iid = next_id
            next_id += 1
            ids.append(iid)
            objs = sample_objects(rng, S, int(rng.integers(sc.min_objects, sc.max_objects + 1)))
            _save_jpeg(render(rng, objs, S), vg / "images" / f"{iid}.jpg")
            image_data.append({"image_id": iid, "url": f"https://synthetic.invalid/vg/{iid}.jpg", "width": S,
                               "height": S, "coco_id": iid, "flickr_id": None})
            olist, alist = [], []
            for o in objs:
                rec = {"object_id": next_obj, "x": o.x, "y": o.y, "w": o.s, "h": o.s, "names": [o.shape],
                       "synsets": [SYNSETS[o.shape]], "merged_object_ids": []}
                olist.append(rec)
                alist.append({**rec, "attributes": [o.colour, o.size]})
                next_obj += 1
            counts["objects"] += len(objs)
            objects_json.append({"image_id": iid, "objects": olist})
            attributes_json.append({"image_id": iid, "attributes": alist})
            cimages.append({"id": iid, "file_name": f"{iid}.jpg", "width": S, "height": S,
                            "file_path": f"../vg/images/{iid}.jpg"})  # baton's extension: where the image is
            for cap in captions_for(rng, objs, cfg.captions_per_image):
                canns.append({"id": next_ann, "image_id": iid, "caption": cap})
                next_ann += 1
            for k, q in enumerate(questions_for(rng, objs, cfg.questions_per_image)):
                qid = iid * 1000 + k
                vq.append({"image_id": iid, "question": q["question"], "question_id": qid})
                va.append({"question_id": qid, "image_id": iid, "question_type": q["question_type"],
                           "answer_type": q["answer_type"], "multiple_choice_answer": q["multiple_choice_answer"],
                           "answers": q["answers"]})
        (vg / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        info = {"description": "baton synthetic world", "version": "1.0", "year": 2024}
        _dump({"info": info, "licenses": [], "images": cimages, "annotations": canns}, coco / f"captions_{split}.json")
        meta = {"info": info, "license": {"name": "synthetic"}, "data_type": "mscoco", "data_subtype": split}
        _dump({**meta, "task_type": "Open-Ended", "questions": vq},
              vqa / f"v2_OpenEnded_mscoco_{split}_questions.json")
        _dump({**meta, "annotations": va}, vqa / f"v2_mscoco_{split}_annotations.json")
        counts[f"scenes_{split}"] = n
        counts[f"captions_{split}"] = len(canns)
        counts[f"questions_{split}"] = len(vq)
    _dump(image_data, vg / "image_data.json")
    _dump(objects_json, vg / "objects.json")
    _dump(attributes_json, vg / "attributes.json")
    return counts


def write_corpus(out: Path, cfg: Config, seed: int) -> dict[str, int]:
    root = out / "corpus"
    root.mkdir(parents=True)
    sc = cfg.scenes
    counts = {}
    for split, n, stream in (("train", cfg.corpus.documents, 5), ("val", max(1, cfg.corpus.documents // 10), 6)):
        rng = _rng(seed, stream)
        docs = [corpus_document(rng, sc.image_size, sc.min_objects, sc.max_objects) for _ in range(n)]
        (root / f"{split}.txt").write_text("\n\n".join(docs) + "\n")
        counts[f"corpus_{split}"] = n
    return counts


def generate(out: Path, cfg: Config, seed: int) -> dict[str, int]:
    """Write the whole synthetic world under ``out`` (which must not exist or be empty)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    counts.update(write_classification(out, cfg, seed))
    counts.update(write_scenes(out, cfg, seed))
    counts.update(write_corpus(out, cfg, seed))
    return counts
