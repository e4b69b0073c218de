"""Stages on a Ray cluster, through Prefect's own integration (``baton run CONFIG --cluster ADDRESS``).

The flow's task runner becomes ``prefect_ray.RayTaskRunner``: each stage's Prefect task is a Ray task that
asks for the stage's ``runtime`` resources (``cpus``, ``gpus``, ``memory_gb``, custom ``resources``), so Ray
places it on a node that has them, and independent stages run on different nodes at once. On that node the
task finds the stage Cached (``result.json`` in the shared store) or spawns the stage process there (a fresh
``python -m flows.worker``: the fork server lives on the driver). What this module owns:

- :func:`refuse_config`: what the recipe alone tells is impossible on a cluster (``device: cuda:N``), and
  :func:`refuse_nnodes` ``nnodes > 1`` without a cluster, refused before anything connects;
- :func:`connect`: ``ray.init`` with the driver's code shipped to every node (``runtime_env.py_modules``:
  baton's ``flows`` and ``stages`` packages, so the code that runs is the code that was fingerprinted) and
  the environment a stage needs (Prefect and MLflow servers, ``BATON_*``);
- :func:`refuse_unplaceable`: a stage whose resources no node has, refused at submission naming the stage,
  the resource and what the cluster offers (never a Ray task left pending forever);
- :class:`RayStageTask`: the stage task's body on the node, which first recomputes the stage kind's code
  digest there and refuses, naming node, module and both digests, when it differs from the driver's;
- :func:`run_stage_across_nodes`: a stage with ``runtime.nnodes > 1``, one stage process per node.

Addresses: ``ray://host:10001`` (Ray Client), ``host:6379`` or ``auto`` (join as a driver on a cluster
node), ``local`` (a Ray instance of this machine, started for the run).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.fingerprint import StagePlan, code_digest
from stages.contract import StageConfig, StageError
from stages.recipe import Recipe, RecipeError

log = logging.getLogger("baton")
GIB = 2 ** 30
# the environment a stage process needs on a node: where the Prefect and MLflow servers are, baton's settings
SHIPPED_ENV = re.compile(r"^(PREFECT_|MLFLOW_|BATON_|OMP_NUM_THREADS$|PYTHONUNBUFFERED$)")
SHIP_CODE_ENV = "BATON_CLUSTER_SHIP_CODE"  # "0": nodes import their own installed baton (then checked by digest)
# the config key behind each Ray resource, for the refusal's message
RESOURCE_KEYS = {"CPU": "runtime.cpus", "GPU": "runtime.gpus", "memory": "runtime.memory_gb"}


def check_address(address: str) -> str:
    """The ``--cluster`` value if it is one Ray understands, else a RecipeError."""
    if address in ("auto", "local") or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", address):
        return address
    raise RecipeError(f"--cluster {address!r}: expected ray://HOST:PORT (Ray Client), HOST:PORT (the cluster's GCS), "
                      "auto (the cluster this machine is a node of) or local (a Ray instance on this machine)")


def refuse_config(recipe: Recipe, wanted: set[str]) -> None:
    """Refuse, naming the config key, what cannot run on a cluster whatever it offers."""
    for name in (n for n in recipe.stages if n in wanted):
        rt = recipe.stages[name].runtime
        if re.fullmatch(r"cuda:\d+", rt.device):
            raise RecipeError(f"stages.{name}.runtime.device={rt.device!r}: under --cluster Ray assigns the devices "
                              f"(CUDA_VISIBLE_DEVICES of the node's task); use device: cuda or auto and ask for "
                              f"stages.{name}.runtime.gpus")


def refuse_nnodes(recipe: Recipe, wanted: set[str], cluster: str | None, force: set[str]) -> None:
    """``runtime.nnodes > 1`` needs ``--cluster`` (the nodes are Ray's), and is not forced (``--force``: the
    other nodes could not know the temp directory node 0 reruns it into)."""
    from flows.plan import downstream_of

    forced = downstream_of(recipe, sorted(force)) & wanted if force else set()
    for name in (n for n in recipe.stages if n in wanted):
        nnodes = recipe.stages[name].runtime.nnodes
        if nnodes > 1 and not cluster:
            raise RecipeError(f"stages.{name}.runtime.nnodes={nnodes}: a stage across several nodes runs only on a "
                              "Ray cluster (baton run ... --cluster ADDRESS; --cluster local for this machine's); "
                              "on one machine use runtime.nproc_per_node and nnodes: 1")
        if nnodes > 1 and name in forced:
            raise RecipeError(f"stages.{name}.runtime.nnodes={nnodes}: --force of a stage across several nodes is "
                              f"not supported; remove its stage directory (baton gc / rm) to rerun it")


def refuse_before_connecting(recipe: Recipe, wanted: set[str], cluster: str | None,
                             force: set[str] = frozenset()) -> None:
    """Everything the recipe and the address alone tell (:func:`refuse_nnodes`, :func:`check_address`,
    :func:`refuse_config`): what `baton run`, `baton submit`, a deployment run check before anything starts."""
    refuse_nnodes(recipe, wanted, cluster, force)
    if cluster:
        check_address(cluster)
        refuse_config(recipe, wanted)


def threads_per_stage(recipe: Recipe, wanted: set[str]) -> dict[str, int]:
    """torch threads of each stage process on its node: runtime.threads, else the CPUs it asked Ray for."""
    return {n: recipe.stages[n].runtime.threads or max(1, int(recipe.stages[n].runtime.cpus)) for n in wanted}


def demand(cfg: StageConfig) -> dict[str, float]:
    """The Ray resources one stage asks a node for (zero amounts left out)."""
    rt = cfg.runtime
    need = {"CPU": rt.cpus, "GPU": rt.gpus, "memory": rt.memory_gb * GIB, **rt.resources}
    return {k: float(v) for k, v in need.items() if v}


def remote_options(cfg: StageConfig) -> dict[str, Any]:
    """``ray.remote`` options of the stage's task: its resources. Ray does not re-execute the task
    (max_retries=0): retries are Prefect's (``recipe.retries``), so one task run never becomes two executions.
    (No per-task runtime_env: every stage task can reuse the job's workers.) A stage across several nodes
    asks for nothing: its task only coordinates, the nodes' resources are its placement group's bundles."""
    rt = cfg.runtime
    if rt.nnodes > 1:
        return {"num_cpus": 0, "max_retries": 0}
    opts: dict[str, Any] = {"num_cpus": rt.cpus, "num_gpus": rt.gpus, "max_retries": 0}
    if rt.memory_gb:
        opts["memory"] = int(rt.memory_gb * GIB)
    if rt.resources:
        opts["resources"] = dict(rt.resources)
    return opts


def _fmt(resources: dict[str, float]) -> str:
    def one(k: str, v: float) -> str:
        return f"memory {v / GIB:.1f} GiB" if k == "memory" else f"{k} {v:g}"
    return ", ".join(one(k, v) for k, v in sorted(resources.items())
                     if not k.startswith("node:") and k != "object_store_memory" and not k.startswith("accelerator_"))


def refuse_unplaceable(recipe: Recipe, wanted: set[str], nodes: list[dict]) -> None:
    """A RecipeError for the first wanted stage that no alive node can hold: its name, the resource (and the
    config key behind it) and what each node offers."""
    alive = [n for n in nodes if n.get("Alive")]
    offers = "; ".join(f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')}): {_fmt(n['Resources'])}"
                       for n in alive) or "no alive node"
    for name in (n for n in recipe.stages if n in wanted):
        need, nnodes = demand(recipe.stages[name]), recipe.stages[name].runtime.nnodes
        fits = sum(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items()) for n in alive)
        if fits >= nnodes:
            continue
        if fits:
            raise RecipeError(f"stage {name!r} asks for {nnodes} nodes (runtime.nnodes) with {_fmt(need)} each: "
                              f"{fits} node(s) of the Ray cluster have it. The cluster offers: {offers}")
        short = [k for k, v in need.items() if max((n["Resources"].get(k, 0.0) for n in alive), default=0.0) < v]
        what = ", ".join(f"{_fmt({k: need[k]})} ({RESOURCE_KEYS.get(k, f'runtime.resources.{k}')})" for k in short) \
            if short else f"{_fmt(need)} on one node (each resource exists, but on different nodes)"
        raise RecipeError(f"stage {name!r} asks for {what}: no node of the Ray cluster has it. "
                          f"The cluster offers: {offers}")


def runtime_env(ship_code: bool | None = None) -> dict[str, Any]:
    """The job's Ray runtime_env: baton's packages as py_modules (they go first on every worker's PYTHONPATH,
    and the stage processes inherit it); each stage task brings its environment (:class:`RayStageTask`)."""
    import flows
    import stages

    if ship_code is None:
        ship_code = os.environ.get(SHIP_CODE_ENV, "1") != "0"
    out: dict[str, Any] = {"env_vars": {"BATON_WORKER_START": "spawn"}}
    if ship_code:
        out["py_modules"] = [str(Path(m.__file__).parent) for m in (flows, stages)]
        out["excludes"] = ["__pycache__", "*.pyc"]
    return out


def connect_checked(address: str, recipe: Recipe, wanted: set[str]) -> None:
    """Connect to the cluster and refuse (disconnected again) a stage that no node can hold."""
    connect(address)
    try:
        refuse_unplaceable(recipe, wanted, cluster_nodes())
    except BaseException:
        disconnect()
        raise


@contextmanager
def on_cluster(address: str | None, recipe: Recipe, wanted: set[str]):
    """Inside a flow run: make prefect-ray's runner this flow run's task runner while the block runs, when the
    flow run did not start with it. That is a deployment run (``baton submit --cluster``, the UI's Run form,
    a Retry): ``prefect serve`` starts the flow with the flow's own thread-pool runner, and this process (on the
    serving machine) becomes the Ray driver here. Refuses, as ``baton run --cluster`` does, a stage no node can
    hold (the flow body refused what the recipe alone tells first), then disconnects at the end.
    A no-op without ``address`` or when the flow run already runs on Ray (``baton run --cluster``)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if not address or ctx is None or type(ctx.task_runner).__name__ == "RayTaskRunner":
        yield
        return
    connect_checked(address, recipe, wanted)  # the flow checked the recipe and address already
    from prefect_ray import RayTaskRunner

    log.info("stages on the Ray cluster %s (deployment run)", address)
    try:
        with RayTaskRunner(address=address) as runner, ctx.model_copy(update={"task_runner": runner}):
            yield
    finally:
        disconnect()


