"""Evaluation metrics for the baton stages: VQA accuracy, caption scores, detection mAP and
top-k classification accuracy.

Pure python/numpy/torch plus the pycocotools / pycocoevalcap scorers. Nothing here needs
Java (pycocoevalcap's PTBTokenizer, METEOR and SPICE are deliberately not used), Prefect
or MLflow.

Scales (the conventions of the reference tools):
  * VQA accuracy: percent, 0..100 (as the official VQA tool prints it, but unrounded).
  * Caption scores: pycocoevalcap's raw values, BLEU/ROUGE-L in 0..1, CIDEr-D in 0..10.
  * Detection mAP: COCOeval's fractions, 0..1.
  * Top-k accuracy: fractions, 0..1.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "vqa_scores",
    "tokenize_caption",
    "caption_scores",
    "detection_map",
    "topk_accuracy",
]

# ======================================================================================
# VQA: a transcription of the official evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py, master = commit a013f00, 2021).
# ======================================================================================

# fmt: off
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# Official regexes, verbatim. "(?!<=\d)" is a (buggy) negative *lookahead*, not a
# lookbehind, so in effect a period is removed unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}",
          "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]
# fmt: on
# The official code calls ``periodStrip.sub("", outText, re.UNICODE)``: the flag lands in the
# positional ``count`` argument, so at most re.UNICODE (== 32) periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(in_text: str) -> str:
    """Official ``processPunctuation``: each punctuation mark in ``_PUNCT`` is deleted when it
    touches a space anywhere in the text, or when the text contains a digit-comma-digit
    (``1,000``); otherwise it is replaced by a space. Then periods not followed by a digit
    are removed (at most 32, as in the official call)."""
    out_text = in_text
    has_digit_comma = _COMMA_STRIP.search(in_text) is not None
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(in_text: str) -> str:
    """Official ``processDigitArticle``: lowercase, split on whitespace, number words to
    digits, drop articles, then expand the contractions map word by word."""
    words = [_MANUAL_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(ans: str) -> str:
    """Normalise a VQA answer exactly as the official tool normalises a predicted answer.

    In: any answer string. Out: the normalised string. Steps: newline/tab -> space, strip;
    official ``processPunctuation`` (punctuation list, digit-comma-digit rule, period rule);
    official ``processDigitArticle`` (lowercase, "none"/"zero".."ten" -> "0".."10", drop
    "a"/"an"/"the", contractions map such as "dont" -> "don't").

    Examples: ``"Two dogs."`` -> ``"2 dogs"``; ``"1,000"`` -> ``"1000"``; ``"3.5"`` -> ``"3.5"``;
    ``"isnt"`` -> ``"isn't"``.
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(str(ans))))


def _official_pair(pred: str, gt_answers: Sequence[str]) -> tuple[str, list[str]]:
    """Master's treatment of one question (``evaluate`` at GT-Vision-Lab/VQA a013f00): newline/tab
    clean-up and strip on both sides; then, only when the human answers are not all identical, both
    sides get ``processPunctuation`` + ``processDigitArticle``. When all ten agree the raw strings are
    compared (``'two'`` vs ten ``'2'`` scores 0)."""
    res = _clean_whitespace(str(pred))
    answers = [_clean_whitespace(str(a)) for a in gt_answers]
    if len(set(answers)) > 1:
        answers = [_process_digit_article(_process_punctuation(a)) for a in answers]
        res = _process_digit_article(_process_punctuation(res))
    return res, answers


