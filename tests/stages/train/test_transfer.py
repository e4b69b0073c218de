"""The transfer contract (stages.train.transfer): every model family exposes transfer_blocks(model, ...)
-> TransferBlocks, and the optimizer param groups it yields are pinned, parameter by parameter: the
optimizer state in a checkpoint is matched by position, so a changed order or membership would resume
old checkpoints onto the wrong tensors. The pinned digests were taken from the recipes' own block/head
expressions before the contract existed (commit eb0ec6b)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import BertForMaskedLM

from stages.config.bert import BertSizes
from stages.config.cnn import ModelConfig as CnnModel
from stages.config.detector import ModelConfig as DetModel
from stages.config.train import Transfer
from stages.models import bert, detection, resnet, vlp
from stages.train.transfer import TransferBlocks, build_plan

SPECIAL = {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "unk": 1}


def _cnn(arch):
    m = resnet.build_classifier(CnnModel(arch=arch), 10)
    return m, resnet.transfer_blocks(m)


def _det(arch, pretrained, trainable, attrs):
    body = resnet.build_classifier(CnnModel(arch=arch), 10)
    cfg = DetModel(trainable_layers=trainable, attributes={"enabled": attrs > 0},
                   **({"anchor_sizes": [32]} if arch == "alexnet" else {}))
    m = detection.build_detector(cfg, body, 3, pretrained, arch, attrs)
    return m, detection.transfer_blocks(m)


def _bert():
    m = BertForMaskedLM(bert.build_bert_config(BertSizes(), 50))
    return m, bert.transfer_blocks(m)


def _vlp(stage, origin, itm):
    m = vlp.VLP(BertForMaskedLM(bert.build_bert_config(BertSizes(), 50)), 8, 4, SPECIAL, itm)
    if stage == "vqa":
        m = vlp.VQAModel(m, 7, 16)
    return m, vlp.transfer_blocks(m, visual_pretrained=origin == "vl", train_itm=stage == "vl")


CASES = {
    "cnn/narrow_resnet": lambda: _cnn("narrow_resnet"),
    "cnn/alexnet": lambda: _cnn("alexnet"),
    "cnn/resnet18": lambda: _cnn("resnet18"),
    "det/narrow_resnet/True/5/0": lambda: _det("narrow_resnet", True, 5, 0),
    "det/narrow_resnet/False/2/4": lambda: _det("narrow_resnet", False, 2, 4),
    "det/narrow_resnet/True/3/4": lambda: _det("narrow_resnet", True, 3, 4),
    "det/alexnet/True/3/0": lambda: _det("alexnet", True, 3, 0),
    "bert": _bert,
    **{f"{stage}/{origin}/{itm}": (lambda s=stage, o=origin, i=itm: _vlp(s, o, i))
       for origin in ("scratch", "bert", "vl") for itm in (False, True) for stage in ("vl", "caption", "vqa")},
}

PINNED = {  # sha256[:16] of [(group name, block, lr_mult, [parameter names])] as build_plan makes them
    "bert": "76b8d265fd06d274",
    "caption/bert/False": "a0ab7c447a904217",
    "caption/bert/True": "a0ab7c447a904217",
    "caption/scratch/False": "a0ab7c447a904217",
    "caption/scratch/True": "a0ab7c447a904217",
    "caption/vl/False": "89170eda5febe94d",
    "caption/vl/True": "89170eda5febe94d",
    "cnn/alexnet": "7ecccd99bab995df",
    "cnn/narrow_resnet": "f5f54318fa1df339",
    "cnn/resnet18": "39d381205836060d",
    "det/alexnet/True/3/0": "1e7e09cb855c2cbb",
    "det/narrow_resnet/False/2/4": "506de600e170aa99",
    "det/narrow_resnet/True/3/4": "447f5b173a152921",
    "det/narrow_resnet/True/5/0": "30607520bb0723b4",
    "vl/bert/False": "a0ab7c447a904217",
    "vl/bert/True": "42878c3b3a2a3541",
    "vl/scratch/False": "a0ab7c447a904217",
    "vl/scratch/True": "42878c3b3a2a3541",
    "vl/vl/False": "89170eda5febe94d",
    "vl/vl/True": "5e7d031da8d967c0",
    "vqa/bert/False": "c56121a975ec1edd",
    "vqa/bert/True": "c56121a975ec1edd",
    "vqa/scratch/False": "c56121a975ec1edd",
    "vqa/scratch/True": "c56121a975ec1edd",
    "vqa/vl/False": "6675660c87417a38",
    "vqa/vl/True": "6675660c87417a38",
}


def _groups(model, tb):
    names = {id(p): n for n, p in model.named_parameters()}
    plan = build_plan(tb.blocks, tb.head, Transfer(), 0.01)
    return [[g["name"], g["block"], g["lr_mult"], [names[id(p)] for p in g["params"]]] for g in plan.groups]


def _digest(groups) -> str:
    return hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(CASES))
def test_transfer_blocks_contract_and_pinned_param_groups(case):
    torch.manual_seed(0)
    model, tb = CASES[case]()
    assert isinstance(tb, TransferBlocks)
    params = [p for block in tb.blocks for p in block] + tb.head
    assert len({id(p) for p in params}) == len(params), "a parameter is in two blocks, or in a block and the head"
    assert {id(p) for p in params} <= {id(p) for p in model.parameters()}
    assert tb.head, "every family has a head that trains in every phase"
    assert _digest(_groups(model, tb)) == PINNED[case], f"{case}: param groups changed: {_groups(model, tb)}"


def test_the_family_head_rules():
    """What each family calls its head, said once: the tied MLM decoder weight trains with the embeddings;
    the ITM head trains only in vl; VQA's head is its answer MLP; a new visual embedding trains as head."""
    m, tb = _bert()
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    assert all(p is not m.bert.embeddings.word_embeddings.weight for p in tb.head)
    for stage in ("vl", "caption"):
        m, tb = _vlp(stage, "bert", itm=True)
        itm_in_head = {id(p) for p in m.itm.parameters()} <= {id(p) for p in tb.head}
        assert itm_in_head == (stage == "vl")
    m, tb = _vlp("vqa", "bert", itm=False)
    assert {id(p) for p in tb.head} == {id(p) for p in [*m.head.parameters(), *m.vlp.visual.parameters()]}
    m, tb = _vlp("vqa", "vl", itm=False)
    assert {id(p) for p in m.vlp.visual.parameters()} <= {id(p) for p in tb.blocks[0]}


