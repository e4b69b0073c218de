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
from pathlib import Path
from typing import Any

log = logging.getLogger("baton")
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
        with self._lock:
            self._metrics.extend(self._Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

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


class Tracking:
    """Experiment/run/model bookkeeping for one pipeline invocation."""

    def __init__(self, artifacts: Path, experiment: str):
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        import mlflow
        from mlflow import MlflowClient

        self.mlflow = mlflow
        artifacts = Path(artifacts).resolve()
        self.uri = tracking_uri(artifacts)
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

    def start_parent(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def start_stage_run(self, parent_id: str, stage: str, fingerprint: str, resolved: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": parent_id, "baton.stage": stage, "baton.fingerprint": fingerprint,
            "baton.kind": resolved.get("kind", "")})
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
        if not run_id:
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

    def log_lineage(self, run_id: str, upstream_models: dict[str, str], datasets: dict[str, tuple[str, str]]) -> None:
        """Model inputs (upstream LoggedModel ids) and dataset inputs ({name: (source, digest)})."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        ds = [DatasetInput(Dataset(name=n, digest=d[:36], source_type="local", source=json.dumps({"uri": s})),
                           tags=[InputTag("mlflow.data.context", "train")]) for n, (s, d) in datasets.items()]
        models = [LoggedModelInput(mid) for mid in upstream_models.values() if mid]
        if ds or models:
            self._log_inputs(run_id, ds, models)

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
                  metrics: dict[str, float]) -> str:
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(self.experiment_id, name=stage, source_run_id=run_id,
                                                tags={"baton.stage": stage, "baton.fingerprint": fingerprint},
                                                model_type="safetensors-state-dict")
        self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

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
