"""Stage 5 `vqa`: visual question answering fine-tune of the VLP model.

    baton run configs/vlp-tiny.yaml            # runs it as part of the recipe
Reads VQA v2 questions + annotations (the ``vqa`` output of ``data``) and the region store. The
``init`` stage's VLP encoder (``init: null`` = same architecture, random weights: the control)
reads ``[CLS] regions [SEP] question [SEP]`` under the bidirectional mask; the final [CLS] state, beside
``counters`` soft counts over the regions' final states (:class:`stages.models.vlp.AnswerHead`: "how many"
needs a sum, which softmax attention into [CLS] cannot carry), goes through an MLP to one logit per answer
of the vocabulary (the ``num_answers`` most frequent
normalised training answers; 0 = all). Targets are VQA soft scores min(#annotators / 3, 1),
loss = binary cross-entropy with logits (summed over answers, averaged over questions).

Writes ``outputs/model/`` (the VLP encoder as a :func:`stages.models.vlp.save_vl` dir, plus
``head.safetensors`` and the answer list in config.json), ``outputs/tokenizer/`` and
``outputs/results_val.json`` (``[{question_id, answer}]``); reports official VQA accuracy on val,
overall and per answer type, against answering the most frequent training answer of the question's
question_type."""
from __future__ import annotations

import json

import torch
from torch import nn

from stages.config.vqa import Config  # noqa: F401 - the kind's config
from stages.contract import StageContext, StageError, StageResult
from stages.data.text_regions import RegionTable, TextRegionData, open_regions, regions_of
from stages.data.vqa import answer_vocab, load_vqa, type_prior, vqa_data, vqa_files
from stages.metrics import vqa_scores
from stages.models.vlp import VQAModel, build_model, check_length, save_vl, transfer_blocks
from stages.train.checkpoint import save_weights
from stages.train.device import autocast, to_device
from stages.train.loop import fit
from stages.progress import Progress


@torch.no_grad()
def predict(ctx: StageContext, model: VQAModel, ds: TextRegionData, batch_size: int) -> torch.Tensor:
    """Answer index per example of ``ds`` (in order)."""
    model.eval()
    out = []
    bar = Progress(ctx.name, "eval", len(ds), "questions")
    for batch in ds.batches(batch_size):
        batch = to_device(batch, ctx.device)
        with autocast(ctx):
            out.append(model(batch["text"], regions_of(batch)).float().argmax(-1).cpu())
        bar.update(len(out[-1]))
    return torch.cat(out)


def loss_fn(m: VQAModel, batch, step: int):
    """Binary cross-entropy against the soft scores, summed over answers, averaged over questions."""
    logits = m(batch["text"], regions_of(batch))  # (B, A)
    t = batch["targets"]  # (B, A) soft scores
    loss = nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="sum") / len(t)
    score = t.gather(1, logits.argmax(-1, keepdim=True)).mean().detach()
    return loss, {"soft_acc": score}


def val_scores(preds: dict[int, str], val_recs: list) -> dict[str, float]:
    """{question_id: answer} -> official VQA accuracy as ``val/<name>`` (overall and per answer type)."""
    return {f"val/{k}": v for k, v in vqa_scores(preds, val_recs).items()}


def save_outputs(ctx: StageContext, model: VQAModel, tok, answers: list[str], preds: dict[int, str],
                 val_recs: list) -> None:
    """model/ (the VLP encoder dir + head.safetensors, answers in config.json), tokenizer/, results_val.json."""
    out = ctx.outputs
    vqa_meta = {"answers": answers, "head_hidden": model.head.hidden, "counters": model.head.counters}
    save_vl(model.vlp.cpu(), out / "model", extra={"vqa": vqa_meta})
    save_weights(model.head.cpu().state_dict(), out / "model" / "head.safetensors")
    tok.save_pretrained(out / "tokenizer")
    (out / "results_val.json").write_text(json.dumps([{"question_id": r.question_id, "answer": preds[r.question_id]}
                                                      for r in val_recs]))


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    store = open_regions(ctx, cfg.regions)
    built = build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, store)
    tok = built.tokenizer
    check_length(built.model, store.k, cfg.max_question_len, "max_question_len")
    root = ctx.input(cfg.data, "vqa")
    train_recs, val_recs = load_vqa(*vqa_files(root, "train")), load_vqa(*vqa_files(root, "val"))
    if not train_recs or not val_recs:
        raise StageError(f"{root}: no VQA questions for train ({len(train_recs)}) or val ({len(val_recs)})")
    answers = answer_vocab(train_recs, cfg.num_answers)
    index = {a: i for i, a in enumerate(answers)}
    table = RegionTable(store, sorted({r.image_id for r in train_recs + val_recs}))
    train_ds = vqa_data(tok, train_recs, table, index, cfg.max_question_len)
    val_ds = vqa_data(tok, val_recs, table, index, cfg.max_question_len)
    torch.manual_seed(ctx.seed + 1)
    model = VQAModel(built.model, len(answers), cfg.head_hidden or 2 * built.model.hidden_size, cfg.counters)
    ctx.tracker.log_params({"data.train_questions": len(train_ds), "data.val_questions": len(val_ds),
                            "answers": len(answers), "init.origin": built.origin,
                            "model.params": sum(p.numel() for p in model.parameters())})

    def answer_val(m: VQAModel) -> dict[int, str]:
        return {r.question_id: answers[int(p)] for r, p in zip(val_recs, predict(ctx, m, val_ds, cfg.eval_batch_size))}

    tb = transfer_blocks(model, built.visual_pretrained)
    res = fit(ctx, model, train_ds, train_ds.collate, loss_fn, cfg.train, blocks=tb.blocks, head=tb.head,
              evaluate=lambda m: val_scores(answer_val(m), val_recs), best_metric=("val/vqa_acc", "max"))

    preds = answer_val(model)
    metrics = val_scores(preds, val_recs)
    prior, overall = type_prior(train_recs)
    base = {r.question_id: prior.get(r.question_type, overall) for r in val_recs}
    baselines = {f"{k}_type_prior": v for k, v in val_scores(base, val_recs).items()}
    ctx.tracker.log_metrics(metrics, step=res.step)
    save_outputs(ctx, model, tok, answers, preds, val_recs)
    return ctx.result(outputs={"model": "outputs/model", "tokenizer": "outputs/tokenizer",
                               "results": "outputs/results_val.json"},
                      metrics=metrics, baselines=baselines,
                      info={"resumed_from": res.resumed_from, "train_seconds": res.seconds, "init": built.origin,
                            "answers": len(answers), "questions_per_s": res.steps_per_s * cfg.train.batch_size})
