"""Classification backbones: torchvision's ResNets / VGG / AlexNet and a narrow ResNet for CPU; their saved
format, their init weights and their transfer blocks."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from stages.config.cnn import ModelConfig
from stages.contract import StageError
from stages.train.checkpoint import load_into, load_weights, save_weights
from stages.train.transfer import TransferBlocks


class NarrowResNet(ResNet):
    """torchvision ResNet with chosen widths/depths (same attribute names: conv1, bn1, layer1..4, fc),
    so torchvision's detection backbone utilities (IntermediateLayerGetter, BackboneWithFPN) work on it."""

    def __init__(self, widths: list[int], blocks: list[int], num_classes: int, stem: str = "small"):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        if stem == "small":
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_classifier(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """ModelConfig + class count -> an untrained classifier (ResNet-like attribute names).

    >>> m = build_classifier(ModelConfig(), 10); m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])"""
    if cfg.arch == "narrow_resnet":
        if len(cfg.widths) != 4 or len(cfg.blocks) != 4:
            raise StageError("model.widths and model.blocks must have 4 entries (one per ResNet stage)")
        return NarrowResNet(cfg.widths, cfg.blocks, num_classes, cfg.stem)
    return getattr(torchvision.models, cfg.arch)(num_classes=num_classes)


def save_classifier(model: nn.Module, cfg: ModelConfig, classes: list[str], out: Path) -> None:
    """``out/model.safetensors`` + ``out/config.json`` ({"model": cfg, "classes": class names}): the cnn
    stage's ``model`` output, read back by :func:`load_classifier`."""
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": cfg.model_dump(), "classes": classes}, indent=2))


def load_classifier(model_dir: Path, field: str) -> tuple[nn.Module, ModelConfig]:
    """A directory written by :func:`save_classifier` -> (the classifier with its weights, its ModelConfig).
    ``field`` (e.g. ``backbone_from='cnn'``) is the config key that pointed here, for the error."""
    meta_file = model_dir / "config.json"
    if not meta_file.is_file():
        raise StageError(f"{field}: {meta_file} not found")
    meta = json.loads(meta_file.read_text())
    cfg = ModelConfig(**meta["model"])
    model = build_classifier(cfg, len(meta["classes"]))
    load_into(model, load_weights(model_dir / "model.safetensors"), str(model_dir / "model.safetensors"))
    return model, cfg


def pretrained_classifier(model_dir: Path, num_classes: int, field: str) -> tuple[nn.Module, ModelConfig]:
    """A classifier for ``num_classes`` with the architecture and weights of the one saved in ``model_dir``
    (:func:`save_classifier`), its class head freshly initialised: a downstream fine-tune's start."""
    _, cfg = load_classifier(model_dir, field)  # checks the saved weights fit their own config
    model = build_classifier(cfg, num_classes)
    load_into(model, load_weights(model_dir / "model.safetensors"), f"{field}: {model_dir}", strict=True,
              ignore=(head_name(model) + ".",))
    return model, cfg


def head_name(model: nn.Module) -> str:
    """The class head's attribute: ``fc`` (ResNet family) or ``classifier`` (VGG16 / AlexNet). The one rule
    for what :func:`init_weights` re-initialises and what :func:`transfer_blocks` calls the head."""
    return "fc" if hasattr(model, "layer1") else "classifier"


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Load ``cfg.init`` (a local file or a torchvision weights name); the class head is re-initialised."""
    if not cfg.init:
        return
    path = Path(cfg.init)
    if path.exists():
        if path.suffix == ".safetensors":
            state = load_weights(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        source = str(path)
    else:
        try:
            weights = torchvision.models.get_weight(cfg.init)
        except (ValueError, KeyError) as e:
            raise StageError(f"model.init={cfg.init!r} is neither an existing file nor a torchvision weights "
                             "name") from e
        state, source = weights.get_state_dict(progress=False), cfg.init
    load_into(model, state, source, strict=True, ignore=(head_name(model) + ".",))


def transfer_blocks(model: nn.Module) -> TransferBlocks:
    """A classifier from :func:`build_classifier` -> blocks: ResNets stem (conv1 + bn1), layer1..layer4;
    VGG16 / AlexNet their conv ``features`` as one block. Head: the class head (:func:`head_name`)."""
    head = list(getattr(model, head_name(model)).parameters())
    if hasattr(model, "layer1"):
        stem = [*model.conv1.parameters(), *model.bn1.parameters()]
        return TransferBlocks([stem] + [list(getattr(model, f"layer{i}").parameters()) for i in range(1, 5)], head)
    return TransferBlocks([list(model.features.parameters())], head)
