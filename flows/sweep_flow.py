"""The sweep's Prefect flow: one task per unique (stage, fingerprint) of the sweep (flows.sweep).

It is the recipe flow's machinery over a bigger graph: flows.pipeline's ``StageTask`` (Cached if
``result.json`` exists, else the stage in its own process, flows.worker) and ``run_graph`` (submit a node
once its upstream nodes are done). All members' stage processes share one set of ``max_concurrency``
slots. MLflow: the sweep run, a child run per member, stage runs under their member (or under the sweep run
when shared), every stage run tagged with the members that use it; each member's run gets its stages'
final metrics (``<stage>/<metric>``) so the MLflow UI compares members. A killed sweep resumes like a run:
run it again, complete stages are Cached.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from flows import interrupt
from flows.execute import incomplete_kinds
from flows.pipeline import StageTask, run_graph, with_prefect_server
from flows.prefect_env import hold_flow_run_lock
from flows.sweep import Member, Node, Sweep, SweepSpec, expand, save_record, threads_per_stage
from flows.worker import prewarm_workers, write_snapshot
from stages.recipe import RecipeError

log = logging.getLogger("baton")


class SweepTracking:
    """The sweep's MLflow runs: the sweep run and one child per member."""

    def __init__(self, artifacts: Path, sweep: Sweep, flow_run_id: str):
        from flows.tracking import Tracking

        self.tracking = Tracking(artifacts, sweep.base.name)
        client = self.client = self.tracking.client
        spec = sweep.spec
        self.name = spec.sweep
        self.sweep_run = self.tracking.start_parent(f"sweep:{spec.sweep}@{time.strftime('%Y%m%d-%H%M%S')}", {
            "baton.sweep": spec.sweep, "baton.kind": "sweep", "baton.recipe": spec.recipe,
            "baton.prefect_flow_run_id": flow_run_id, "baton.swept_stages": ",".join(sweep.swept),
            "baton.seeded_stages": ",".join(sweep.seeded)})
        client.log_dict(self.sweep_run, sweep.record(), "sweep.json")
        self.member_runs: dict[str, str] = {}
        for m in sweep.members:
            run = client.create_run(self.tracking.experiment_id, run_name=m.name, tags={
                "mlflow.parentRunId": self.sweep_run, "baton.sweep": spec.sweep, "baton.variant": m.variant,
                "baton.member": m.name, "baton.seed": "" if m.seed is None else str(m.seed),
                "baton.overrides": " ".join(m.overrides)[:5000],
                **{f"fingerprint.{n}": m.plans[n].fingerprint for n in m.wanted}})
            self.member_runs[m.name] = run.info.run_id

    def parent_of(self, node: Node) -> str:
        return self.member_runs[node.members[0]] if len(node.members) == 1 else self.sweep_run

    def stage_done(self, node: Node, result: dict[str, Any]) -> None:
        """Tag the stage's run with the members using it and link it from each member's run."""
        run_id = (result.get("info") or {}).get("mlflow_run_id")
        if run_id:
            self.client.set_tag(run_id, "baton.variants", ",".join(node.members)[:5000])
            self.client.set_tag(run_id, "baton.sweep", self.name)
        for m in node.members:
            self.client.set_tag(self.member_runs[m], f"stage.{node.stage}", run_id or "")

    def finish(self, sweep: Sweep, results: dict[tuple[str, str], Any], status: str) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for m in sweep.members:
            metrics = [Metric(f"{n}/{k}", float(v), ts, 0) for n in m.wanted
                       if isinstance(r := results.get((n, m.plans[n].fingerprint)), dict)
                       for k, v in (r.get("metrics") or {}).items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.member_runs[m.name], metrics=metrics[i:i + 1000])
            done = all((n, m.plans[n].fingerprint) in results for n in m.wanted)
            self.tracking.end_run(self.member_runs[m.name], "FINISHED" if done else status)
        self.tracking.end_run(self.sweep_run, status)


