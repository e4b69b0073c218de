"""The one-shot GPU check (tools/bench_gpu.py) in its CPU smoke mode: every item reports numbers, the JSON is
written as it goes, and it runs without prefect, mlflow or ray (the GPU machine has none of them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the bench as the GPU machine would run it: these cannot be imported
NO_ORCHESTRATION = ("import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('prefect', 'mlflow', 'ray')]; "
                    "sys.argv = ['bench_gpu', *sys.argv[1:]]; runpy.run_module('tools.bench_gpu', run_name='__main__')")


def _bench(tmp_path, *args, timeout=600):
    p = subprocess.run([sys.executable, "-c", NO_ORCHESTRATION, "--smoke", "--out", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p, (json.loads((tmp_path / "bench_gpu.json").read_text()) if (tmp_path / "bench_gpu.json").exists() else None)


def test_vendored_anchor_is_the_shared_one():
    shared = ROOT.parent / "shared" / "bench" / "gpu_anchor.py"
    if not shared.exists():
        pytest.skip(f"{shared} is not beside this checkout")
    assert (ROOT / "tools" / "gpu_anchor.py").read_bytes() == shared.read_bytes(), \
        "tools/gpu_anchor.py differs from ../shared/bench/gpu_anchor.py: copy it again"


def test_region_rows_and_ddp_items_without_orchestration_packages(tmp_path):
    p, out = _bench(tmp_path, "--only", "regions", "ddp")
    assert p.returncode == 0, p.stderr[-2000:]
    r = out["regions"]
    for c in ("classes_1", "classes_33"):
        assert all(r[c][k] > 0 for k in ("read_only", "serial", "overlapped")), r
    assert r["need_rows_per_s"] == 29400 and "skipped" in out["ddp"] and out["env"]["device"] == "cpu"


def test_unknown_group_is_refused_naming_it(tmp_path, capsys):
    from tools.bench_gpu import main

    assert main(["--smoke", "--out", str(tmp_path), "--only", "loops", "lops"]) == 2
    assert "lops" in capsys.readouterr().err and not (tmp_path / "bench_gpu.json").exists()


@pytest.mark.slow
def test_smoke_run_reports_every_item_with_numbers(tmp_path):
    p, out = _bench(tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    errors = {k: v["error"] for k, v in out.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    for kind in ("cnn", "detector", "bert", "vl"):
        assert out[f"anchor_{kind}"]["examples_per_s"] > 0
        assert out[f"loop_{kind}"]["examples_per_s"] > 0 and out[f"loop_{kind}"]["ratio"] > 0
        assert out[f"stage_{kind}"]["examples_per_s"] > 0 and out[f"stage_{kind}"]["ratio"] > 0
    assert out["loop_cnn"]["loss_last"] < out["loop_cnn"]["loss_first"], "the loop trains"
    assert out["compile_cnn"]["loop_speedup"] > 0 and out["compile_cnn"]["anchor_speedup"] > 0
    assert out["forkserver_stage"]["exit_status"] == 0 and out["forkserver_stage"]["completed"]
    assert out["kill_resume"]["resumed_from"] >= out["kill_resume"]["killed_after_checkpoint"] > 0
    assert out["world"]["seconds"] > 0 and out["regions"]["classes_1"]["overlapped"] > 0