def vqa_accuracy(pred: str, gt_answers: Sequence[str], *, official_gt_processing: bool = False) -> float:
    """VQA accuracy of one predicted answer, as a fraction in [0, 1].

    In: ``pred`` (the model's answer), ``gt_answers`` (the human answers, normally 10).
    Out: the mean over the leave-one-out subsets (each human answer left out in turn) of
    ``min(#matches among the remaining answers / 3, 1)``. With 10 answers of which k match:
    k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.0.

    ``official_gt_processing=True`` reproduces the official tool at master (GT-Vision-Lab/VQA,
    ``vqaEval.py`` after commit a013f00 "Fixed processing answers bug", 2021; what current papers
    report), checked against a literal transcription on random cases (tests/stages/test_metrics.py): when
    the human answers are all identical, the stripped raw strings are compared (``'yes.'`` vs ten
    ``'yes'`` scores 0); otherwise both sides are normalised. The 2016 revision (prediction always
    normalised, human answers punctuation-only) is not reproduced.

    The default normalises both sides with :func:`normalize_answer` always (baton's answers may be raw
    text). It equals master whenever the prediction and the human answers are already normalised, as
    the VQA v2 annotations, the synthetic world and baton's answer vocabulary are.

    Raises ValueError when ``gt_answers`` is empty.
    """
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy: gt_answers is empty")
    if official_gt_processing:
        res, gts = _official_pair(pred, gt_answers)
    else:
        res, gts = normalize_answer(pred), [normalize_answer(a) for a in gt_answers]
    n_match = sum(1 for a in gts if a == res)
    total = 0.0
    for a in gts:
        others = n_match - (1 if a == res else 0)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def vqa_scores(preds: Mapping[int, str], records: Iterable[Any], *, official_gt_processing: bool = False) -> dict[str, float]:
    """Official VQA accuracy over a set of questions, overall and per answer type.

    In: ``preds``: question_id -> predicted answer string; ``records``: objects with
    attributes ``question_id`` (int), ``answers`` (list of the human answer strings) and
    ``answer_type`` ("yes/no" | "number" | "other").
    Out: ``{"vqa_acc": ..., "vqa_acc_yes_no": ..., "vqa_acc_number": ..., "vqa_acc_other": ...}`` (an answer
    type's "/" becomes "_": a metric key's "/" opens a chart section in MLflow)
    in percent (0..100, unrounded; the official tool rounds to 2 decimals). A per-type key is
    present only when that answer type occurs in ``records``.

    Every record needs a prediction (ValueError otherwise, like the official tool, which
    refuses results that do not cover the question set); predictions for question ids not
    in ``records`` are ignored. Raises ValueError when ``records`` is empty.
    """
    accs: list[float] = []
    by_type: dict[str, list[float]] = {}
    missing: list[int] = []
    for r in records:
        qid = r.question_id
        if qid not in preds:
            missing.append(qid)
            continue
        acc = vqa_accuracy(preds[qid], list(r.answers), official_gt_processing=official_gt_processing)
        accs.append(acc)
        by_type.setdefault(str(r.answer_type), []).append(acc)
    if missing:
        raise ValueError(f"vqa_scores: no prediction for {len(missing)} question(s), e.g. {missing[:5]}")
    if not accs:
        raise ValueError("vqa_scores: no records")
    out = {"vqa_acc": 100.0 * float(np.mean(accs))}
    for t in sorted(by_type):
        out[f"vqa_acc_{t.replace('/', '_')}"] = 100.0 * float(np.mean(by_type[t]))
    return out


# ======================================================================================
# Captions
# ======================================================================================

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after PTB tokenisation.
_PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_PTB_PUNCTUATIONS_LOWER = frozenset(p.lower() for p in _PTB_PUNCTUATIONS)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc prof inc co corp ltd mt ft no approx dept est".split()
)
_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")  # u.s. / a.m.
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'m|'d)$")
_EDGE_PUNCT = ",;:?!\"`'()[]{}<>"
_DROPPED_BRACKETS = frozenset("()[]{}<>\"")


def _split_token(tok: str) -> list[str]:
    """Split one whitespace-delimited, lower-cased chunk into PTB-like tokens."""
    lead: list[str] = []
    trail: list[str] = []
    # Peel punctuation off the front.
    while tok:
        if tok.startswith("..."):
            lead.append("...")
            tok = tok[3:]
        elif tok.startswith("--"):
            lead.append("--")
            tok = tok[2:]
        elif tok[0] in _EDGE_PUNCT or tok[0] in "-$#":
            lead.append(tok[0])
            tok = tok[1:]
        else:
            break
    # Peel punctuation off the back (periods: keep abbreviations/acronyms intact).
    while tok:
        if tok.endswith("..."):
            trail.append("...")
            tok = tok[:-3]
        elif tok.endswith("--"):
            trail.append("--")
            tok = tok[:-2]
        elif tok[-1] in _EDGE_PUNCT or tok[-1] in "-%":
            trail.append(tok[-1])
            tok = tok[:-1]
        elif tok[-1] == ".":
            if _ACRONYM.match(tok) or tok[:-1] in _ABBREVIATIONS:
                break
            trail.append(".")
            tok = tok[:-1]
        else:
            break
    middle: list[str] = []
    if tok:
        m = _CLITIC.match(tok)
        if m and m.group(1) not in ("'", ""):
            middle = [m.group(1), m.group(2)]
        else:
            middle = [tok]
    return lead + middle + trail[::-1]


