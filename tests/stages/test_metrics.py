"""Tests for stages/metrics.py (fast: no Java, no GPU)."""
from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import stages.metrics as m
from stages.metrics import (
    caption_scores,
    detection_map,
    normalize_answer,
    tokenize_caption,
    topk_accuracy,
    vqa_accuracy,
    vqa_scores,
)

# --------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        # whitespace: newline / tab -> space, strip
        ("\tyes\n", "yes"),
        ("red\tcar", "red car"),
        # punctuation touching a space is deleted, otherwise replaced by a space
        ("hello, world", "hello world"),
        ("red,blue", "red blue"),
        ("red/blue", "red blue"),
        ("x-y, z", "x y z"),  # ", " present -> only ',' is deleted; '-' is not near a space -> space
        ("yes!", "yes"),
        ("(left)", "left"),
        # digit-comma-digit anywhere -> every punctuation mark is deleted, not spaced
        ("1,000", "1000"),
        ("2,000 red/blue", "2000 redblue"),
        # period rule: a period is removed unless a digit follows it
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("i.e.", "ie"),
        ("3.", "3"),
        (".5", ".5"),
        ("." * 40, "." * 8),  # official quirk: re.UNICODE passed as count -> at most 32 removals
        # not in the official punctuation list: kept
        ("3:00", "3:00"),
        ("don't", "don't"),
        # number words -> digits (manualMap)
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        # articles removed (whole words only)
        ("the red car", "red car"),
        ("an apple", "apple"),
        ("A dog", "dog"),
        ("theater", "theater"),
        ("a-b", "b"),  # '-' -> ' ', then the article 'a' goes
        # contractions map
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Whats up", "what's up"),
        ("youre", "you're"),
        ("oclock", "o'clock"),
        ("Im", "im"),  # official keys "Im"/"Ive" never match after lower-casing
        # combined
        ("The Two dogs, dont!", "2 dogs don't"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    gts = ["cat"] * k + ["dog"] * (10 - k)
    formula = ((10 - k) * min(k / 3, 1) + k * min((k - 1) / 3, 1)) / 10 if k else 0.0
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)
    assert formula == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    gts = ["2"] * 3 + ["Three"] * 7
    assert vqa_accuracy("Two.", gts) == pytest.approx(0.9)
    assert vqa_accuracy("the three", gts) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["Two"] * 10) == pytest.approx(1.0)


