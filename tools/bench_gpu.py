"""One-shot GPU check (issue 13 part 8): ``make bench-gpu`` (on a GPU machine), ``make bench-gpu BENCH_ARGS=--smoke``
(every item at tiny sizes on the CPU, for the tests).

    python -m tools.bench_gpu [--smoke] [--out DIR] [--only ITEM ...] [--workdir DIR]

Needs torch, torchvision, transformers and what tools/bench_gpu.sh installs from ``.whl/`` when missing
(pydantic and its dependencies, pycocotools); never prefect, mlflow or ray. Writes ``bench_gpu.json`` into
``--out`` (default ``$OUT`` or ``.``) after every item, so a run stopped at its time limit still reports
what it measured. Items, in order (each ``{"error": ...}`` instead when it failed; the rest still run):

  anchor_*          the raw anchors of tools/gpu_anchor.py (vendored verbatim from ../shared/bench), measured here,
                    in this process: ResNet-50 224 px, Faster R-CNN R50-FPN 800 px, BERT-base MLM len 128, VLP base
                    (BERT-base on inputs_embeds, len 123 = [CLS] + K=100 regions + [SEP] + 21 tokens), compiled ResNet-50
  loop_*            baton's loop (stages.train.loop.fit) on tensors already on the device, same model sizes:
                    ``ratio`` = examples/s over the anchor's (goal >= 0.9)
  world, stage_*    the synthetic world, then each training stage run whole (flows.execute.execute_stage, no
                    tracking) with its real loader on the world's files: ``ratio`` = its training examples/s
                    (steps x batch / train_seconds, warm-up and the final checkpoint included) over the anchor's
  regions           region rows/s read alone, serial with an anchor-rate step and overlapped (tools.bench_regions)
  forkserver_stage  a CUDA stage forked from baton's fork server (flows.worker), which never initialised CUDA
  kill_resume       ``python -m stages`` cnn on the device, SIGKILLed after its step-10 checkpoint, rerun: resumes
  ddp               NCCL DDP needs >= 2 GPUs: measured elsewhere, said here when there is one GPU
  compile_cnn       torch.compile speed-up for cnn: the anchor's and baton's loop with ``runtime.compile`` (last:
                    the longest item)
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT / "tools" / "gpu_anchor.py"
VL_TEXT = 21  # caption WordPieces (max_caption_len 20) + [SEP]: with [CLS], K=100 regions, [SEP] = 123 positions

# sizes: base (the issue's) and smoke (CPU, tiny)
SIZES = {
    "base": {"cnn": ("resnet50", 256, 224), "det": (8, 800), "bert": (256, 128), "vl": (256, 100),
             "bert_sizes": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_position=512),
             "vocab": 30522, "feature_dim": 2048, "prob_dim": 1601, "steps": 25, "log_every": 5},
    "smoke": {"cnn": ("resnet18", 8, 32), "det": (1, 64), "bert": (8, 16), "vl": (8, 6),
              "bert_sizes": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, max_position=64),
              "vocab": 30522, "feature_dim": 16, "prob_dim": 5, "steps": 4, "log_every": 2},
}


class Report:
    """The JSON: one key per item, written after each one."""

    def __init__(self, path: Path, smoke: bool):
        self.path, self.data = path, {"smoke": smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.t0 = time.perf_counter()

    def item(self, name: str, fn, *args) -> dict | None:
        t = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            out = fn(*args)
        except Exception as e:  # keep going: one failure must not hide the rest
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        out["wall_s"] = round(time.perf_counter() - t, 1)
        self.data[name] = out
        self.data["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.write()
        print(f"[bench] {name}: {json.dumps(out)}", flush=True)
        return out

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def value(self, name: str, key: str = "examples_per_s") -> float | None:
        v = self.data.get(name, {}).get(key)
        return v if isinstance(v, (int, float)) else None


# ---------------------------------------------------------------------------------------------- anchors


def load_anchor(device: str, smoke: bool) -> dict:
    """The anchor's functions (tools/gpu_anchor.py is a script: only its imports and defs are executed here, so
    nothing runs at import) with ``dev`` set; on the CPU its CUDA-synchronising ``timeit`` is replaced by a
    plain one of 1 warm-up and 2 timed steps."""
    tree = ast.parse(ANCHOR.read_text())
    tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    ns: dict = {"__name__": "gpu_anchor"}
    exec(compile(tree, str(ANCHOR), "exec"), ns)
    ns["dev"] = device
    if device == "cpu":
        def timeit(step, warm=5, iters=20):
            step()
            t = time.perf_counter()
            for _ in range(2):
                step()
            return (time.perf_counter() - t) / 2
        ns["timeit"] = timeit
    return ns


def smoke_detection_patch() -> None:
    """--smoke: torchvision's fasterrcnn_resnet50_fpn (which the anchor builds) at 64 px with few proposals,
    so one CPU step takes a fraction of a second. Only in the smoke process."""
    import functools

    import torchvision.models.detection as det

    det.fasterrcnn_resnet50_fpn = functools.partial(
        det.fasterrcnn_resnet50_fpn, min_size=64, max_size=64, rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=50, rpn_batch_size_per_image=32, box_batch_size_per_image=32)


def smoke_compile_patch() -> None:
    """--smoke: torch.compile with the ``aot_eager`` backend (Dynamo's capture and AOT autograd, no code
    generation): inductor's C++ build costs 20-80 s per model on a CPU. The compile path of the anchor and of
    ``runtime.compile`` is still exercised; the speed-up is only meaningful on a GPU."""
    import functools

    torch.compile = functools.partial(torch.compile, backend="aot_eager")


def anchor_items(rep: Report, ns: dict, sz: dict) -> None:
    arch, bs, res = sz["cnn"]
    b = sz["bert_sizes"]
    bert_args = dict(layers=b["num_layers"], hidden=b["hidden_size"], heads=b["num_heads"])
    rep.item("anchor_cnn", lambda: {"examples_per_s": round(ns["cnn"](arch, bs, res), 1), "arch": arch, "batch": bs,
                                    "res": res})
    rep.item("anchor_detector", lambda: {"examples_per_s": round(ns["frcnn"](*sz["det"]), 1), "batch": sz["det"][0],
                                         "size": sz["det"][1]})
    rep.item("anchor_bert", lambda: {"examples_per_s": round(ns["bert"](*sz["bert"], **bert_args), 1),
                                     "batch": sz["bert"][0], "seq": sz["bert"][1]})
    vbs, k = sz["vl"]
    rep.item("anchor_vl", lambda: {"examples_per_s": round(ns["bert"](vbs, k + 2 + VL_TEXT, inputs_embeds=True,
                                                                       **bert_args), 1),
                                   "batch": vbs, "seq": k + 2 + VL_TEXT})


# ---------------------------------------------------------------------------------------------- baton's loop


def _ratio(out: dict, rep: Report, anchor: str) -> dict:
    a, v = rep.value(anchor), out.get("examples_per_s")
    if a and v:
        out["ratio"] = round(v / a, 3)
    return out


def loop_items(rep: Report, device: str, sz: dict, precision: str, smoke: bool) -> None:
    from stages.config.bert import BertSizes
    from tools import bench_loop as bl

    sizes = BertSizes(**sz["bert_sizes"])
    steps, every = sz["steps"], sz["log_every"]
    jobs = {"cnn": lambda: bl.cnn_job(device, *sz["cnn"]),
            "detector": lambda: bl.detector_job(device, *sz["det"], base=not smoke),
            "bert": lambda: bl.bert_job(device, *sz["bert"], sizes, sz["vocab"]),
            "vl": lambda: bl.vl_job(device, *sz["vl"], VL_TEXT, sizes, sz["vocab"], sz["feature_dim"], sz["prob_dim"])}
    for kind, job in jobs.items():
        rep.item(f"loop_{kind}", lambda j=job, k=kind: _ratio(
            bl.run_loop(j(), device, steps if k != "detector" else max(steps // 2, 4), every, precision),
            rep, f"anchor_{k}"))
        if device == "cuda":
            torch.cuda.empty_cache()


def compile_item(rep: Report, ns: dict, device: str, sz: dict, precision: str) -> dict:
    """cnn with torch.compile: the anchor's compiled job over its eager one, and baton's loop with
    ``runtime.compile: true`` over baton's eager loop (warm-up = the first log window, compile included)."""
    from tools import bench_loop as bl

    arch, bs, res = sz["cnn"]
    anchor = ns["cnn"](arch, bs, res, compile_=True)
    loop = bl.run_loop(bl.cnn_job(device, arch, bs, res), device, sz["steps"], sz["log_every"], precision,
                       compile_=True)
    out = {"anchor_compiled_examples_per_s": round(anchor, 1), "loop_compiled_examples_per_s": loop["examples_per_s"],
           "loop_compile_first_window_s": loop["first_window_s"]}
    if rep.value("anchor_cnn"):
        out["anchor_speedup"] = round(anchor / rep.value("anchor_cnn"), 3)
    if rep.value("loop_cnn"):
        out["loop_speedup"] = round(loop["examples_per_s"] / rep.value("loop_cnn"), 3)
        out["loop_compiled_ratio_to_anchor_compiled"] = round(loop["examples_per_s"] / anchor, 3)
    return out


