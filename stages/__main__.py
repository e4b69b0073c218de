"""Run one stage without Prefect or MLflow (GPU benchmarks, debugging):

    python -m stages configs/vlp-tiny.yaml cnn --out /tmp/cnn --upstream world=artifacts/stages/world/<fp16>
    python -m stages configs/vlp-tiny.yaml cnn --out /tmp/cnn --upstream world=... stages.cnn.runtime.device=cuda

Upstream stages are given as directories holding a ``result.json``. Metrics go to stdout; the stage
writes its checkpoints and outputs under ``--out`` (rerunning resumes from the newest checkpoint).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stages import kind_module
from stages.contract import NullTracker, StageContext, StageError, StageResult, seed_stage
from stages.fsio import write_json_atomic
from stages.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("stage")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--out", required=True, type=Path, help="stage directory")
    p.add_argument("--upstream", action="append", default=[], help="NAME=DIR of a completed upstream stage")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("baton").setLevel(logging.INFO)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if args.stage not in recipe.stages:
            raise RecipeError(f"{args.config}: no stage {args.stage!r} (stages: {', '.join(recipe.stages)})")
        cfg = recipe.stages[args.stage]
        dirs = dict(u.split("=", 1) for u in args.upstream)
        missing = [n for n in cfg.needs if n not in dirs]
        if missing:
            raise RecipeError(f"stage {args.stage!r} needs {missing}: pass --upstream NAME=DIR for each")
        ups = {n: StageResult.model_validate_json((Path(d) / "result.json").read_text()) for n, d in dirs.items()}
        ctx = StageContext(name=args.stage, config=cfg, stage_dir=args.out, upstream=ups,
                           upstream_dirs={n: Path(d) for n, d in dirs.items()}, fingerprint="standalone",
                           tracker=NullTracker())
        seed_stage(cfg)
        res = kind_module(cfg.kind).run(ctx)
        write_json_atomic(args.out / "result.json", res.model_dump(mode="json"))
        print(json.dumps({"metrics": res.metrics, "baselines": res.baselines, "info": res.info}, indent=2))
        return 0
    except (RecipeError, StageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