def tokenize_caption(s: str) -> str:
    """Pure-Python approximation of the COCO caption evaluation tokenisation.

    In: a raw caption. Out: space-joined lower-case tokens, with the tokens that
    pycocoevalcap's ``PTBTokenizer`` drops (its ``PUNCTUATIONS`` list: quotes, brackets,
    ``. ? ! , : ; - -- ...``) removed. ``"A man's dog, running."`` -> ``"a man 's dog running"``.

    What it does: newlines -> spaces, lowercase, whitespace split, then per chunk: peel
    leading/trailing punctuation off as separate tokens (``... -- , ; : ? ! " ` ' ( ) [ ] { }
    < > - $ # %`` and a final period), split clitics like PTB (``don't`` -> ``do n't``,
    ``dog's`` -> ``dog 's``, also ``'re 've 'll 'm 'd``), keep word-internal punctuation
    (``black-and-white``, ``3.5``, ``1,000``, ``10:30``, ``w/``), and finally drop the
    PUNCTUATIONS tokens.

    Known differences from Stanford CoreNLP 3.4.1 PTBTokenizer (-preserveLines -lowerCase):
      * ``[ ]`` become ``-LSB-``/``-RSB-`` in Java, which pycocoevalcap does NOT remove; here
        they are dropped like ``( ) { }``. ``< >`` are dropped here too.
      * Java splits word-internal punctuation in some cases we keep (``a/b`` is usually
        kept by both; ``word,word`` without spaces is split by Java, kept here; ``&`` and
        ``*`` handling differs in corner cases); an internal ``...`` (``wait...what``) is
        kept here.
      * Abbreviation periods: Java uses a large abbreviation list and sentence-final
        heuristics; here only single-letter acronyms (``u.s.``) and a short list (``mr.``,
        ``dr.``, ``st.`` ...) keep their period, even at the end of a sentence.
      * Java normalises some characters (e.g. ``&`` in some contexts, unicode quotes and
        dashes, ``cannot`` -> ``can not``, ``gonna`` -> ``gon na``); not done here.
      * Only the listed clitics are split; ``'tis``/``'twas`` style forms are left alone.
    On ordinary COCO-style captions the output matches Java's for the vast majority of
    sentences, so scores agree closely but not bit for bit.
    """
    text = str(s).replace("\n", " ").replace("\r", " ").lower()
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_split_token(chunk))
    return " ".join(t for t in tokens if t and t not in _PTB_PUNCTUATIONS_LOWER and t not in _DROPPED_BRACKETS)


