"""`baton status` stays light: with a stage partial at a checkpoint it imports neither torch nor Prefect nor
MLflow (each costs seconds; dvc status answers in ~1 s)."""
import json
import subprocess
import sys

from tests.conftest import ROOT

CODE = """
import json, sys
from flows.cli import main
from flows.execute import stage_dirs
from stages.recipe import load_recipe

art = sys.argv[1]
cnn = stage_dirs(load_recipe("configs/vlp-micro.yaml"), art)["cnn"]
(cnn.path / "checkpoints" / "00000010").mkdir(parents=True)
rc = main(["status", "configs/vlp-micro.yaml", "--artifacts", art])
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "prefect", "mlflow") if m in sys.modules)}))
"""


def test_status_of_a_partial_stage_imports_no_torch_prefect_or_mlflow(tmp_path):
    p = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "art")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=True)
    assert "partial at step 10" in p.stdout
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}