@pytest.mark.parametrize("case", ["cnn/narrow_resnet", "cnn/resnet18", "det/narrow_resnet/False/2/4",
                                  "det/narrow_resnet/True/5/0", "vqa/vl/False"])
def test_frozen_blocks_put_their_batchnorm_in_eval_mode(case):
    """Every family's BatchNorm layers are placed in their block; the plan's phases set their modes: a linear
    probe keeps every block's BatchNorm in eval mode, lp_ft until lp_steps, then train mode."""
    torch.manual_seed(0)
    model, tb = CASES[case]()
    in_blocks = {id(p) for block in tb.blocks for p in block}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and all(id(p) in in_blocks for p in m.parameters())]
    assert bool(bns) == case.startswith(("cnn", "det/narrow_resnet/False")), case  # pretrained det: FrozenBN
    lp = build_plan(tb.blocks, tb.head, Transfer(strategy="linear_probe"), 0.01, model)
    assert {id(m) for _, m in lp.norms} == {id(m) for m in bns}
    model.train()
    lp.apply(0)
    assert not any(m.training for m in bns)
    lp_ft = build_plan(tb.blocks, tb.head, Transfer(strategy="lp_ft", lp_steps=3), 0.01, model)
    model.train()
    lp_ft.apply(2)
    assert not any(m.training for m in bns)
    lp_ft.apply(3)
    assert all(m.training for m in bns)
