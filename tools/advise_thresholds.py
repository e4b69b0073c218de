"""Set the 2x2 advisor's domain threshold on held-out world data (README "The 2x2 advisor").

    python -m tools.advise_thresholds --from cnn --artifacts artifacts [--recipe configs/transfer-2x2.yaml]

For a finished source cnn: a fresh world classification set is rendered with a seed the source never saw
(same config as its world), and :func:`stages.transferability.domain_ratio` of that held-out world set
against the source's own val split is measured at several sample sizes m, over many random draws. These are
targets from the source's own distribution, so every ratio should be "similar": the printed quantiles are
the noise envelope that SIMILAR_MAX_RATIO must sit above. Nothing is trained."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from flows.advise import _heldout_root, _source, features
from stages.config.world import Config as WorldConfig
from stages.data.synthetic import write_classification
from stages.recipe import load_recipe
from stages.transferability import domain_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", default="cnn")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--recipe", type=Path)
    p.add_argument("--seed", type=int, default=987654, help="seed of the held-out world (never trained on)")
    p.add_argument("--draws", type=int, default=40)
    args = p.parse_args()
    recipe = load_recipe(args.recipe) if args.recipe else None
    source_dir, model_dir, cfg = _source(args.artifacts, args.source, recipe)
    val = _heldout_root(args.artifacts, source_dir, cfg)
    world_dir = val.parents[2]
    wcfg = WorldConfig.model_validate(json.loads((world_dir / "config.json").read_text())["resolved"])
    size = int(cfg.get("image_size", 32))
    with tempfile.TemporaryDirectory() as tmp:
        write_classification(Path(tmp), wcfg, args.seed)
        fresh, _, _ = features(model_dir, Path(tmp) / "imagenet" / "train", size, 4000)
    src, _, _ = features(model_dir, val, size, 4000)
    out = {}
    for m in (20, 40, 80, 120, 200):
        rng = np.random.default_rng(m)  # a random (not class-sorted) m of the held-out world per draw
        r = [domain_ratio(src, fresh[rng.permutation(len(fresh))[:m]], seed=s)["ratio"]
             for s in range(args.draws)]
        out[m] = {"median": float(np.median(r)), "q95": float(np.quantile(r, 0.95)), "max": float(np.max(r))}
        print(f"m={m:4d}  world-vs-world ratio: median {out[m]['median']:.2f}  q95 {out[m]['q95']:.2f}  "
              f"max {out[m]['max']:.2f}  ({args.draws} draws)")
    print(json.dumps({"source": str(source_dir), "heldout_world_seed": args.seed, "ratios": out}))


if __name__ == "__main__":
    main()
