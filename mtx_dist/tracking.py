"""MLflow tracking from rank 0; every other rank gets a tracker that does nothing.

Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow's own default), unless
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` says otherwise. MLflow's telemetry is switched off
unless the user has set ``MLFLOW_DISABLE_TELEMETRY`` / ``DO_NOT_TRACK`` themselves.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mtx_dist.config import TrackingConfig

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _import_mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow
    return mlflow


class Tracker:
    """A thin MLflow run handle. ``active`` is False off rank 0 or when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, active: bool) -> None:
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self._mlflow = None

    def start(self, run_name: str, params: dict[str, Any], config_toml: str, run_id: str | None = None,
              step: int = 0) -> str | None:
        """Start a run, or continue ``run_id`` (a resumed training run keeps its MLflow run)."""
        if not self.active:
            return None
        mlflow = self._mlflow = _import_mlflow()
        mlflow.set_tracking_uri(self.uri)
        run = None
        if run_id is not None:
            try:
                run = mlflow.start_run(run_id=run_id)
            except mlflow.exceptions.MlflowException as e:  # e.g. the store changed since the checkpoint
                log.warning("cannot continue MLflow run %s in %s (%s); starting a new run", run_id, self.uri, e)
                run_id = None
        if run is None:
            mlflow.set_experiment(self.cfg.experiment)
            run = mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id
        logged = run.data.params
        fresh = {k: str(v) for k, v in params.items() if k not in logged}
        changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
        if fresh:
            mlflow.log_params(fresh)
        if changed:  # MLflow params are immutable: record what a resumed run changed as tags
            mlflow.set_tags({f"resumed_override.{k}": v for k, v in changed.items()})
        mlflow.log_text(config_toml, "config.toml" if run_id is None else f"config-resumed-step{step}.toml")
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.log_artifacts(local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow is not None and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