def regions_item(rep: Report, workdir: Path, smoke: bool) -> dict:
    from tools.bench_regions import measure

    seq_per_s = rep.value("anchor_vl") if not smoke else None
    if smoke:
        return measure(workdir, images=40, classes=(1, 33), k=10, dim=64, batch=8, seq_per_s=2940.0, steps=6)
    return measure(workdir, images=600, classes=(1, 1601), batch=256, seq_per_s=seq_per_s or 2940.0, steps=24) | {
        "seq_per_s_from": "anchor_vl" if seq_per_s else "issue (2,940)"}


def ddp_item() -> dict:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return {"skipped": f"{n} GPU(s) here: NCCL DDP needs at least 2, so this check cannot show it (the gloo "
                           "2-rank equality tests run on the CPU in the test suite)"}
    return {"skipped": f"{n} GPUs: a multi-GPU DDP throughput item is not written yet"}


# ---------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 2 min): for the tests")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for bench_gpu.json")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--only", nargs="+", default=None,
                   help="groups to run: anchors loops stages regions compile forkserver kill_resume ddp")
    return p


GROUPS = ("anchors", "loops", "stages", "regions", "compile", "forkserver", "kill_resume", "ddp")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = set(args.only or GROUPS)
    bad = only - set(GROUPS)
    if bad:
        print(f"error: --only {sorted(bad)}: expected some of {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    sz, precision = SIZES["smoke" if args.smoke else "base"], "fp32" if args.smoke else "bf16"
    if args.smoke:
        torch.set_num_threads(1)
        smoke_detection_patch()
        smoke_compile_patch()
    # the anchor script's own backend settings, for every measurement in this process (anchor and baton alike)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rep = Report(args.out / "bench_gpu.json", args.smoke)
    rep.data["env"] = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
                       "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                       "cpus": os.cpu_count(), "precision": precision}
    rep.write()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.workdir) as d:
        run_groups(rep, only, device, sz, precision, args.smoke, Path(d))
    print(json.dumps(rep.data, indent=1))
    return 0


