"""Linear probe: how much attribute (e.g. colour) information the stored region features carry.

    python tools/probe.py --regions DET/outputs/regions --vg WORLD/outputs/vg            # colours
    python tools/probe.py --regions ... --vg ... --values small,large                     # sizes

Each ground-truth box of the Visual Genome folder that has exactly one attribute among ``values``
(default: the synthetic world's colours) is matched to the stored region of its image with the
highest IoU (>= ``iou``); that region's feature is an example labelled with the attribute. A
multinomial logistic regression (standardised features, L2 as scikit-learn's C=1, full-batch L-BFGS
in torch: scikit-learn is not a dependency of baton) is fitted on the train-split examples and
scored on the val split (:func:`stages.data.vg_splits`, the detector's split). Prints JSON: val
accuracy, the majority-class baseline, example counts and how many boxes found a region.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from stages.contract import StageError
from stages.data.regions import RegionStore
from stages.data.visual_genome import VGImage, load_vg, vg_splits


def matched_examples(store: RegionStore, images: list[VGImage], values: list[str],
                     iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """-> (features (n, D) float32, labels (n,) index into values, image index (n,), boxes considered)."""
    index = {v: i for i, v in enumerate(values)}
    feats, labels, owner, considered = [], [], [], 0
    for ii, im in enumerate(images):
        todo = [(j, [a for a in (im.attributes[j] if j < len(im.attributes) else []) if a in index])
                for j in range(len(im.names))]
        todo = [(j, hits[0]) for j, hits in todo if len(hits) == 1]
        if not todo:
            continue
        considered += len(todo)
        if im.image_id not in store:
            continue
        f, geom, _, n = store[im.image_id]
        if n == 0:
            continue
        scale = np.array([im.width, im.height, im.width, im.height], dtype=np.float32)
        regions = torch.from_numpy(np.asarray(geom[:n, :4], dtype=np.float32) * scale)
        gt = torch.from_numpy(im.boxes[[j for j, _ in todo]])
        best, arg = box_iou(gt, regions).max(1)
        for (j, value), b, a in zip(todo, best.tolist(), arg.tolist()):
            if b >= iou:
                feats.append(np.asarray(f[a], dtype=np.float32))
                labels.append(index[value])
                owner.append(ii)
    d = store.feature_dim
    return (np.stack(feats) if feats else np.zeros((0, d), np.float32), np.asarray(labels, dtype=np.int64),
            np.asarray(owner, dtype=np.int64), considered)


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, c: float = 1.0, steps: int = 200):
    """Multinomial logistic regression on standardised ``x``; objective = scikit-learn's
    ``LogisticRegression(C=c)``: sum of cross-entropies + ||W||^2 / (2c), here divided by n.
    Returns predict(x) -> labels."""
    xt = torch.from_numpy(x).double()
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    xs = (xt - mean) / std
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, yt) + (w * w).sum() / (2 * c * len(yt))
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: ((((torch.from_numpy(z).double() - mean) / std) @ w + b).argmax(1)).numpy()


def attribute_probe(regions_dir: Path, vg_dir: Path, values: list[str], seed: int = 0, iou: float = 0.5,
                    val_fraction: float = 0.05) -> dict:
    """Fit the probe on the train split's matched regions, score it on val (see the module docstring)."""
    store = RegionStore(Path(regions_dir))
    images, _ = load_vg(Path(vg_dir))
    splits, how = vg_splits(Path(vg_dir), images, seed, val_fraction)
    x, y, owner, considered = matched_examples(store, images, values, iou)
    is_val = np.isin(owner, splits["val"])
    xtr, ytr, xva, yva = x[~is_val], y[~is_val], x[is_val], y[is_val]
    if len(np.unique(ytr)) < 2 or len(yva) == 0:
        raise StageError(f"{regions_dir}: too few matched regions for a probe ({len(ytr)} train, {len(yva)} val "
                         f"examples with one of {values})")
    predict = fit_logistic(xtr, ytr, len(values))
    majority = np.bincount(ytr).argmax()
    return {"val_accuracy": float((predict(xva) == yva).mean()), "train_accuracy": float((predict(xtr) == ytr).mean()),
            "val_majority_baseline": float((yva == majority).mean()), "chance": 1.0 / len(values),
            "train_examples": int(len(ytr)), "val_examples": int(len(yva)),
            "boxes_considered": considered, "boxes_matched": int(len(y)), "split": how}


def main(argv: list[str] | None = None) -> int:
    from stages.data.synthetic import COLOUR_NAMES

    p = argparse.ArgumentParser(prog="python tools/probe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=Path, required=True, help="a region store folder (detector outputs/regions)")
    p.add_argument("--vg", type=Path, required=True, help="the Visual Genome folder it was detected on")
    p.add_argument("--values", default=",".join(COLOUR_NAMES), help="comma-separated attribute values (classes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split when the vg folder has no id lists")
    p.add_argument("--iou", type=float, default=0.5)
    args = p.parse_args(argv)
    try:
        print(json.dumps(attribute_probe(args.regions, args.vg, args.values.split(","), args.seed, args.iou), indent=2))
        return 0
    except (StageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