def caption_scores(res: Mapping[int, str], gts: Mapping[int, Sequence[str]]) -> dict[str, float]:
    """COCO caption scores (BLEU-1..4, ROUGE-L, CIDEr-D) with pycocoevalcap's scorers.

    In: ``res``: image_id -> one generated caption (raw text); ``gts``: image_id -> list of
    reference captions (raw text). Both are tokenised with :func:`tokenize_caption`, then
    passed to ``Bleu(4)``, ``Rouge()`` and ``Cider()`` (pycocoevalcap's Cider is CIDEr-D).
    Out: ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}`` as floats on
    pycocoevalcap's scale (BLEU/ROUGE in 0..1; CIDEr-D 0..10, usually < 3).

    Note: CIDEr's IDF is computed over the evaluated set, so it is only meaningful over many
    images (with a single image every n-gram has df=1 and CIDEr is 0).

    Raises ValueError when the key sets differ, when there are no images, when an image has
    no references, or when a caption (generated or reference) is empty before or after
    tokenisation.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(res.keys()) != set(gts.keys()):
        only_res = sorted(set(res) - set(gts))[:5]
        only_gts = sorted(set(gts) - set(res))[:5]
        raise ValueError(f"caption_scores: keys differ (only in res: {only_res}, only in gts: {only_gts})")
    if not res:
        raise ValueError("caption_scores: no captions")
    tok_res: dict[int, list[str]] = {}
    tok_gts: dict[int, list[str]] = {}
    for k in res:
        cap = res[k]
        if not isinstance(cap, str):
            raise ValueError(f"caption_scores: res[{k!r}] must be a str, got {type(cap).__name__}")
        t = tokenize_caption(cap)
        if not t:
            raise ValueError(f"caption_scores: empty generated caption for image {k!r}: {cap!r}")
        tok_res[k] = [t]
        refs = gts[k]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"caption_scores: gts[{k!r}] must be a non-empty list of str")
        tok_refs = []
        for r in refs:
            tr = tokenize_caption(r)
            if not tr:
                raise ValueError(f"caption_scores: empty reference caption for image {k!r}: {r!r}")
            tok_refs.append(tr)
        tok_gts[k] = tok_refs

    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(tok_gts, tok_res, verbose=0)
        rouge, _ = Rouge().compute_score(tok_gts, tok_res)
        cider, _ = Cider().compute_score(tok_gts, tok_res)
    out = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    out["ROUGE-L"] = float(rouge)
    out["CIDEr"] = float(cider)
    return out


# ======================================================================================
# Detection
# ======================================================================================


def _np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes_xywh(boxes: Any, where: str) -> np.ndarray:
    b = _np(boxes, np.float64)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"detection_map: {where} boxes must have shape (N, 4), got {b.shape}")
    out = b.copy()
    out[:, 2] = b[:, 2] - b[:, 0]
    out[:, 3] = b[:, 3] - b[:, 1]
    return out


def _labels(labels: Any, n: int, num_classes: int, where: str) -> np.ndarray:
    lab = _np(labels, np.int64).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"detection_map: {where} has {n} boxes but {lab.shape[0]} labels")
    if n and (lab.min() < 1 or lab.max() > num_classes):
        raise ValueError(f"detection_map: {where} labels must be in 1..{num_classes}")
    return lab


def detection_map(
    preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], num_classes: int
) -> tuple[dict[str, float], dict[int, float]]:
    """COCO-style box mAP with pycocotools' COCOeval (iouType "bbox").

    In:
      ``preds``: list of ``{"image_id": int, "boxes": (N, 4) x1y1x2y2, "scores": (N,),
      "labels": (N,) int in 1..num_classes}`` (numpy arrays, torch tensors or lists);
      ``gts``: list of ``{"image_id": int, "boxes": (M, 4) x1y1x2y2, "labels": (M,)}``;
      ``num_classes``: number of foreground classes (category ids 1..num_classes).
    Out: ``(metrics, per_class_ap50)`` where ``metrics = {"map": AP@[.5:.95], "map50": AP@.5,
    "map75": AP@.75}`` (COCOeval ``stats[0:3]``, area "all", maxDets 100) and
    ``per_class_ap50 = {class_id: AP@.5}`` for the classes that have at least one
    ground-truth box (AP is undefined for the others, so they are left out).

    The COCO objects are built in memory: xywh boxes, ``iscrowd=0``, ``area=w*h``. The image
    set is the union of the image ids in ``gts`` and ``preds`` (an image with predictions but
    no ground truth contributes false positives; list every evaluated image in ``gts``, with
    empty boxes if need be). An image with no predictions is fine. No predictions at all
    gives zeros. Undefined values (COCOeval's -1, e.g. no ground truth at all) are reported
    as 0.0. At most 100 detections per image count (COCO's maxDets). COCOeval's printing is
    suppressed.
    """
    if num_classes < 1:
        raise ValueError("detection_map: num_classes must be >= 1")
    gt_ids, gt_anns = _gt_annotations(gts, num_classes)
    dt_ids, dt_anns = _dt_annotations(preds, num_classes)
    gt_class_ids = sorted({a["category_id"] for a in gt_anns})
    if not dt_anns or not gt_anns:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}, {c: 0.0 for c in gt_class_ids}
    ev = _cocoeval(gt_ids | dt_ids, gt_anns, dt_anns, num_classes)
    stats = ev.stats
    metrics = {
        "map": max(float(stats[0]), 0.0),
        "map50": max(float(stats[1]), 0.0),
        "map75": max(float(stats[2]), 0.0),
    }
    return metrics, _per_class_ap50(ev, gt_class_ids)


def _gt_annotations(gts: Sequence[Mapping[str, Any]], num_classes: int) -> tuple[set[int], list[dict[str, Any]]]:
    """(image ids, COCO ground-truth annotations: xywh, area w*h, iscrowd 0, ids from 1)."""
    image_ids: set[int] = set()
    anns: list[dict[str, Any]] = []
    for g in gts:
        iid = int(g["image_id"])
        image_ids.add(iid)
        boxes = _boxes_xywh(g["boxes"], f"gt image {iid}")
        labels = _labels(g["labels"], boxes.shape[0], num_classes, f"gt image {iid}")
        for box, lab in zip(boxes, labels):
            w, h = float(box[2]), float(box[3])
            anns.append(
                {
                    "id": len(anns) + 1,  # COCOeval treats id 0 as "unmatched": start at 1
                    "image_id": iid,
                    "category_id": int(lab),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return image_ids, anns


def _dt_annotations(preds: Sequence[Mapping[str, Any]], num_classes: int) -> tuple[set[int], list[dict[str, Any]]]:
    """(image ids, COCO detection results: xywh box, score)."""
    image_ids: set[int] = set()
    anns: list[dict[str, Any]] = []
    for p in preds:
        iid = int(p["image_id"])
        image_ids.add(iid)
        boxes = _boxes_xywh(p["boxes"], f"pred image {iid}")
        n = boxes.shape[0]
        scores = _np(p["scores"], np.float64).reshape(-1)
        if scores.shape[0] != n:
            raise ValueError(f"detection_map: pred image {iid} has {n} boxes but {scores.shape[0]} scores")
        labels = _labels(p["labels"], n, num_classes, f"pred image {iid}")
        for box, s, lab in zip(boxes, scores, labels):
            anns.append({"image_id": iid, "category_id": int(lab), "bbox": [float(v) for v in box], "score": float(s)})
    return image_ids, anns


def _cocoeval(image_ids: set[int], gt_anns: list[dict[str, Any]], dt_anns: list[dict[str, Any]],
              num_classes: int) -> Any:
    """A COCOeval (bbox) over in-memory COCO objects, evaluated, accumulated and summarised quietly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i} for i in sorted(image_ids)],
            "annotations": gt_anns,
            "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_anns)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _per_class_ap50(ev: Any, class_ids: list[int]) -> dict[int, float]:
    """{class id: AP@.5 (area "all", the largest maxDets)} of an accumulated COCOeval, for ``class_ids``."""
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M maxDets]
    precision = ev.eval["precision"]
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    a_all = ev.params.areaRngLbl.index("all")
    m_last = len(ev.params.maxDets) - 1
    per_class: dict[int, float] = {}
    for k, cid in enumerate(ev.params.catIds):
        if cid not in class_ids:
            continue
        p = precision[t50, :, k, a_all, m_last]
        p = p[p > -1]
        per_class[int(cid)] = float(p.mean()) if p.size else 0.0
    return per_class


