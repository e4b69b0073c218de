"""Stage 0 ``world``: the synthetic world (:mod:`stages.data.synthetic`), or pointers to real data.

``source: synthetic`` writes the real public formats (ImageNet class folders, Visual Genome JSON,
plain-text corpus, COCO captions, VQA v2), so the same loaders (``stages.data``) read either.
``source: real`` points at real datasets (``paths.*``, passed on as the stage's outputs), except
the caption formats that are not COCO's: ``paths.karpathy`` (Karpathy split JSON) or
``paths.cc_train`` + ``paths.cc_val`` (Conceptual-Captions-style TSV) are converted into
``outputs/coco/captions_{train,val[,test]}.json`` (:func:`convert_captions`), the ``coco`` output
vl / caption read, with each image's file in a ``file_path`` key.
``paths.regions`` is a region-feature store (:mod:`stages.data.regions`, e.g. imported from
bottom-up-attention TSV), checked to open and passed on as the ``regions`` output that vl / caption /
vqa read with ``regions: <this stage>``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages.config.world import CAPTION_SOURCES, OUTPUTS, Config
from stages.contract import StageContext, StageError, StageResult, log
from stages.data.regions import RegionStore
from stages.data.synthetic import COLOUR_NAMES, RELATIONS, SHAPES, SIZES, generate
from stages.fsio import publish_outputs


def convert_captions(out: Path, cfg: Config, found: dict[str, Path]) -> dict[str, int]:
    """paths.karpathy or paths.cc_train + cc_val -> ``out/coco/captions_{train,val[,test]}.json``
    (COCO captions JSON, with each image's ``file_path``), the layout vl / caption already read."""
    from stages.data.captions import CC_VAL_ID_BASE, load_cc_tsv, load_karpathy, write_coco_captions

    counts: dict[str, int] = {}
    if "karpathy" in found:
        src = found["karpathy"]
        splits, stats = load_karpathy(src, found.get("karpathy_images"), cfg.karpathy_restval)
        counts.update({f"karpathy_{k}": v for k, v in stats.items()})
    else:
        src = found["cc_train"]
        splits = {"train": load_cc_tsv(found["cc_train"], 0), "val": load_cc_tsv(found["cc_val"], CC_VAL_ID_BASE)}
    for split in ("train", "val"):
        if not splits[split]:
            raise StageError(f"{src}: no {split!r} images")
    (out / "coco").mkdir(parents=True)
    for split, images in splits.items():
        if images:
            counts[f"captions_{split}"] = write_coco_captions(out / "coco" / f"captions_{split}.json", images,
                                                              f"converted by baton from {src}")
            counts[f"images_{split}"] = len(images)
    return counts


def _run_real(ctx: StageContext, cfg: Config) -> StageResult:
    outputs: dict[str, str] = {}
    info: dict[str, Any] = {"source": "real"}
    for name, p in cfg.paths.model_dump().items():
        if p is None:
            continue
        path = Path(p).expanduser().resolve()
        if not path.exists():
            raise StageError(f"stage {ctx.name!r}: paths.{name} = {p!r}: {path} does not exist")
        if name == "regions":
            try:
                store = RegionStore(path)
            except StageError as e:
                raise StageError(f"stage {ctx.name!r}: paths.regions = {p!r}: {e}") from None
            info["regions"] = {"images": len(store), "k": store.k, "feature_dim": store.feature_dim,
                               "classes": store.num_classes}
        outputs[name] = str(path)
    if "imagenet" in outputs:
        train = Path(outputs["imagenet"]) / "train"
        if train.is_dir():
            info["classes"] = sum(1 for d in train.iterdir() if d.is_dir())
    ctx.tracker.log_params({"source": "real", **{f"paths.{k}": v for k, v in outputs.items()}})
    counts: dict[str, int] = {}
    found = {k: Path(outputs.pop(k)) for k in (*CAPTION_SOURCES, "karpathy_images") if k in outputs}
    if found:
        t0 = time.perf_counter()
        counts = publish_outputs(Path(ctx.stage_dir), lambda tmp: convert_captions(tmp, cfg, found))
        outputs["coco"] = "outputs/coco"
        info["captions_from"] = {k: str(v) for k, v in found.items()}
        log.info("world: converted %s to COCO captions in %.1fs: %s", sorted(found), time.perf_counter() - t0, counts)
    return ctx.result(outputs=outputs, metrics={k: float(v) for k, v in counts.items()}, info=info)


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    if not isinstance(cfg, Config):
        cfg = Config.model_validate(cfg.model_dump())
    if cfg.source == "real":
        return _run_real(ctx, cfg)

    t0 = time.perf_counter()
    counts = publish_outputs(Path(ctx.stage_dir), lambda tmp: generate(tmp, cfg, ctx.seed))
    seconds = time.perf_counter() - t0
    log.info("world: generated %s in %.1fs", counts, seconds)
    ctx.tracker.log_params({k: v for k, v in counts.items() if k in (
        "classes", "classification_train", "classification_val", "scenes_train", "scenes_val", "corpus_train")})
    info = {"source": "synthetic", "classes": counts["classes"], "shapes": list(SHAPES), "colours": list(COLOUR_NAMES),
            "sizes": list(SIZES), "relations": list(RELATIONS),
            "classification_image_size": cfg.classification.image_size,
            "scene_image_size": cfg.scenes.image_size, "seconds": round(seconds, 2)}
    return ctx.result(outputs=dict(OUTPUTS), metrics={k: float(v) for k, v in counts.items()}, info=info)
