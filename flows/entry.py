"""The baton flow as a module-level object, for Prefect's own loaders:

    prefect flow-run retry FLOW_RUN_ID --entrypoint flows/entry.py:baton_pipeline

``baton retry FLOW_RUN_ID`` runs exactly that against baton's embedded Prefect server. The retried run
keeps its flow run id and its parameters (the recipe snapshot), so finished stages are Cached and the
failed one continues from its newest checkpoint.
"""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # Prefect loads this file by path
    sys.path.insert(0, _ROOT)

from flows.pipeline import build_flow  # noqa: E402

baton_pipeline = build_flow()