# ======================================================================================
# Classification
# ======================================================================================


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy.

    In: ``logits`` (N, C) scores, ``targets`` (N,) integer class indices in 0..C-1, ``ks``
    the k values. Out: ``{"top{k}": fraction in [0, 1]}`` for each k; k larger than C is
    capped at C (so "top5" with 3 classes is 1.0). Ties are broken by ``torch.topk``.
    Raises ValueError on shape mismatch or N == 0.
    """
    if logits.ndim != 2:
        raise ValueError(f"topk_accuracy: logits must be (N, C), got {tuple(logits.shape)}")
    targets = targets.reshape(-1)
    n, c = logits.shape
    if targets.shape[0] != n:
        raise ValueError(f"topk_accuracy: {n} logits rows but {targets.shape[0]} targets")
    if n == 0:
        raise ValueError("topk_accuracy: empty batch")
    with torch.no_grad():
        kmax = min(max(ks), c)
        top = logits.topk(kmax, dim=1).indices  # (N, kmax), sorted by score
        hit = top.eq(targets.to(top.device).long().unsqueeze(1))  # (N, kmax)
        out = {}
        for k in ks:
            kk = min(int(k), c)
            out[f"top{k}"] = float(hit[:, :kk].any(dim=1).float().mean().item())
    return out
