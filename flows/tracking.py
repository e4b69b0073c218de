"""MLflow tracking and lineage (DESIGN.md "Tracking and lineage").

One experiment per recipe, one parent run per invocation, one nested run per stage execution
(a resumed stage continues its run). Each stage's ``outputs/model`` becomes an MLflow LoggedModel
(safetensors state dict + config.json, fingerprint as tag); a downstream run records its upstream
LoggedModels as model inputs and its data as dataset inputs. All calls go through one
``MlflowClient`` (thread-safe; no fluent "active run" global, since stages run concurrently).
Metric writes are buffered and sent with ``log_batch`` from the training thread at most every few
seconds and at every checkpoint, so tracking never dominates a step.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("baton")
# The experiment tag MLflow's UI reads to pick its layout: without it, 3.x opens in GenAI mode (models as
# "Agent versions"); this value is its model-training layout (mlflow/server/js: ExperimentKind). MLflow 3.17's
# UI (workflow-based navigation, always on) takes the layout from the URL's ``workflowType`` instead, else the
# browser's stored choice (default GenAI): every link baton prints or writes carries ML_LAYOUT.
EXPERIMENT_KIND = "custom_model_development"
ML_LAYOUT = "?workflowType=machine_learning"
_UNIQUE_VIOLATION = ("UNIQUE constraint failed", "duplicate key value violates unique constraint")  # SQLite, PostgreSQL


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """The stages' Tracker interface on top of one MLflow run."""

    def __init__(self, client, run_id: str, flush_every_s: float = 5.0):
        from mlflow.entities import Metric, Param

        self._Metric, self._Param = Metric, Param
        self.client, self.run_id = client, run_id
        self.flush_every_s = flush_every_s
        self._metrics: list = []
        self._params: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}  # key -> the newest Metric logged (log_final reuses it: logged once)
        # A resumed run may already hold metrics for steps past its newest checkpoint (logged before the
        # kill): drop re-computed ones up to there, so the history stays one continuous line.
        self.skip_until = self._last_logged_step()

    def _last_logged_step(self) -> int:
        try:
            hist = self.client.get_metric_history(self.run_id, "train/loss")
        except Exception:  # noqa: BLE001 - a new run has none
            return -1
        return max((m.step for m in hist), default=-1)

    def log_params(self, params: dict[str, Any]) -> None:
        with self._lock:
            for k, v in _flatten(params).items():
                self._params[k] = str(v)[:6000]
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_until and any(k.startswith("train/") for k in metrics):
            return
        ts = int(time.time() * 1000)
        new = [self._Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._metrics.extend(new)
            self.last.update((m.key, m) for m in new)
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def final_step(self) -> int:
        """The step the stage's final metrics belong to: the newest step it logged (0 if it logged none).
        A resumed run's own history counts too (its last train/loss step)."""
        return max([m.step for m in self.last.values()] + [self.skip_until, 0])

    def log_final(self, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
        """The stage's final metrics, once, at ``step`` (and, with ``model_id``, on its LoggedModel): a value the
        stage already logged at that step is re-sent with its own timestamp, which MLflow's SQL store
        deduplicates on the run and records on the model."""
        ts = int(time.time() * 1000)
        out = []
        for k, v in metrics.items():
            prev = self.last.get(k)
            same = prev is not None and prev.step == step and prev.value == float(v)
            out.append(self._Metric(k, float(v), prev.timestamp if same else ts, int(step), model_id=model_id))
        with self._lock:
            self._metrics.extend(out)
            self.last.update((m.key, m) for m in out)
        self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under ``key`` at ``step`` (MLflow's image API: the run page's image grid and slider)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def flush(self) -> None:
        with self._lock:
            metrics, self._metrics = self._metrics, []
            existing = self._params
            self._params = {}
        self._last_flush = time.monotonic()
        params = [self._Param(k, v) for k, v in existing.items()]
        for i in range(0, len(params), 100):  # MLflow's log_batch limits: 100 params, 1000 metrics
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])


def stage_dir_tracker(uri: str, stage_dir: str) -> MlflowTracker:
    """:func:`rank_tracker` of the MLflow run whose id the stage directory's run.json holds (global rank 0 of a
    stage across nodes, on a node other than the one that opened the run)."""
    f = Path(stage_dir) / "run.json"
    run_id = json.loads(f.read_text()).get("mlflow_run_id") if f.exists() else None
    if run_id is None:
        raise RuntimeError(f"{stage_dir}: no run.json with the stage's MLflow run id")
    return rank_tracker(uri, run_id)