def _stage_tasks(sweep: Sweep, art: Path, tracking: SweepTracking | None, snapshots: dict[str, Path],
                 cluster: str | None = None):
    """One StageTask per (member, parent run), sharing one set of ``max_concurrency`` slots; on a Ray
    cluster one RayStageTask each (Ray places and limits them; threads: the CPUs each stage asks for)."""
    slots = threading.Semaphore(sweep.max_concurrency)
    threads = threads_per_stage(sweep.max_concurrency)
    made: dict[tuple[str, str], Any] = {}

    def for_node(node: Node) -> Any:
        m: Member = sweep.member(node.members[0])
        parent = tracking.parent_of(node) if tracking else ""
        key = (m.name, parent)
        if key not in made:
            if cluster:
                from flows.cluster import RayStageTask
                from flows.cluster import threads_per_stage as cpus_per_stage

                task = StageTask(art, m.plans, tracking.tracking if tracking else None, parent, snapshots[m.name],
                                 cpus_per_stage(m.recipe, set(m.recipe.stages)), len(m.recipe.stages))
                made[key] = RayStageTask(task, sweep.base.name)
            else:
                made[key] = StageTask(art, m.plans, tracking.tracking if tracking else None, parent,
                                      snapshots[m.name], dict.fromkeys(m.recipe.stages, threads),
                                      sweep.max_concurrency)
                made[key].slots = slots
        return made[key]

    return for_node


def _run_nodes(sweep: Sweep, art: Path, tracking: SweepTracking | None, snapshots: dict[str, Path],
               cluster: str | None = None):
    from prefect import task

    for_node = _stage_tasks(sweep, art, tracking, snapshots, cluster)
    if cluster:
        return _run_nodes_on_ray(sweep, tracking, for_node)

    def body(key: tuple[str, str]) -> Any:
        node = sweep.nodes[key]
        out = for_node(node)(node.stage)
        if tracking is not None:
            data = out if isinstance(out, dict) else getattr(out, "data", None)
            if isinstance(data, dict):
                tracking.stage_done(node, data)
        return out

    def submit(key: tuple[str, str], upstream: list) -> Any:
        node = sweep.nodes[key]
        t = task(body, name=f"stage-{sweep.member(node.members[0]).recipe.stages[node.stage].kind}",
                 task_run_name=node.task_name(), cache_policy=None, persist_result=False)
        return t.submit(key, wait_for=upstream)

    order = list(sweep.nodes)
    return run_graph(order, {k: sweep.nodes[k].needs for k in order}, submit)


def _run_nodes_on_ray(sweep: Sweep, tracking: SweepTracking | None, for_node):
    """Every unique stage as a Ray task asking for its ``runtime`` resources (flows.cluster), the stage's
    MLflow run made on its node; the driver tags the runs with the members that use them once they are done."""
    from prefect import task
    from prefect_ray.context import remote_options

    from flows.cluster import remote_options as stage_options

    def submit(key: tuple[str, str], upstream: list) -> Any:
        node = sweep.nodes[key]
        cfg = sweep.member(node.members[0]).recipe.stages[node.stage]
        t = task(for_node(node), name=f"stage-{cfg.kind}", task_run_name=node.task_name(), cache_policy=None,
                 persist_result=False)
        with remote_options(**stage_options(cfg)):
            return t.submit(node.stage, wait_for=upstream)

    order = list(sweep.nodes)
    results, failed = run_graph(order, {k: sweep.nodes[k].needs for k in order}, submit)
    for key, out in results.items() if tracking is not None else ():
        data = out if isinstance(out, dict) else getattr(out, "data", None)
        if isinstance(data, dict):
            tracking.stage_done(sweep.nodes[key], data)
    return results, failed