def run_groups(rep: Report, only: set[str], device: str, sz: dict, precision: str, smoke: bool, work: Path) -> None:
    ns = load_anchor(device, smoke) if only & {"anchors", "loops", "stages", "compile"} else {}
    if ns:
        anchor_items(rep, ns, sz)
    if "loops" in only:
        loop_items(rep, device, sz, precision, smoke)
    if only & {"stages", "forkserver", "kill_resume"}:
        from tools import bench_stages as bs

        recipe = bs.bench_recipe(smoke, work / "artifacts")
        rep.item("world", bs.world_item, recipe)
        if "stages" in only:
            for kind in ("cnn", "detector", "bert", "vl"):
                rep.item(f"stage_{kind}", lambda k=kind: _ratio(bs.stage_item(recipe, k), rep, f"anchor_{k}"))
    if "regions" in only:
        rep.item("regions", regions_item, rep, work, smoke)
    if "forkserver" in only:
        rep.item("forkserver_stage", bs.forkserver_item, recipe, smoke)
    if "kill_resume" in only:
        rep.item("kill_resume", bs.kill_resume_item, recipe, smoke, work)
    if "ddp" in only:
        rep.item("ddp", ddp_item)
    if "compile" in only:  # last: two compilations of ResNet-50 are the longest item
        rep.item("compile_cnn", compile_item, rep, ns, device, sz, precision)


if __name__ == "__main__":
    sys.exit(main())