def connect(address: str) -> None:
    """``ray.init`` for this run (a no-op if this process is already connected), with :func:`runtime_env`."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(), "namespace": "baton", "log_to_driver": True}
    if address == "local":
        kwargs |= {"include_dashboard": False, "object_store_memory": 256 * 2 ** 20}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StageError(f"--cluster {address}: could not connect to Ray: {e}") from None


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_nodes() -> list[dict]:
    import ray

    return ray.nodes()


def node_info() -> dict[str, Any]:
    """The node this Ray task runs on: id, address, and its (custom) resources."""
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    me = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    res = {k: v for k, v in me.get("Resources", {}).items() if not k.startswith("node:")}
    return {"id": node_id, "address": me.get("NodeManagerAddress"), "resources": res}


def verify_code(stage: str, plan: StagePlan, node: dict[str, Any]) -> None:
    """Refuse to run a stage on a node whose copy of the stage's code differs from what the driver
    fingerprinted: names the node, the module and both digests."""
    here = code_digest(plan.kind)
    there = plan.payload.get("code", {})
    for module in sorted(set(here) | set(there)):
        if here.get(module) != there.get(module):
            raise StageError(
                f"stage {stage!r}: the code on Ray node {node['id'][:12]} ({node['address']}) is not the code "
                f"that was fingerprinted: module {module} has digest {str(here.get(module))[:16]} there, "
                f"{str(there.get(module))[:16]} on the driver (ship the code: unset {SHIP_CODE_ENV}, or install "
                "the same baton on every node)")


class RayStageTask:
    """The stage task's body on a Ray node: flows.pipeline's StageTask, made picklable (no tracking client, no
    semaphore: Ray places and limits the tasks); the MLflow client is made on the node from the same settings
    as the driver's: its environment travels with the task (where the Prefect and MLflow servers are,
    ``BATON_*``: known only once the Prefect server answered, after the job's runtime_env was set) and the
    stage process inherits it. No ``__dict__``: Prefect's task copies its function's ``__dict__`` onto
    itself, and the StageTask in it must not travel unstripped."""

    __slots__ = ("task", "experiment", "env")

    def __init__(self, task, experiment: str):
        self.task, self.experiment = task, experiment
        self.env = {k: v for k, v in os.environ.items() if SHIPPED_ENV.match(k)} | {"BATON_WORKER_START": "spawn"}

    def __getstate__(self) -> dict[str, Any]:
        task = copy.copy(self.task)
        task.tracking, task.slots = None, None
        return {"task": task, "experiment": self.experiment, "env": self.env}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.task, self.experiment, self.env = state["task"], state["experiment"], state["env"]

    def __call__(self, stage: str) -> Any:
        os.environ.update(self.env)  # this worker runs stage tasks of this job only (namespace, runtime_env)
        _log_to_stderr()
        node = node_info()
        log.info("[%s] on Ray node %s (%s)", stage, node["id"][:12], node["address"])
        task = self.task
        verify_code(stage, task.plans[stage], node)
        if task.tracking is None and task.parent_id:
            from flows.tracking import Tracking

            task.tracking = Tracking(task.art, self.experiment)
        if task.slots is None:
            task.slots = threading.Semaphore(1)
        out = task(stage)
        data = getattr(out, "data", out)  # a Cached state carries the result as its data
        if isinstance(data, dict):
            data.setdefault("info", {})["ray_node"] = node
        return out


def _log_to_stderr() -> None:
    """baton's log lines (the stage process's, forwarded) on the Ray worker's stderr, which Ray sends to the
    driver's terminal prefixed with the task and pid (Prefect's handlers, if any, send them to its API)."""
    log.setLevel(logging.INFO)
    if not log.hasHandlers():  # Prefect's console handler (root's, once Prefect set up logging in this worker)
        # already prints them. (Two Ray nodes on one machine share one session log dir, so both nodes' log
        # monitors send each worker line to the driver: twice, on tools.raycluster's clusters only.)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


def multi_node_launchers(recipe: Recipe, wanted: set[str]) -> dict[str, Any]:
    """{stage: its launch (StageTask.launchers)} for the wanted stages with ``runtime.nnodes > 1``."""
    import functools

    out = {}
    for name in sorted(wanted):
        cfg = recipe.stages[name]
        if cfg.runtime.nnodes > 1:
            out[name] = functools.partial(run_stage_across_nodes, nnodes=cfg.runtime.nnodes,
                                          bundle=demand(cfg) or {"CPU": 1.0})
    return out


def _ready_group(nnodes: int, bundle: dict[str, float], timeout: float):
    """A STRICT_SPREAD placement group of ``nnodes`` bundles (``nnodes`` distinct nodes), ready, or a StageError."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([bundle] * nnodes, strategy="STRICT_SPREAD")
    if not ray.wait([pg.ready()], timeout=timeout)[0]:
        remove_placement_group(pg)
        raise StageError(f"no {nnodes} distinct Ray nodes with {_fmt(bundle)} each within {timeout:.0f}s")
    return pg


