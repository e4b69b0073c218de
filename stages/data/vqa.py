"""VQA v2: questions JSON + annotations JSON (10 answers with confidences), answer vocabularies, soft targets."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.contract import StageError
from stages.data.common import _get, _int, _list, read_json
from stages.data.text_regions import RegionTable, TextRegionData, encode_texts
from stages.metrics import normalize_answer


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


def answer_vocab(records: list[VQARecord], k: int) -> list[str]:
    """The k most frequent normalised answers over every human answer of ``records`` (0 = all);
    ties broken alphabetically."""
    c = Counter(normalize_answer(a) for r in records for a in r.answers)
    ranked = sorted(c.items(), key=lambda t: (-t[1], t[0]))
    return [a for a, _ in (ranked[:k] if k else ranked)]


def soft_targets(answers: list[str], index: dict[str, int]) -> torch.Tensor:
    """VQA soft score per vocabulary answer: min(#annotators who gave it / 3, 1). (A,) float.
    Answers outside the vocabulary are dropped."""
    t = torch.zeros(len(index))
    for a, n in Counter(normalize_answer(a) for a in answers).items():
        if a in index:
            t[index[a]] = min(n / 3.0, 1.0)
    return t


def type_prior(records: list[VQARecord]) -> tuple[dict[str, str], str]:
    """Most frequent normalised multiple_choice_answer per question_type, and overall."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_type[r.question_type][normalize_answer(r.multiple_choice_answer)] += 1
    overall = Counter(normalize_answer(r.multiple_choice_answer) for r in records).most_common(1)[0][0]
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}, overall


def vqa_data(tok, records: list[VQARecord], table: RegionTable, index: dict[str, int], max_len: int) -> TextRegionData:
    texts = encode_texts(tok, [r.question for r in records], max_len)
    targets = torch.stack([soft_targets(r.answers, index) for r in records])  # (N, A)
    return TextRegionData(table, [table.row[r.image_id] for r in records], texts, tok.pad_token_id,
                          extras={"targets": targets})