class _MasterVQAEval:
    """GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at master (a013f00, 2021),
    transcribed line by line for one question: ``processPunctuation``, ``processDigitArticle`` and the
    body of ``evaluate``'s loop. The contractions and number-word tables are the ones
    stages.metrics copies from that file."""

    def __init__(self):
        self.contractions = m._CONTRACTIONS
        self.manualMap = dict(m._MANUAL_MAP)
        self.articles = ["a", "an", "the"]
        self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
        self.commaStrip = re.compile(r"(\d)(\,)(\d)")
        self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        outText = self.periodStrip.sub("", outText, re.UNICODE)  # the flag lands in `count`
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = " ".join(outText)
        return outText

    def accuracy(self, pred, answers):
        gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
        for ansDic in gts:
            ansDic["answer"] = ansDic["answer"].replace("\n", " ")
            ansDic["answer"] = ansDic["answer"].replace("\t", " ")
            ansDic["answer"] = ansDic["answer"].strip()
        resAns = pred
        resAns = resAns.replace("\n", " ")
        resAns = resAns.replace("\t", " ")
        resAns = resAns.strip()
        gtAcc = []
        gtAnswers = [ans["answer"] for ans in gts]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts:
                ansDic["answer"] = self.processPunctuation(ansDic["answer"])
                ansDic["answer"] = self.processDigitArticle(ansDic["answer"])
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)
        for gtAnsDatum in gts:
            otherGTAns = [item for item in gts if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        return float(sum(gtAcc)) / len(gtAcc)


_ANSWER_POOL = ["yes", "Yes", "yes.", "yes!", " yes ", "yes\n", "no", "No", "2", "two", "Two", "2.", "none", "0",
                "dog", "the dog", "a dog", "Dog", "dogs", "1,000", "1000", "3.5", "dont", "don't", "isnt", "isn't",
                "red, blue", "red blue", "red/blue", "x-ray", "x ray", "U.S.A.", "usa", "left?", "(left)", "ten",
                "10", "10.", "white and black", "black & white", "o'clock", "oclock", "Im", "I'm", "im"]


def _random_case(rng: random.Random) -> tuple[str, list[str]]:
    pred = rng.choice(_ANSWER_POOL)
    if rng.random() < 0.3:
        return pred, [rng.choice(_ANSWER_POOL)] * 10
    pool = rng.sample(_ANSWER_POOL, rng.randint(2, 4))
    if rng.random() < 0.5:
        pool.append(pred)
    return pred, [rng.choice(pool) for _ in range(10)]


def test_vqa_accuracy_official_matches_master_on_random_cases():
    rng, master = random.Random(0), _MasterVQAEval()
    cases = [_random_case(rng) for _ in range(3000)]
    diffs = [(p, g) for p, g in cases if vqa_accuracy(p, g, official_gt_processing=True) != master.accuracy(p, g)]
    assert not diffs, f"{len(diffs)} of {len(cases)} differ from master, e.g. {diffs[:3]}"
    assert len({master.accuracy(p, g) for p, g in cases}) >= 4  # the cases reach several score levels


@pytest.mark.parametrize("pred, gts, want", [
    ("two", ["2"] * 10, 0.0),                     # all identical: raw strings compared
    ("yes.", ["yes"] * 10, 0.0),
    ("two", ["Two"] * 10, 0.0),
    ("2", ["2"] * 10, 1.0),
    ("yes", ["Yes"] * 4 + ["no"] * 6, 1.0),       # not identical: both sides normalised
    ("yes", ["yes!"] * 4 + ["no"] * 6, 1.0),
    ("Two.", ["2"] * 3 + ["three"] * 7, 0.9),
])
def test_vqa_accuracy_official_is_master(pred, gts, want):
    assert vqa_accuracy(pred, gts, official_gt_processing=True) == pytest.approx(want)
    assert _MasterVQAEval().accuracy(pred, gts) == pytest.approx(want)


def test_vqa_accuracy_default_equals_master_on_normalised_answers():
    rng, master = random.Random(1), _MasterVQAEval()
    for _ in range(2000):
        pred, gts = _random_case(rng)
        pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
        assert vqa_accuracy(pred, gts) == master.accuracy(pred, gts), (pred, gts)


def test_vqa_accuracy_empty_gts():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_vqa_scores():
    recs = [
        SimpleNamespace(question_id=1, answers=["yes"] * 10, answer_type="yes/no"),
        SimpleNamespace(question_id=2, answers=["no"] * 10, answer_type="yes/no"),
        SimpleNamespace(question_id=3, answers=["2"] * 2 + ["3"] * 8, answer_type="number"),
    ]
    out = vqa_scores({1: "yes", 2: "yes", 3: "two", 99: "ignored"}, recs)
    assert set(out) == {"vqa_acc", "vqa_acc_yes_no", "vqa_acc_number"}
    assert out["vqa_acc_yes_no"] == pytest.approx(50.0)
    assert out["vqa_acc_number"] == pytest.approx(60.0)
    assert out["vqa_acc"] == pytest.approx((100 + 0 + 60) / 3)
    with pytest.raises(ValueError):
        vqa_scores({1: "yes"}, recs)
    with pytest.raises(ValueError):
        vqa_scores({}, [])


# ----------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man's dog, running.", "a man 's dog running"),
        ('He said "don\'t go!" (now)', "he said do n't go now"),
        ("Black-and-white cat on 1,000 steps... at 10:30", "black-and-white cat on 1,000 steps at 10:30"),
        ("Mr. Smith in the U.S.", "mr. smith in the u.s."),
        ("dogs' bowls -- empty; ok?", "dogs bowls empty ok"),
        ("A\nTwo-line caption .", "a two-line caption"),
    ],
)
def test_tokenize_caption(raw, expected):
    assert tokenize_caption(raw) == expected


GTS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse along the shore."],
    2: ["Two dogs playing with a red ball in the grass.", "A couple of dogs chase a ball."],
    3: ["A plate of food with broccoli and rice.", "Rice and broccoli on a white plate."],
    4: ["A red bus parked on the side of a street.", "A double decker bus on a city road."],
}