def _on(pg, i: int, bundle: dict[str, float]) -> dict[str, Any]:
    """``ray.remote`` options of a task that uses bundle ``i`` of placement group ``pg`` (all of it)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    opts: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), "resources": custom,
                            "max_retries": 0,
                            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
    if bundle.get("memory"):
        opts["memory"] = int(bundle["memory"])
    return opts


def run_stage_across_nodes(stage: str, snapshot: Path, art: Path, parent_id: str, threads: int, *, nnodes: int,
                           bundle: dict[str, float], timeout: float = 600.0) -> bool:
    """The launch of a stage with ``runtime.nnodes`` > 1 (in place of flows.worker.run_stage_process, called by
    the stage's Ray task, which asked for no resources): ``nnodes`` Ray tasks in a STRICT_SPREAD placement group
    of the stage's per-node resources, each starting the stage process on its node (``python -m flows.worker
    STAGE ... --node-rank I``), which runs that node's ``nproc_per_node`` ranks through torch's elastic agent
    (stages.train.launch.run_ranks, as on one node) meeting the others at a c10d rendezvous on node 0's host.
    Node 0's process holds the stage's lock and MLflow run and writes result.json. When a node fails, the others
    get a grace period to fail on their own (a peer's death breaks gloo's connections), then are cancelled.
    Returns whether node 0 found the stage complete already."""
    import uuid

    import ray
    from ray.util.placement_group import remove_placement_group

    from flows.worker import node_args

    pg = _ready_group(nnodes, bundle, timeout)
    try:
        host, port = ray.get(ray.remote(_rendezvous_endpoint).options(**_on(pg, 0, bundle)).remote())
        rdzv = f"baton-{stage}-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if SHIPPED_ENV.match(k)}
        node = ray.remote(_stage_on_node)
        log.info("[%s] across %d Ray nodes (%s each), rendezvous at %s:%d", stage, nnodes, _fmt(bundle), host, port)
        refs = [node.options(**_on(pg, i, bundle)).remote(stage, str(snapshot), str(art), parent_id, threads,
                                                          node_args(nnodes, i, f"{host}:{port}", rdzv), env)
                for i in range(nnodes)]
        return _gather_nodes(refs)
    finally:
        remove_placement_group(pg)


def _gather_nodes(refs: list, grace_s: float = 60.0) -> bool:
    """Wait for the nodes' tasks; the first error is raised once the others ended or ``grace_s`` passed (then
    they are cancelled: their stage processes and ranks die with their Ray workers). Node 0 finding the stage
    complete ends the others at once (they would wait for it at the rendezvous)."""
    import ray

    pending, error, out = list(refs), None, {}
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=grace_s if error else None)
            if not done:
                break
            try:
                out[refs.index(done[0])] = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - the first node's error is the stage's
                error = error or e
            if out.get(0, {}).get("cached"):
                return True
        if error is not None:
            raise error
        return bool(out[0]["cached"])
    finally:
        for r in pending:
            ray.cancel(r, force=True)


def _stage_on_node(stage: str, snapshot: str, art: str, parent_id: str, threads: int, extra: list[str],
                   env: dict[str, str]) -> dict[str, Any]:
    """One node's stage process (flows.worker with ``extra`` = its node arguments), in a Ray task there."""
    from flows.worker import run_stage_process

    os.environ.update(env)
    _log_to_stderr()
    node = node_info()
    log.info("[%s] node %s of the stage on Ray node %s (%s)", stage, extra[3], node["id"][:12], node["address"])
    import json

    verify_code(stage, StagePlan.from_json(json.loads(Path(snapshot).read_text())["plans"][stage]), node)
    import ray

    # the torch agents' address for each other: Ray's own address of this node (reachable from the others)
    extra = [*extra, "--node-addr", ray.util.get_node_ip_address()]
    cached = run_stage_process(stage, Path(snapshot), Path(art), parent_id, threads, extra)
    return {"node": node, "cached": cached}