def build_sweep_flow():
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    @flow(name="baton-sweep", log_prints=False, validate_parameters=False,
          task_runner=ThreadPoolTaskRunner(max_workers=32))
    def baton_sweep(spec: dict, sweep_file: str | None, artifacts: str, track: bool = True,
                    report: bool = True, cluster: str | None = None) -> dict[str, Any]:
        """Run (or resume) every member of a sweep; a stage the members share runs once; ``cluster``: every
        stage a Ray task (the flow's task runner is then prefect-ray's, run_sweep)."""
        from prefect.runtime import flow_run
        from prefect.states import Cancelled

        sweep = expand(SweepSpec.model_validate(spec), Path(sweep_file) if sweep_file else None)
        art = Path(artifacts)
        flow_run_id = str(flow_run.id or "")
        alive = hold_flow_run_lock(art, flow_run_id)
        if not cluster:
            prewarm_workers(sweep_kinds(sweep, art))
        tracking = SweepTracking(art, sweep, flow_run_id) if track else None
        run_ids = {"mlflow_run_id": tracking.sweep_run, "member_runs": tracking.member_runs} if tracking else {}
        save_record(art, sweep, status="RUNNING", prefect_flow_run_id=flow_run_id, **run_ids)
        snapshots = {m.name: write_snapshot(art, m.recipe, m.plans) for m in sweep.members}
        status, results = "FAILED", {}
        try:
            results, failed = _run_nodes(sweep, art, tracking, snapshots, cluster)
            status = "KILLED" if interrupt.requested() else "FAILED" if failed else "FINISHED"
        except KeyboardInterrupt:
            status, failed = "KILLED", None
            raise
        finally:
            for s in snapshots.values():
                s.unlink(missing_ok=True)
            if tracking is not None:
                tracking.finish(sweep, results, status)
            save_record(art, sweep, status=status, prefect_flow_run_id=flow_run_id, **run_ids)
            alive.close()
        if status == "KILLED":
            return Cancelled(message=interrupt.summary())
        if failed:
            raise failed[1]
        out = {"sweep": sweep.spec.sweep, "nodes": len(sweep.nodes), "mlflow_run_id": run_ids.get("mlflow_run_id")}
        if report and sweep.spec.report is not None:
            from flows.report import make_report

            out["report"] = str(make_report(art, sweep.spec.sweep, flow_run_id=flow_run_id).index)
        return out

    return baton_sweep


def sweep_kinds(sweep: Sweep, art: Path) -> list[str]:
    return sorted({k for m in sweep.members for k in incomplete_kinds(m.recipe, art, m.plans)})


def check_cluster(sweep: Sweep, cluster: str | None) -> None:
    """What the sweep's configs alone tell about running it (on a cluster or not), before anything starts: a
    stage across several nodes is not run in a sweep; the rest as for a recipe (flows.cluster)."""
    from flows.cluster import refuse_before_connecting

    for m in sweep.members:
        for n in m.wanted:
            if m.recipe.stages[n].runtime.nnodes > 1:
                raise RecipeError(f"member {m.name!r}: stages.{n}.runtime.nnodes="
                                  f"{m.recipe.stages[n].runtime.nnodes}: a stage across several nodes is not run "
                                  "in a sweep; run it with `baton run ... --cluster ADDRESS` first (the sweep then "
                                  "finds it Cached)")
        refuse_before_connecting(m.recipe, set(m.wanted), cluster)


def run_sweep(sweep: Sweep, artifacts: Path, track: bool = True, server: str | None = None,
              report: bool = True, cluster: str | None = None) -> dict[str, Any]:
    """Run the sweep's flow (flows.pipeline.with_prefect_server finds or starts the Prefect server); with
    ``cluster``, every stage as a Ray task there (the nodes checked against every member's stages first)."""
    check_cluster(sweep, cluster)

    def prepare() -> None:
        if not cluster:
            return prewarm_workers(sweep_kinds(sweep, artifacts))
        from flows.cluster import cluster_nodes, connect, disconnect, refuse_unplaceable

        connect(cluster)
        try:
            nodes = cluster_nodes()
            for m in sweep.members:
                refuse_unplaceable(m.recipe, m.wanted, nodes)
        except BaseException:
            disconnect()
            raise

    def call() -> dict[str, Any]:
        if cluster:
            from prefect_ray import RayTaskRunner

            runner = RayTaskRunner(address=cluster)  # reuses prepare()'s connection
        else:
            from prefect.task_runners import ThreadPoolTaskRunner  # once PREFECT_API_URL is set

            runner = ThreadPoolTaskRunner(max_workers=len(sweep.nodes) + 1)
        flow = build_sweep_flow().with_options(task_runner=runner, flow_run_name=f"sweep-{sweep.spec.sweep}")
        return flow(sweep.spec.model_dump(mode="json"), str(sweep.path) if sweep.path else None,
                    str(Path(artifacts).resolve()), track, report, cluster)

    with interrupt.handling():
        try:
            return with_prefect_server(artifacts, server, prepare, track, call)
        except BaseException:
            if interrupt.requested():
                raise interrupt.Interrupted(interrupt.summary()) from None
            raise
        finally:
            if cluster:
                from flows.cluster import disconnect

                disconnect()