def rank_tracker(uri: str, run_id: str) -> MlflowTracker:
    """The tracker of rank 0 of a multi-rank stage (stages.train.launch): the stage's own run, through a client
    of its own. A forked rank drops the database connections it inherited from the launching process
    (SQLAlchemy's rule after a fork: ``dispose(close=False)``), so the two never share one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    engine = getattr(getattr(client._tracking_client, "store", None), "engine", None)
    if engine is not None:
        engine.dispose(close=False)
    return MlflowTracker(client, run_id)


class Tracking:
    """Experiment/run/model bookkeeping for one pipeline invocation."""

    def __init__(self, artifacts: Path, experiment: str):
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        import mlflow
        from mlflow import MlflowClient

        self.mlflow = mlflow
        artifacts = Path(artifacts).resolve()
        self.uri = tracking_uri(artifacts)
        self._running: set[str] | None = None  # running_runs()
        self._running_lock = threading.Lock()
        if not self.uri.startswith("sqlite:"):  # a tracking server (team mode): it creates its own tables
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = _server_experiment(self.client, experiment)
            return
        # creating mlflow.db (the client runs the schema migrations) and the experiment must not race with
        # another `baton run` (or stage process) on the same artifacts dir: serialise them with a file lock
        artifacts.mkdir(parents=True, exist_ok=True)
        with open(artifacts / ".mlflow-init.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=(artifacts / "mlartifacts" / experiment).as_uri())
            else:
                self.experiment_id = exp.experiment_id
            if (exp.tags if exp else {}).get("mlflow.experimentKind") != EXPERIMENT_KIND:
                self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)

    def run_link(self, run_id: str) -> str:
        """The run's page in the MLflow UI, relative to it (``baton ui``): a link in a description."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}{ML_LAYOUT}"

    def model_link(self, model_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/models/{model_id}{ML_LAYOUT}"

    def start_parent(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=source_tags() | tags)
        return run.info.run_id

    def start_stage_run(self, parent_id: str, stage: str, fingerprint: str, resolved: dict[str, Any],
                        tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=source_tags() | {
            "mlflow.parentRunId": parent_id, "baton.stage": stage, "baton.fingerprint": fingerprint,
            "baton.kind": resolved.get("kind", "")} | (tags or {}))
        tracker = MlflowTracker(self.client, run.info.run_id)
        tracker.log_params({k: v for k, v in resolved.items() if k != "runtime"})
        return run.info.run_id

    def reopen(self, run_id: str, parent_id: str) -> bool:
        """Continue an earlier execution's run (resume). False if it no longer exists."""
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "baton.resumed_by", parent_id)
        return True

    def finish_if_running(self, run_id: str | None, stage_dir: Path) -> None:
        """A complete stage (result.json) whose run is still RUNNING: the process that wrote result.json
        was killed before it ended the run. Log what it would have logged last and end it."""
        if not run_id or run_id not in self.running_runs():
            return
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted / another store
            return
        if run.info.status == "RUNNING":
            for f in ("result.json", "config.json"):
                if (Path(stage_dir) / f).exists():
                    self.client.log_artifact(run_id, str(Path(stage_dir) / f))
            self.end_run(run_id, "FINISHED")

    def running_runs(self) -> set[str]:
        """The experiment's runs that were RUNNING when this invocation first asked (one query, not a get_run per
        cached stage); a stage run that ends later is no longer this invocation's to finish."""
        with self._running_lock:
            if self._running is None:
                from mlflow.entities import ViewType

                found = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                                run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
                self._running = {r.info.run_id for r in found}
            return self._running

    def log_lineage(self, run_id: str, upstream_models: dict[str, str], datasets: dict[str, tuple[str, str]]) -> None:
        """Model inputs (upstream LoggedModel ids) and dataset inputs ({name: (source, digest)})."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        ds = [DatasetInput(Dataset(name=n, digest=d[:36], source_type="local", source=json.dumps({"uri": s})),
                           tags=[InputTag("mlflow.data.context", "train")]) for n, (s, d) in datasets.items()]
        models = [LoggedModelInput(mid) for mid in upstream_models.values() if mid]
        if ds or models:
            self._log_inputs(run_id, ds, models)

    def describe_stage_run(self, run_id: str, stage: str, fingerprint: str, upstream: dict[str, dict],
                           cached_from: str | None = None) -> None:
        """The run's description (``mlflow.note.content``, markdown): fingerprint, and per upstream stage its run
        and LoggedModel as links; each upstream LoggedModel gets a forward link back to this run."""
        if not cached_from:
            for info in upstream.values():
                if info.get("mlflow_model_id"):
                    self._link_model_user(info["mlflow_model_id"], run_id, stage)
        self.client.set_tag(run_id, "mlflow.note.content", self.stage_note(stage, fingerprint, upstream, cached_from))

    def stage_note(self, stage: str, fingerprint: str, upstream: dict[str, dict], cached_from: str | None) -> str:
        """The markdown of :meth:`describe_stage_run`."""
        lines = [f"**{stage}** stage, fingerprint `{fingerprint[:16]}`" + (
            f": cached, the run that made it is [{cached_from[:8]}]({self.run_link(cached_from)})" if cached_from
            else ""), ""]
        lines += ["Upstream:", ""] if upstream else ["No upstream stages."]
        for name, info in upstream.items():
            run, model = info.get("mlflow_run_id"), info.get("mlflow_model_id")
            lines.append(f"- **{name}** `{info.get('fingerprint', '')[:12]}`"
                         + (f" run [{run[:8]}]({self.run_link(run)})" if run else "")
                         + (f", model [{model}]({self.model_link(model)})" if model else ""))
        return "\n".join(lines)

    def _link_model_user(self, model_id: str, run_id: str, stage: str) -> None:
        """Forward lineage: the LoggedModel records every run that used it (a tag per run, and its description
        lists them). Best effort: a model that is gone from this store is skipped."""
        try:
            self.client.set_logged_model_tags(model_id, {f"baton.used_by.{run_id}": stage})
            model = self.client.get_logged_model(model_id)
        except Exception as e:  # noqa: BLE001 - MlflowException: deleted, another store
            log.debug("model %s: no forward link: %s", model_id, e)
            return
        self.client.set_logged_model_tags(model_id, {"mlflow.note.content": self._model_note(model)})

    def _model_note(self, model) -> str:
        tags = model.tags
        lines = [f"Weights of stage **{tags.get('baton.stage', model.name)}**, fingerprint "
                 f"`{tags.get('baton.fingerprint', '')}`, made by run "
                 f"[{model.source_run_id[:8]}]({self.run_link(model.source_run_id)})."]
        users = sorted((v, k.removeprefix("baton.used_by.")) for k, v in tags.items() if k.startswith("baton.used_by."))
        if users:
            lines += ["", "Used by:", ""] + [f"- **{st}** run [{r[:8]}]({self.run_link(r)})" for st, r in users]
        return "\n".join(lines)

    def _log_inputs(self, run_id: str, ds: list, models: list, attempts: int = 5) -> None:
        """MLflow's SQL store checks whether a dataset exists, then inserts it: two stage processes logging
        the same dataset (world/coco) at once can both miss it, and the second insert fails on the
        (experiment, name, digest) UNIQUE constraint (SQLite's or, behind a team tracking server, PostgreSQL's).
        Retried, the row is found and linked."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                self.client.log_inputs(run_id, datasets=ds or None, models=models or None)
                return
            except MlflowException as e:
                if not any(m in str(e) for m in _UNIQUE_VIOLATION) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def log_model(self, run_id: str, stage: str, fingerprint: str, model_dir: Path, step: int,
                  metrics: dict[str, float], params: dict[str, Any] | None = None,
                  tracker: MlflowTracker | None = None) -> str:
        """``model_dir`` as a LoggedModel of run ``run_id``: its fingerprint (tag and param), ``params`` (the
        resolved config), ``metrics`` (the stage's final ones, at ``step``: through ``tracker`` when given, so
        that the run's own copies are not duplicated), output of the run at ``step``."""
        from mlflow.entities import LoggedModelOutput

        flat = {k: str(v)[:6000] for k, v in _flatten(params or {}).items()}
        model = self.client.create_logged_model(
            self.experiment_id, name=stage, source_run_id=run_id, model_type="safetensors-state-dict",
            tags={"baton.stage": stage, "baton.fingerprint": fingerprint},
            params={"baton.fingerprint": fingerprint, "baton.stage": stage} | flat)
        self.client.set_logged_model_tags(model.model_id, {"mlflow.note.content": self._model_note(model)})
        (tracker or MlflowTracker(self.client, run_id)).log_final(metrics, step, model_id=model.model_id)
        self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def log_cached_stage(self, parent_id: str, result, upstream: dict[str, dict]) -> str:
        """A child run of this invocation for a stage found complete: tagged ``baton.cached``, with the result's
        metrics and baselines, its description linking the run (and LoggedModel) that made it. Three calls (the
        run with its tags, its metrics, its end): every stage of a cached rerun makes one."""
        from mlflow.entities import Metric, Param

        made_by = result.info.get("mlflow_run_id")
        tags = source_tags() | {"mlflow.parentRunId": parent_id, "baton.stage": result.stage,
                                "baton.fingerprint": result.fingerprint, "baton.kind": result.kind,
                                "baton.cached": "true", **({"baton.cached_from": made_by} if made_by else {}),
                                "mlflow.note.content": self.stage_note(result.stage, result.fingerprint, upstream,
                                                                       made_by)}
        run_id = self.client.create_run(self.experiment_id, run_name=result.stage, tags=tags).info.run_id
        ts, step = int(time.time() * 1000), int(result.info.get("steps", 0))
        values = result.metrics | {f"baseline/{k}": v for k, v in result.baselines.items()}
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()],
                              params=[Param("kind", result.kind)])
        self.end_run(run_id, "FINISHED")
        return run_id

    @contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network through psutil; GPU through nvidia-ml-py when
        there is one) on the stage's run every ``BATON_SYSTEM_METRICS_INTERVAL`` s (default 10; 0: off)
        while the block runs. A resumed run continues their steps."""
        interval = float(os.environ.get("BATON_SYSTEM_METRICS_INTERVAL", "10"))
        monitor = None
        if interval > 0:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines

                monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                               tracking_uri=self.uri)
                monitor.start()
            except Exception as e:  # noqa: BLE001 - psutil missing (the `metrics` extra): no system metrics
                log.info("system metrics off: %s", e)
                monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def link_model(self, parent_id: str, model_id: str | None) -> None:
        """Record a stage's LoggedModel as a model input of the invocation's parent run, whether the stage ran
        in this invocation or was Cached: every parent run links the one model of each stage it used."""
        if parent_id and model_id:
            from mlflow.entities import LoggedModelInput

            self.client.log_inputs(parent_id, models=[LoggedModelInput(model_id)])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def model_exists(self, model_id: str) -> bool:
        try:
            self.client.get_logged_model(model_id)
            return True
        except Exception:  # noqa: BLE001
            return False


_source: dict[str, str] = {}


def source_tags() -> dict[str, str]:
    """Who ran it and on which code: ``mlflow.user`` and ``mlflow.source.git.commit`` (of baton's checkout,
    when it is one; ``baton.git.dirty`` when it has uncommitted changes), as MLflow's UI shows them."""
    if not _source:
        import getpass
        import subprocess

        root = Path(__file__).resolve().parents[1]
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        _source.update({"mlflow.user": user, "mlflow.source.name": "baton", "mlflow.source.type": "LOCAL"})
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10)
            if commit.returncode == 0:
                _source["mlflow.source.git.commit"] = commit.stdout.strip()
                _source["baton.git.dirty"] = str(bool(dirty.stdout.strip())).lower()
        except (OSError, subprocess.SubprocessError):  # no git: no commit tag
            pass
    return dict(_source)


def tracking_uri(artifacts: Path) -> str:
    """The team's MLflow server ($BATON_TRACKING_URI, set by flows.team.join_team), else the artifact root's
    embedded SQLite store."""
    return os.environ.get("BATON_TRACKING_URI") or f"sqlite:///{Path(artifacts).resolve() / 'mlflow.db'}"


def _server_experiment(client, name: str) -> str:
    """The experiment's id on a tracking server, created if missing (artifacts where the server puts them);
    two users creating it at once both end up with the one experiment."""
    from mlflow.exceptions import MlflowException

    for _ in range(3):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    raise RuntimeError(f"MLflow experiment {name!r}: created and not found")
