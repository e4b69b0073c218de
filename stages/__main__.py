"""Run one stage without Prefect or MLflow (GPU benchmarks, debugging):

    python -m stages configs/vlp-tiny.yaml cnn --out /tmp/cnn --upstream world=artifacts/stages/world/<fp16>
    python -m stages configs/vlp-tiny.yaml cnn --out /tmp/cnn --upstream world=... stages.cnn.runtime.device=cuda

Overrides (``dotted.key=value``) may come anywhere on the line; ``--out`` is created when missing.

``stages.<name>.runtime.nproc_per_node=N`` runs the stage on N ranks (DDP: gloo on CPU, nccl on CUDA).

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


def _upstream(value: str) -> tuple[str, Path]:
    """``--upstream NAME=DIR``: a completed stage's directory (it holds result.json)."""
    name, sep, d = value.partition("=")
    if not sep or not name or not d:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=DIR (e.g. world=artifacts/stages/world/<fp16>)")
    if not (Path(d) / "result.json").is_file():
        raise argparse.ArgumentTypeError(f"{value!r}: {Path(d) / 'result.json'} not found (not a completed stage)")
    return name, Path(d)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("stage")
    p.add_argument("overrides", nargs="*", help="dotted.key=value (anywhere on the line)")
    p.add_argument("--out", required=True, type=Path, help="stage directory (created if missing)")
    p.add_argument("--upstream", action="append", default=[], type=_upstream,
                   help="NAME=DIR of a completed upstream stage (repeat for each)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("baton").setLevel(logging.INFO)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if args.stage not in recipe.stages:
            raise RecipeError(f"{args.config}: no stage {args.stage!r} (stages: {', '.join(recipe.stages)})")
        cfg = recipe.stages[args.stage]
        if cfg.runtime.nnodes > 1:
            raise RecipeError(f"stages.{args.stage}.runtime.nnodes={cfg.runtime.nnodes}: a stage across several "
                              "nodes runs through `baton run ... --cluster ADDRESS` (one process per Ray node); "
                              "here use runtime.nproc_per_node and nnodes: 1")
        dirs = dict(args.upstream)
        missing = [n for n in cfg.needs if n not in dirs]
        if missing:
            raise RecipeError(f"stage {args.stage!r} needs {missing}: pass --upstream NAME=DIR for each")
        ups = {n: StageResult.model_validate_json((d / "result.json").read_text()) for n, d in dirs.items()}
        args.out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(name=args.stage, config=cfg, stage_dir=args.out, upstream=ups, upstream_dirs=dirs,
                           fingerprint="standalone", tracker=NullTracker())
        if cfg.runtime.ranks > 1:  # N ranks through torch's elastic launcher (stages.train.launch)
            from stages.train.launch import run_ranks

            res = run_ranks(ctx)
        else:
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
