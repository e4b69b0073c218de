#!/usr/bin/env bash
# make bench-gpu: the one-shot GPU check (tools/bench_gpu.py) on a machine that has torch, torchvision and
# transformers. What baton's stages need beyond them (pydantic + its dependencies, pycocotools) is installed
# from the wheels in .whl/ (make gpu-wheels) into a target folder on PYTHONPATH, only where it is missing.
#   bash tools/bench_gpu.sh [--smoke] [--out DIR] [--only GROUP ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${BATON_BENCH_SITE:-/tmp/baton-bench-site}
if ! "$PY" -c "import pydantic, pycocotools, yaml, safetensors" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: pydantic/pycocotools/pyyaml/safetensors missing and no wheels in .whl/ (run make gpu-wheels)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m tools.bench_gpu "$@"
