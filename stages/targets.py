"""Stage kind ``targets``: the four classification target sets of the 2x2 advisor (``baton advise``).

    stages:
      targets: {kind: targets, small_per_class: 10, large_per_class: 300}
      ft:      {kind: cnn, needs: [cnn, targets], init_from: cnn, data: targets, data_output: similar_small}

Writes ``outputs/{similar,different}_{small,large}/`` in ImageNet layout (:mod:`stages.data.targets`):
similar = the world's rendering with new labels (shape x size), different = textures; small / large =
``small_per_class`` / ``large_per_class`` train images per class, the same ``val_per_class`` val set in both.
Off the default recipes (configs/transfer-2x2.yaml uses it), so ``make run`` does not pay for it."""
from __future__ import annotations

import time
from pathlib import Path

from stages.config.targets import OUTPUTS, Config
from stages.contract import StageContext, StageResult, log
from stages.data.targets import write_targets
from stages.fsio import publish_outputs


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config  # type: ignore[assignment]
    t0 = time.perf_counter()
    counts = publish_outputs(Path(ctx.stage_dir), lambda tmp: write_targets(tmp, cfg, ctx.seed))
    log.info("targets: wrote %s in %.1fs", counts, time.perf_counter() - t0)
    ctx.tracker.log_params(counts)
    return ctx.result(outputs=dict(OUTPUTS), metrics={k: float(v) for k, v in counts.items()},
                      info={"seconds": round(time.perf_counter() - t0, 2)})