def launch_across_nodes(script_argv: list[str], nnodes: int, nproc_per_node: int = 1, cpus: float = 1,
                        resources: dict[str, float] | None = None, max_restarts: int = 0, env: dict[str, str] | None = None,
                        timeout: float = 300.0) -> list[dict[str, Any]]:
    """Run ``python -m torch.distributed.run --nnodes N --nproc-per-node R --rdzv-backend c10d ... SCRIPT_ARGV``
    as N Ray tasks in a STRICT_SPREAD placement group (N distinct nodes, each bundle ``cpus`` + ``resources``),
    meeting at a c10d rendezvous hosted on the first bundle's node. Returns, per node, its Ray node id and the
    exit status. (A script's launch; a stage's is :func:`run_stage_across_nodes`.)"""
    import uuid

    import ray
    from ray.util.placement_group import remove_placement_group

    bundle = {"CPU": float(cpus), **(resources or {})}
    pg = _ready_group(nnodes, bundle, timeout)
    try:
        host, port = ray.get(ray.remote(_rendezvous_endpoint).options(**_on(pg, 0, bundle)).remote())
        argv = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={host}:{port}", f"--rdzv-id={uuid.uuid4().hex}", f"--max-restarts={max_restarts}"]
        run = ray.remote(_torchrun)  # the first node's agent hosts the rendezvous store (is_host), not a guess
        return ray.get([run.options(**_on(pg, i, bundle)).remote([*argv, f"--rdzv-conf=is_host={int(i == 0)}",
                                                                  *script_argv], env or {}) for i in range(nnodes)])
    finally:
        remove_placement_group(pg)


def _rendezvous_endpoint() -> tuple[str, int]:
    """(this node's address, a free port on it): where the c10d rendezvous store will listen."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _torchrun(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One node's ``torch.distributed.run`` (an elastic agent and its ranks), in a Ray task."""
    import subprocess

    import ray

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], env=os.environ | env)
    return {"node": ray.get_runtime_context().get_node_id(), "returncode": p.returncode}
