"""The language stages: bert, vl (VLP pretraining), caption and vqa.

Micro sizes throughout: a small synthetic world (stages.world) and, instead of running the detector,
a region store made from the scene ground truth (features = a fixed random projection of each
object's colour/shape/size plus noise), written with the detector's own RegionStoreWriter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import kind_module
from stages.contract import NullTracker, StageContext, StageResult
from stages.data.regions import RegionStoreWriter

WORLD_OUTPUTS = {"corpus": "outputs/corpus", "coco": "outputs/coco", "vqa": "outputs/vqa", "vg": "outputs/vg"}
RUNTIME = {"checkpoint_every": 10, "log_every": 5}


# ---------------------------------------------------------------------------------------------- fixtures


def make_world(root: Path, scenes_train: int = 40, scenes_val: int = 12, documents: int = 80, seed: int = 0) -> Path:
    """The synthetic world's text/scene outputs under ``root/outputs`` (the world stage's layout)."""
    from stages.config.world import Config
    from stages.data.synthetic import write_corpus, write_scenes

    cfg = Config(scenes={"train": scenes_train, "val": scenes_val}, corpus={"documents": documents})
    out = root / "outputs"
    out.mkdir(parents=True)
    write_scenes(out, cfg, seed)
    write_corpus(out, cfg, seed)
    return root


def make_regions(world_dir: Path, out: Path, k: int = 10, dim: int = 128, seed: int = 0) -> Path:
    """A RegionStore like the detector's, from the ground-truth objects of the world's VG files."""
    vg = world_dir / "outputs" / "vg"
    sizes = {r["image_id"]: r["width"] for r in json.loads((vg / "image_data.json").read_text())}
    attrs = json.loads((vg / "attributes.json").read_text())
    shapes = sorted({o["names"][0] for rec in attrs for o in rec["attributes"]})
    words = sorted({a for rec in attrs for o in rec["attributes"] for a in o["attributes"]}) + shapes
    rng = np.random.default_rng(seed)
    proj = rng.normal(0, 1, (len(words), dim)).astype(np.float32)
    w = RegionStoreWriter(out, len(attrs), k, dim, shapes)
    for rec in attrs:
        objs = rec["attributes"][:k]
        S = sizes[rec["image_id"]]
        feats, geom, probs = [], [], []
        for o in objs:
            onehot = np.zeros(len(words), np.float32)
            for a in o["attributes"] + o["names"]:
                onehot[words.index(a)] = 1
            feats.append(np.maximum(onehot @ proj + rng.normal(0, 0.3, dim), 0))
            x1, y1, x2, y2 = o["x"] / S, o["y"] / S, (o["x"] + o["w"]) / S, (o["y"] + o["h"]) / S
            geom.append([x1, y1, x2, y2, (x2 - x1) * (y2 - y1), rng.uniform(0.8, 1.0)])
            p = rng.uniform(0, 0.1, len(shapes) + 1)
            p[1 + shapes.index(o["names"][0])] += 1
            probs.append(p / p.sum())
        w.add(rec["image_id"], np.array(feats), np.array(geom), np.array(probs))
    return w.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lang")
    wd = make_world(root / "world")
    make_regions(wd, root / "detector" / "outputs" / "regions")
    return root


def upstream(root: Path, *names: str) -> tuple[dict[str, StageResult], dict[str, Path]]:
    """Upstream results for a context: world and detector are the fixtures, others ran in ``root``."""
    res, dirs = {}, {}
    for n in names:
        if n == "world":
            res[n] = StageResult(stage=n, kind="world", fingerprint="x", outputs=WORLD_OUTPUTS)
        elif n == "detector":
            res[n] = StageResult(stage=n, kind="detector", fingerprint="x", outputs={"regions": "outputs/regions"})
        else:
            res[n] = StageResult.model_validate_json((root / n / "result.json").read_text())
        dirs[n] = root / n
    return res, dirs


def make_ctx(root: Path, name: str, config, needs: tuple[str, ...], stage_dir: Path | None = None) -> StageContext:
    ups, dirs = upstream(root, *needs)
    return StageContext(name=name, config=config, stage_dir=stage_dir or root / name, upstream=ups, upstream_dirs=dirs,
                        fingerprint="t", tracker=NullTracker())


def run_stage(root: Path, name: str, config, needs: tuple[str, ...], stage_dir: Path | None = None):
    """Run a stage like the flow does (result.json written last); returns (result, tracker)."""
    ctx = make_ctx(root, name, config, needs, stage_dir)
    result = kind_module(config.kind).run(ctx)
    (ctx.stage_dir / "result.json").write_text(result.model_dump_json())
    return result, ctx.tracker


def loss_went_down(tracker: NullTracker) -> tuple[float, float]:
    losses = [m["train/loss"] for _, m in tracker.metrics if "train/loss" in m]
    assert len(losses) >= 2, tracker.metrics
    return losses[0], losses[-1]


MICRO = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_position": 40}


def micro_train(steps: int = 30, lr: float = 3e-3) -> dict:
    return {"steps": steps, "batch_size": 16, "lr": lr, "warmup_steps": 3}


def runtime() -> dict:
    return RUNTIME | {"threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def bert_stage(world):
    from stages import bert

    cfg = bert.Config(seed=0, runtime=runtime(), model=MICRO, seq_len=24, train=micro_train(40), whole_word=True)
    return run_stage(world, "bert", cfg, ("world",))


@pytest.fixture(scope="module")
def vl_stage(world, bert_stage):
    from stages import vl

    cfg = vl.Config(seed=0, runtime=runtime(), max_caption_len=12, train=micro_train(30), itm=True)
    return run_stage(world, "vl", cfg, ("world", "detector", "bert"))


# ---------------------------------------------------------------------------------------------- bert


def test_bert_contract(world, bert_stage):
    res, tracker = bert_stage
    out = world / "bert"
    for key in ("model", "tokenizer"):
        assert (out / res.outputs[key]).is_dir()
    assert (out / res.outputs["model"] / "model.safetensors").exists()
    assert (out / res.outputs["model"] / "config.json").exists()
    first, last = loss_went_down(tracker)
    assert last < first
    assert np.isfinite(res.metrics["val/perplexity"]) and res.baselines["val/perplexity_unigram"] > 1

    from transformers import BertForMaskedLM

    from stages.data.text import load_tokenizer
    tok = load_tokenizer(out / res.outputs["tokenizer"])
    assert tok.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 2, 3, 4]
    model = BertForMaskedLM.from_pretrained(str(out / res.outputs["model"]))
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == MICRO["hidden_size"]


def test_tokenizer_training_is_deterministic(world):
    from stages.config.bert import TokenizerConfig
    from stages.data.text import read_corpus, train_tokenizer

    docs = read_corpus(world / "world" / "outputs" / "corpus" / "train.txt")
    a, b = train_tokenizer(docs, TokenizerConfig()), train_tokenizer(list(reversed(docs)), TokenizerConfig())
    assert a.get_vocab() == b.get_vocab()
    assert len(train_tokenizer(docs, TokenizerConfig(vocab_size=100))) == 100 < len(a)  # merges stop at vocab_size
    # question words the corpus lacks are spelled out from the initial alphabet, not [UNK]
    assert a.unk_token not in a.tokenize("how many objects are there? what color is it?")


def test_mask_tokens_deterministic_whole_word_and_capped():
    from stages.models.masking import mask_tokens, step_generator

    ids = torch.arange(10, 50).view(2, 20)
    cand = torch.ones_like(ids, dtype=torch.bool)
    cand[:, 0] = False
    word_start = torch.ones_like(cand)
    word_start[:, 1::2] = False  # words of two pieces: (0,1), (2,3), ...
    normal = torch.arange(5, 60)
    a = mask_tokens(ids, cand, 0.4, 4, normal, step_generator(7, 3), word_start)
    b = mask_tokens(ids, cand, 0.4, 4, normal, step_generator(7, 3), word_start)
    c = mask_tokens(ids, cand, 0.4, 4, normal, step_generator(7, 4), word_start)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same (seed, step): same masks on resume
    assert not torch.equal(a[1], c[1])
    chosen = a[1] != -100
    assert torch.equal(chosen[:, 2::2], chosen[:, 3::2])  # both pieces of a word, or neither
    assert not chosen[:, 0].any() and torch.equal(a[1][chosen], ids[chosen])
    capped = mask_tokens(ids, cand, 0.9, 4, normal, step_generator(0, 0), max_pred=3)[1]
    assert ((capped != -100).sum(1) == 3).all()
    one = mask_tokens(ids, cand, 1e-6, 4, normal, step_generator(0, 0))[1]
    assert ((one != -100).sum(1) == 1).all()  # at least one prediction per row


# ---------------------------------------------------------------------------------------------- vl


def tiny_vlp(attn: str = "sdpa", vocab: int = 40):
    from transformers import BertForMaskedLM

    from stages.config.bert import BertSizes
    from stages.models.bert import build_bert_config
    from stages.models.vlp import VLP

    torch.manual_seed(0)
    cfg = build_bert_config(BertSizes(**MICRO, dropout=0.0), vocab)
    cfg._attn_implementation = attn
    return VLP(BertForMaskedLM(cfg), feature_dim=8, prob_dim=4, special={"cls": 2, "sep": 3, "pad": 0, "mask": 4}).eval()


def tiny_regions(n: int, k: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"feats": torch.randn(n, k, 8, generator=g), "geom": torch.rand(n, k, 6, generator=g),
            "probs": torch.rand(n, k, 4, generator=g), "n_boxes": torch.tensor([k, 3][:n] + [k] * max(0, n - 2))}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_s2s_mask_blocks_the_future(attn):
    """Under seq2seq, changing caption token j changes no position before it (regions, [CLS]/[SEP],
    earlier caption tokens); under the bidirectional mask it changes them all. Padded regions and
    [PAD] tokens are invisible under both."""
    model = tiny_vlp(attn)
    k = 5
    text = torch.tensor([[10, 11, 12, 13, 14, 3, 0], [20, 21, 22, 3, 0, 0, 0]])
    changed = text.clone()
    changed[:, 2] = 30  # caption position 2 (sequence position k + 2 + 2)
    regions = tiny_regions(2, k)
    j = k + 2 + 2
    with torch.no_grad():
        for s2s in (True, False):
            flag = torch.full((2,), s2s)
            a, b = model(text, regions, flag), model(changed, regions, flag)
            before = (a[:, :j] - b[:, :j]).abs().amax().item()
            after = (a[:, j:] - b[:, j:]).abs().amax().item()
            assert after > 1e-3
            if s2s:
                assert before < 1e-5, f"{attn}: a caption token saw a later one (max diff {before})"
            else:
                assert before > 1e-3
        # padding is invisible: region slots past n_boxes (here with noise added) and trailing [PAD]s
        # (example 1 in the padded batch vs. alone and unpadded)
        noisy = {key: v.clone() for key, v in regions.items()}
        noisy["feats"][1, 3:] += 5.0
        alone = {key: v[1:] for key, v in regions.items()}
        keep = [0, 1, 2, 3, 6, 7, 8, 9, 10]  # [CLS], regions 0-2, [SEP], the 4 caption tokens
        for s2s in (True, False):
            a = model(text, noisy, torch.full((2,), s2s))[1, keep]
            b = model(text[1:, :4], alone, torch.full((1,), s2s))[0, keep]
            assert (a - b).abs().amax() < 1e-5


def test_sdpa_and_eager_agree():
    from stages.models.vlp import vlp_attention

    a, b = tiny_vlp("sdpa"), tiny_vlp("eager")
    text = torch.tensor([[10, 11, 12, 3, 0], [20, 21, 3, 0, 0]])
    with torch.no_grad():
        for s2s in (True, False):
            flag = torch.full((2,), s2s)
            assert torch.allclose(a(text, tiny_regions(2), flag), b(text, tiny_regions(2), flag), atol=1e-5)
    valid = torch.tensor([[True, True, False, True, True]])
    allowed = vlp_attention(valid, 2, torch.tensor([True]))[0]
    assert allowed.tolist() == [[True, True, False, False, False], [True, True, False, False, False],
                                [True, True, False, False, False], [True, True, False, True, False],
                                [True, True, False, True, True]]


def test_vl_init_equals_bert(world, bert_stage):
    from transformers import BertForMaskedLM

    from stages import vl
    from stages.data.regions import RegionStore

    cfg = vl.Config(seed=0, runtime=runtime(), max_caption_len=12)
    ctx = make_ctx(world, "vl_init", cfg, ("world", "detector", "bert"))
    built = vl.build_model(ctx, cfg.init, cfg.tokenizer_from, cfg.model, RegionStore(ctx.input("detector", "regions")))
    assert built.origin == "bert"
    bert = BertForMaskedLM.from_pretrained(str(world / "bert" / "outputs" / "model")).state_dict()
    own = built.model.mlm.state_dict()
    assert own.keys() == bert.keys()
    for key, v in bert.items():
        assert torch.equal(own[key], v), key


def test_vl_contract(world, vl_stage):
    from stages.models.vlp import load_vl

    res, tracker = vl_stage
    out = world / "vl"
    assert (out / res.outputs["model"] / "model.safetensors").exists()
    assert (out / res.outputs["tokenizer"]).is_dir()
    first, last = loss_went_down(tracker)
    assert last < first
    assert any("train/itm_acc" in m for _, m in tracker.metrics)
    assert {"val/mlm_ppl", "val/s2s_ppl"} <= set(res.metrics)
    assert {"val/mlm_ppl_unigram", "val/mlm_ppl_text_only_init"} <= set(res.baselines)
    model = load_vl(out / res.outputs["model"])
    assert model.itm is not None and model.visual.feature_dim == 128


def test_vl_resume_equals_unbroken_run(world, bert_stage):
    """Masks, mask choice and ITM negatives come from (seed, step): a run resumed from its step-10
    checkpoint ends with the same weights as the unbroken run."""
    import shutil

    from stages import vl
    from stages.train.checkpoint import load_weights

    cfg = vl.Config(seed=3, runtime=runtime(), max_caption_len=12, train=micro_train(20), itm=True)
    stage_dir = world / "vl_resume"
    run_stage(world, "vl_resume", cfg, ("world", "detector", "bert"), stage_dir)
    unbroken = load_weights(stage_dir / "outputs" / "model" / "model.safetensors")
    assert (stage_dir / "checkpoints" / f"{10:08d}").is_dir()
    shutil.rmtree(stage_dir / "checkpoints" / f"{20:08d}")  # "killed" after step 10's checkpoint
    shutil.rmtree(stage_dir / "outputs")
    res, _ = run_stage(world, "vl_resume", cfg, ("world", "detector", "bert"), stage_dir)
    assert res.info["resumed_from"] == 10
    resumed = load_weights(stage_dir / "outputs" / "model" / "model.safetensors")
    for key, v in unbroken.items():
        assert torch.equal(resumed[key], v), key


def test_config_checks():
    from pydantic import ValidationError

    from stages import caption, vl, vqa

    with pytest.raises(ValidationError, match="tokenizer_from"):
        vl.Config(init=None)
    with pytest.raises(ValidationError, match="only used when init is null"):
        caption.Config(tokenizer_from="bert")
    with pytest.raises(ValidationError, match="model"):
        vqa.Config(model={"hidden_size": 32})
    with pytest.raises(ValidationError, match="s2s_prob"):
        vl.Config(s2s_prob=0.7)
    assert vl.Config().upstream_refs() == {"data": "world", "regions": "detector", "init": "bert"}
    assert caption.Config(init=None, tokenizer_from="bert").upstream_refs() == {
        "data": "world", "regions": "detector", "tokenizer_from": "bert"}


# ---------------------------------------------------------------------------------------------- caption


def test_caption_contract(world, vl_stage):
    from stages import caption

    cfg = caption.Config(seed=0, runtime=runtime(), max_caption_len=12, train=micro_train(30),
                         decode={"max_len": 12, "beam_size": 2}, num_samples=3)
    res, tracker = run_stage(world, "caption", cfg, ("world", "detector", "vl"))
    out = world / "caption"
    first, last = loss_went_down(tracker)
    assert last < first
    results = json.loads((out / res.outputs["captions"]).read_text())
    val = json.loads((world / "world" / "outputs" / "coco" / "captions_val.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(im["id"] for im in val["images"])
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    samples = json.loads((out / res.outputs["samples"]).read_text())
    assert len(samples) == 3 and {"image_id", "generated", "references"} <= set(samples[0])
    assert {"val/BLEU-4", "val/ROUGE-L", "val/CIDEr"} <= set(res.metrics)
    assert "val/CIDEr_most_common_caption" in res.baselines
    assert res.info["decode_captions_per_s"] > 0
    assert (out / res.outputs["model"] / "model.safetensors").exists()


def test_greedy_decoding_is_batched_and_matches_beam_1():
    from stages.models.decode import beam_decode, greedy_decode

    model = tiny_vlp()
    regions = tiny_regions(3)
    batched = greedy_decode(model, regions, max_len=6)
    assert len(batched) == 3 and all(isinstance(t, list) and len(t) <= 6 for t in batched)
    one_by_one = [greedy_decode(model, {k: v[i:i + 1] for k, v in regions.items()}, 6)[0] for i in range(3)]
    assert batched == one_by_one
    assert beam_decode(model, regions, beam=1, max_len=6, length_penalty=1.0) == batched
    beams = beam_decode(model, regions, beam=3, max_len=6, length_penalty=1.0)
    assert len(beams) == 3
    banned = {0, 2, 3, 4}  # [PAD] [CLS] [SEP] [MASK] never appear in an output
    assert not banned & {t for row in batched + beams for t in row}


# ---------------------------------------------------------------------------------------------- vqa


def test_vqa_soft_targets():
    from stages.data.vqa import answer_vocab, soft_targets

    index = {"yes": 0, "no": 1, "2": 2, "red": 3}
    t = soft_targets(["yes"] * 7 + ["no"] * 2 + ["two"], index)  # "two" normalises to "2"
    assert torch.allclose(t, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    assert torch.allclose(soft_targets(["Red"] * 3 + ["blue"] * 7, index), torch.tensor([0, 0, 0, 1.0]))

    class R:
        def __init__(self, answers):
            self.answers = answers
    recs = [R(["yes"] * 6 + ["no"] * 4), R(["two"] * 10)]
    assert answer_vocab(recs, 0) == ["2", "yes", "no"] and answer_vocab(recs, 2) == ["2", "yes"]


def test_vqa_contract_from_scratch(world, bert_stage):
    from stages import vqa

    cfg = vqa.Config(seed=0, runtime=runtime(), init=None, tokenizer_from="bert", model=MICRO | {"max_position": 32},
                     train=micro_train(30))
    res, tracker = run_stage(world, "vqa", cfg, ("world", "detector", "bert"))
    out = world / "vqa"
    first, last = loss_went_down(tracker)
    assert last < first
    results = json.loads((out / res.outputs["results"]).read_text())
    qs = json.loads((world / "world" / "outputs" / "vqa" / "v2_OpenEnded_mscoco_val_questions.json").read_text())
    assert [r["question_id"] for r in results] == [q["question_id"] for q in qs["questions"]]
    assert {"val/vqa_acc", "val/vqa_acc_yes_no", "val/vqa_acc_number", "val/vqa_acc_other"} <= set(res.metrics)
    assert "val/vqa_acc_type_prior" in res.baselines and res.info["init"] == "scratch"
    assert (out / res.outputs["model"] / "head.safetensors").exists()


def test_vqa_keep_best_outputs_the_best_validation_pass(world, bert_stage, tmp_path):
    """train.eval_every + keep_best: the stage's reported accuracy is that of the best pass during
    training (its weights are the output), not of the last step."""
    from stages import vqa

    cfg = vqa.Config(seed=0, runtime=runtime() | {"checkpoint_every": 100, "keep_checkpoints": 1}, init=None,
                     tokenizer_from="bert", model=MICRO | {"max_position": 32},
                     train=micro_train(30, lr=1e-2) | {"eval_every": 6, "keep_best": True})
    res, tracker = run_stage(world, "vqa", cfg, ("world", "detector", "bert"), stage_dir=tmp_path / "vqa")
    passes = {s: m["val/vqa_acc"] for s, m in tracker.metrics if "val/vqa_acc" in m and s % 6 == 0}
    assert sorted(passes) == [6, 12, 18, 24, 30], tracker.metrics
    best_step = max(passes, key=lambda s: (passes[s], -s))
    assert res.metrics["val/vqa_acc"] == pytest.approx(passes[best_step])
    # the final metrics are logged at the selected step: one value per step in the MLflow history
    final = [(s, m["val/vqa_acc"]) for s, m in tracker.metrics if "val/vqa_acc" in m]
    assert sorted({s for s, _ in final}) == sorted(passes) and len(final) == len(passes) + 1
    assert final[-1] == (best_step, pytest.approx(passes[best_step]))
    kept = sorted(int(p.name) for p in (tmp_path / "vqa" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({best_step, 30})
