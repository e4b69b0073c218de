"""``baton advise --from STAGE --target PATH``: where a classification target sits in the 2x2 of
size x domain similarity, and which transfer strategy that suggests. It never trains.

1. The source: a finished ``cnn`` stage (by stage name: the recipe's planned dir with ``--recipe``, else the
   newest complete dir; or a stage dir / MLflow run id, as ``baton lineage`` takes), its ``outputs/model``.
2. Frozen features (the pooled penultimate layer, the model in eval mode) of the target's ``train/`` images
   and of held-out source data: the ``val/`` split of the ImageNet root the source cnn trained on.
3. :func:`stages.transferability.place`: images per class, the domain ratio (Frechet distance of the two
   feature sets over the source's own sampling noise at the same sample size), LogME of the target features,
   the quadrant and its recommendation. Thresholds: ``stages.transferability`` / README "The 2x2 advisor"."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flows.store import read_result, resolved_config
from stages.contract import StageError
from stages.recipe import Recipe, RecipeError


def _source(artifacts: Path, ref: str, recipe: Recipe | None) -> tuple[Path, Path, dict[str, Any]]:
    """(source stage dir, its model dir, its resolved config) of a complete cnn stage ``ref``."""
    from flows.lineage import find_node

    node = find_node(artifacts, ref, recipe)
    if node.state != "complete":
        raise RecipeError(f"advise --from {ref}: {node.path} is {node.state}, not a finished stage (run it first)")
    res = read_result(node.path)
    if res is None or "model" not in res.outputs or node.kind != "cnn":
        raise RecipeError(f"advise --from {ref}: {node.path} is a {node.kind!r} stage; advise needs a cnn stage "
                          "(a classifier with an `outputs/model`)")
    model_dir = Path(res.outputs["model"])
    return node.path, model_dir if model_dir.is_absolute() else node.path / model_dir, resolved_config(node.path)


def _heldout_root(artifacts: Path, source_dir: Path, cfg: dict[str, Any]) -> Path:
    """The val split of the ImageNet root the source cnn trained on (its ``data`` stage's output)."""
    from flows.lineage import read_node, stage_path

    data, output = cfg.get("data", "world"), cfg.get("data_output", "imagenet")
    fp = read_node(source_dir).upstream.get(data)
    res = read_result(stage_path(artifacts, data, fp)) if fp else None
    if res is None or output not in res.outputs:
        raise RecipeError(f"advise: the source's data stage {data!r} ({fp and fp[:16]}) has no complete output "
                          f"{output!r} in {artifacts}: its held-out images are needed")
    root = Path(res.outputs[output])
    root = root if root.is_absolute() else stage_path(artifacts, data, fp) / root
    return root / "val"


def _target_folder(target: Path) -> Path:
    """``PATH/train`` of an ImageNet root, else ``PATH`` itself as the class folders."""
    target = Path(target)
    if not target.exists():
        raise RecipeError(f"advise --target {target}: no such folder")
    return target / "train" if (target / "train").is_dir() else target


def _subsample(paths: list, labels: list[int], cap: int, seed: int) -> tuple[list, list[int]]:
    if len(paths) <= cap:
        return paths, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), cap, replace=False))
    return [paths[i] for i in keep], [labels[i] for i in keep]


def features(model_dir: Path, folder: Path, image_size: int, cap: int, seed: int = 0,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, D), labels (n,), images per class of the whole folder) of the ImageNet class folders in
    ``folder``: the cnn's pooled penultimate layer in eval mode, at most ``cap`` images (a random subset)."""
    import torch

    from stages.data.imagenet import ImageClassDataset, load_imagefolder, normalize_images
    from stages.models.resnet import head_name, load_classifier

    model, _ = load_classifier(model_dir, "advise --from")
    setattr(model, head_name(model), torch.nn.Identity())
    model.eval()
    paths, labels, _ = load_imagefolder(folder)
    counts = np.bincount(labels)
    paths, labels = _subsample(paths, labels, cap, seed)
    ds = ImageClassDataset(paths, labels, image_size, train=False, cache=False, raw=True)
    out = []
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            out.append(model(normalize_images(x)).flatten(1).double().numpy())  # (b, D)
    return np.concatenate(out), np.asarray(labels), counts


def advise(artifacts: Path, ref: str, target: Path, recipe: Recipe | None = None, max_images: int = 2000,
           seed: int = 0) -> dict[str, Any]:
    """The advisor's JSON document (see the module docstring)."""
    from stages.transferability import place

    folder = _target_folder(target)
    source_dir, model_dir, cfg = _source(Path(artifacts), ref, recipe)
    heldout = _heldout_root(Path(artifacts), source_dir, cfg)
    size = int(cfg.get("image_size", 32))
    try:
        src, _, _ = features(model_dir, heldout, size, max_images, seed)
        tgt, labels, counts = features(model_dir, folder, size, max_images, seed)
    except StageError as e:
        raise RecipeError(f"advise: {e}") from None
    advice = place(src, tgt, labels, counts=counts, seed=seed)
    return advice.to_json() | {"source": {"stage_dir": str(source_dir), "model": str(model_dir),
                                          "heldout": str(heldout), "heldout_images": len(src)},
                               "target": {"path": str(folder), "images_used": len(tgt)}}


def render(doc: dict[str, Any]) -> str:
    """The advice as text: the numbers, the quadrant, the recommendation (and the warning, if any)."""
    pc, dd, th, rec = doc["per_class"], doc["domain_distance"], doc["thresholds"], doc["recommendation"]
    lines = [f"source  {doc['source']['stage_dir']}  (held-out: {doc['source']['heldout_images']} images of "
             f"{doc['source']['heldout']})",
             f"target  {doc['target']['path']}: {doc['images']} images, {doc['classes']} classes",
             f"size    {pc['median']:.0f} images per class (median; min {pc['min']:.0f}, max {pc['max']:.0f})"
             f"  -> {doc['size']} (small below {th['small_max_per_class']})",
             f"domain  Frechet distance {dd['distance']:.3g} vs source-vs-source {dd['baseline']:.3g} at m="
             f"{dd['m']}: ratio {dd['ratio']:.2f}  -> {doc['domain']} (similar below {th['similar_max_ratio']})",
             f"LogME   {doc['logme']:.4f} (higher = the frozen features fit the target labels better)",
             f"quadrant: {doc['quadrant']}",
             f"recommend: {rec['strategy']}  ({rec['why']})",
             "  overrides: " + " ".join(f"train.{k}={v}" for k, v in rec["overrides"].items())]
    if "alternative" in rec:
        lines.append("  or:        " + " ".join(f"train.{k}={v}" for k, v in rec["alternative"].items()))
    if "warning" in rec:
        lines.append(f"WARNING: {rec['warning']}")
    return "\n".join(lines)
