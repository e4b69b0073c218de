"""Transfer-learning strategies shared by every fine-tuning stage.

Every model family in ``stages.models`` exposes ``transfer_blocks(model, ...) -> TransferBlocks``
(resnet, detection, bert, vlp): ``blocks`` is the backbone as an ordered list of parameter lists (input
side first: embeddings, stage 1, ...), ``head`` the task head's parameters, which train in every phase.
That function is the one place that says which parameters form the head of its family; a stage recipe
calls it and passes ``blocks=``/``head=`` to ``fit``. The order of blocks and of the parameters within
each is part of the checkpoint format (optimizer state is matched by position).

The strategy turns that into optimizer param groups (each with its LR multiplier) and a per-step plan
(which blocks train at step s, and each group's LR factor), so a resumed run reproduces the same phases
from the step number alone.

  finetune      everything trains; backbone LR x backbone_lr_mult; optional layer_decay
  linear_probe  only the head trains
  partial       the first freeze_blocks blocks stay frozen
  lp_ft         linear probe for lp_steps, then everything trains at LR x ft_lr_mult

A frozen block is a frozen feature extractor: its BatchNorm layers (found by their affine weights in the
block) are in eval mode, running statistics neither used from the batch nor updated, for as long as the block
is frozen (linear_probe: always; partial: the frozen blocks; lp_ft: the backbone until lp_steps). The loop
calls :meth:`TransferPlan.apply` before every step, after any ``model.train()`` (validation passes end in
one), so the modes follow the step number alone and a resumed run reproduces them. Families with
LayerNorm only (bert, vlp) and the detector's FrozenBatchNorm2d are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from stages.config.train import Transfer


class TransferBlocks(NamedTuple):
    """What a model family's ``transfer_blocks`` returns (unpacks as ``blocks, head``)."""

    blocks: list[list[torch.nn.Parameter]]  # backbone, input side first
    head: list[torch.nn.Parameter]  # trains in every phase of every strategy


def _no_decay(p: torch.nn.Parameter) -> bool:
    return p.ndim <= 1  # biases and norm weights


@dataclass
class TransferPlan:
    cfg: Transfer
    blocks: list[list[torch.nn.Parameter]]
    head: list[torch.nn.Parameter]
    groups: list[dict]  # optimizer param groups; each has 'block' (-1 = head) and 'lr_mult'
    norms: list[tuple[int, torch.nn.Module]] = field(default_factory=list)  # (block, its BatchNorm layer)

    def trainable_blocks(self, step: int) -> set[int]:
        n = len(self.blocks)
        s = self.cfg.strategy
        if s == "linear_probe" or (s == "lp_ft" and step < self.cfg.lp_steps):
            return set()
        if s == "partial":
            if self.cfg.freeze_blocks > n:
                raise ValueError(f"transfer.freeze_blocks={self.cfg.freeze_blocks} but the model has {n} blocks")
            return set(range(self.cfg.freeze_blocks, n))
        return set(range(n))

    def apply(self, step: int) -> None:
        """Put a model in train mode into the phase that ``step`` is in: requires_grad of every block, and
        the BatchNorm layers of the frozen blocks in eval mode (those of the live blocks in train mode)."""
        live = self.trainable_blocks(step)
        for i, params in enumerate(self.blocks):
            for p in params:
                p.requires_grad_(i in live)
        for p in self.head:
            p.requires_grad_(True)
        for i, m in self.norms:
            m.train(i in live)

    def lr_factor(self, group: dict, step: int) -> float:
        """Multiplier on the group's base LR at ``step`` (before the schedule)."""
        if self.cfg.strategy == "lp_ft":
            if step < self.cfg.lp_steps:
                return 1.0 if group["block"] < 0 else 0.0
            return self.cfg.ft_lr_mult
        if group["block"] >= 0 and group["block"] not in self.trainable_blocks(step):
            return 0.0
        return 1.0

    def describe(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {"transfer.strategy": self.cfg.strategy}
        for g in self.groups:
            out[f"transfer.lr_mult.{g['name']}"] = g["lr_mult"]
        return out


def block_norms(model: torch.nn.Module, blocks: list[list[torch.nn.Parameter]]) -> list[tuple[int, torch.nn.Module]]:
    """(block index, layer) for every BatchNorm of ``model`` with running statistics whose affine weights are in
    a backbone block (those in the head, or in no group, are left as they are). A BatchNorm without affine
    weights cannot be placed in a block: refused, naming it, rather than left updating a frozen block."""
    where = {id(p): i for i, params in enumerate(blocks) for p in params}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
            continue
        owners = {where.get(id(p)) for p in m.parameters(recurse=False)}
        if not owners:
            raise ValueError(f"BatchNorm {name!r} has no affine weights: the transfer plan cannot tell which "
                             "block it belongs to (use affine=True)")
        if len(owners) > 1:
            raise ValueError(f"BatchNorm {name!r} has its weight and bias in different blocks/head: {owners}")
        if (i := owners.pop()) is not None:
            out.append((i, m))
    return out


def build_plan(blocks: list[list[torch.nn.Parameter]], head: list[torch.nn.Parameter], cfg: Transfer,
               weight_decay: float, model: torch.nn.Module | None = None) -> TransferPlan:
    """Param groups: one per (block, decay/no-decay) with LR multipliers from the strategy. With ``model``,
    the plan also sets the train/eval mode of the blocks' BatchNorm layers (:func:`block_norms`)."""
    n = len(blocks)
    seen = {id(p) for p in head}
    groups: list[dict] = []

    def add(name: str, block: int, params: list[torch.nn.Parameter], mult: float) -> None:
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        for decay in (True, False):
            ps = [p for p in params if _no_decay(p) != decay]
            if ps:
                groups.append({"name": f"{name}{'' if decay else '.no_decay'}", "block": block, "params": ps,
                               "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0})

    for i, params in enumerate(blocks):
        mult = cfg.backbone_lr_mult
        if cfg.layer_decay is not None:
            mult *= cfg.layer_decay ** (n - i)
        add(f"block{i}", i, params, mult)
    seen -= {id(p) for p in head}
    add("head", -1, head, 1.0)
    norms = block_norms(model, blocks) if model is not None and cfg.strategy != "finetune" else []
    plan = TransferPlan(cfg, blocks, head, groups, norms)
    plan.trainable_blocks(0)  # validates freeze_blocks against the model
    return plan