def test_caption_scores_match_pycocoevalcap_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {1: "A man rides a horse on the beach.", 2: "Dogs play with a ball.", 3: "A plate of rice.", 4: "A bus on a street."}
    ours = caption_scores(res, GTS)
    tr = {k: [tokenize_caption(v)] for k, v in res.items()}
    tg = {k: [tokenize_caption(c) for c in v] for k, v in GTS.items()}
    bleu, _ = Bleu(4).compute_score(tg, tr, verbose=0)
    rouge, _ = Rouge().compute_score(tg, tr)
    cider, _ = Cider().compute_score(tg, tr)
    assert set(ours) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    for i in range(4):
        assert ours[f"BLEU-{i + 1}"] == pytest.approx(bleu[i], abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(float(rouge), abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(float(cider), abs=1e-12)
    assert all(isinstance(v, float) for v in ours.values())


def test_caption_scores_perfect_beats_wrong_and_bleu4_exact():
    perfect = {k: v[0] for k, v in GTS.items()}
    wrong = {1: "A cat sleeping on a sofa.", 2: "An airplane in the sky.", 3: "A man holding an umbrella.", 4: "A kitchen with a stove."}
    p = caption_scores(perfect, GTS)
    w = caption_scores(wrong, GTS)
    for key in p:
        assert p[key] > w[key], key
    assert p["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert p["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_errors():
    with pytest.raises(ValueError):
        caption_scores({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError):
        caption_scores({1: ""}, {1: ["a dog"]})
    with pytest.raises(ValueError):
        caption_scores({1: " . "}, {1: ["a dog"]})
    with pytest.raises(ValueError):
        caption_scores({1: "a dog"}, {1: [""]})
    with pytest.raises(ValueError):
        caption_scores({1: "a dog"}, {1: []})


# ---------------------------------------------------------------------- detection


def _gts():
    return [
        {"image_id": 1, "boxes": np.array([[10, 10, 50, 60], [100, 100, 180, 160]], float), "labels": np.array([1, 2])},
        {"image_id": 2, "boxes": np.array([[0, 0, 30, 30], [40, 40, 90, 120], [5, 60, 40, 100]], float), "labels": np.array([3, 1, 2])},
        {"image_id": 3, "boxes": np.zeros((0, 4)), "labels": np.zeros((0,), int)},
    ]


def test_detection_perfect():
    preds = [
        {"image_id": g["image_id"], "boxes": torch.as_tensor(g["boxes"]), "scores": torch.linspace(0.9, 0.5, len(g["labels"])),
         "labels": torch.as_tensor(g["labels"])}
        for g in _gts()
    ]
    m, pc = detection_map(preds, _gts(), num_classes=4)
    assert m["map"] == pytest.approx(1.0)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(1.0)
    assert pc == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}  # class 4: no GT, left out


def test_detection_shifted_is_zero():
    preds = [
        {"image_id": g["image_id"], "boxes": g["boxes"] + 300.0, "scores": np.ones(len(g["labels"])), "labels": g["labels"]}
        for g in _gts()
    ]
    m, pc = detection_map(preds, _gts(), num_classes=3)
    assert m["map"] == pytest.approx(0.0, abs=1e-6)
    assert m["map50"] == pytest.approx(0.0, abs=1e-6)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in pc.values())


def test_detection_empty_predictions():
    m, pc = detection_map([], _gts(), num_classes=3)
    assert m == {"map": 0.0, "map50": 0.0, "map75": 0.0}
    assert pc == {1: 0.0, 2: 0.0, 3: 0.0}
    empty = [{"image_id": g["image_id"], "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)} for g in _gts()]
    m, _ = detection_map(empty, _gts(), num_classes=3)
    assert m == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_detection_half_recall_hand_value():
    # Class 1 has 2 GT boxes; one is found perfectly (image 1), image 2 has no predictions.
    gts = [
        {"image_id": 1, "boxes": np.array([[10, 10, 50, 60]], float), "labels": np.array([1])},
        {"image_id": 2, "boxes": np.array([[40, 40, 90, 120]], float), "labels": np.array([1])},
    ]
    preds = [{"image_id": 1, "boxes": np.array([[10, 10, 50, 60]], float), "scores": np.array([0.8]), "labels": np.array([1])}]
    m, pc = detection_map(preds, gts, num_classes=1)
    # 101-point interpolation: precision 1 at recall 0.00..0.50 (51 points), 0 beyond.
    assert pc[1] == pytest.approx(51 / 101)
    assert m["map50"] == pytest.approx(51 / 101)


def test_detection_bad_labels():
    preds = [{"image_id": 1, "boxes": np.array([[0, 0, 1, 1]], float), "scores": np.array([0.5]), "labels": np.array([0])}]
    with pytest.raises(ValueError):
        detection_map(preds, _gts(), num_classes=3)


# ------------------------------------------------------------------- classification


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([2, 0, 1, 2])
    out = topk_accuracy(logits, targets, ks=(1, 2, 5))
    assert out == {"top1": pytest.approx(0.25), "top2": pytest.approx(0.75), "top5": pytest.approx(1.0)}
    assert set(topk_accuracy(logits, targets)) == {"top1", "top5"}
