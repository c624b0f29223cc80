"""MLflow tracking from rank 0; every other rank gets a tracker that does nothing.

Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow's own default), unless
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` says otherwise. MLflow's telemetry is switched off
unless the user has set ``MLFLOW_DISABLE_TELEMETRY`` / ``DO_NOT_TRACK`` themselves.

Tracking never stops training. With ``background=True`` (the trainer) every MLflow call runs on one
delivery thread: logging only appends to the buffer, so a slow or silent store costs the training
thread nothing. Every MLflow call goes through one guard: a failure (server down,
store locked, network) is warned about (rate-limited), metric points stay in a bounded buffer and
the whole pending work (creating the run, params, metrics, artifacts, model registration) is tried
again on a later call after a backoff, and once more at the end. What still could not be delivered
is counted and written to ``<run.dir>/mlflow_undelivered.jsonl``.

A requeued job continues its MLflow run: the run id travels in the checkpoint, and rank 0 also keeps
it in ``<run.dir>/mlflow_run_id`` (with the store's URI) for a job stopped before its first checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any

from mtx_data_pipelines.files import atomic_open
from mtx_dist.config import TrackingConfig
from mtx_dist.mlflow_requests import ScopedClient, request_policy

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
RUN_ID_FILE = "mlflow_run_id"
UNDELIVERED_FILE = "mlflow_undelivered.jsonl"
WARN_EVERY_S = 300.0  # while the store stays unreachable, repeat the warning at most this often
MAX_BACKOFF = 8  # the wait between attempts doubles up to this multiple of tracking.retry_s
# MLflow's batch limits (log_batch): 1000 metrics, 100 params, 100 tags per request.
METRICS_PER_BATCH, PARAMS_PER_BATCH = 1000, 100
# MLflow 3's UI opens an experiment without this tag in its GenAI view; this kind is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE_TAG = "mlflow.note.content"  # the run's description on its page
FINISH_WAIT_S = 60.0  # finish() waits this long (at least 6 request timeouts) for the delivery thread


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _same_store(a: str, b: str) -> bool:
    """URIs equal after making a relative sqlite path absolute (sqlite:///mlflow.db)."""
    def norm(u: str) -> str:
        if u.startswith("sqlite:///") and not u.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(u[len("sqlite:///"):])
        return u.rstrip("/")
    return norm(a) == norm(b)


def import_mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    for name in ("mlflow", "alembic", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import mlflow
    return mlflow


def _client_for_delivery(cfg: TrackingConfig, uri: str) -> ScopedClient:
    """The client, with every MLflow module the delivery path imports lazily (it builds the store: a
    sqlite store opens its database here)."""
    import_mlflow()
    import mlflow.entities  # noqa: F401
    import mlflow.exceptions  # noqa: F401
    import mlflow.tracking.context.registry  # noqa: F401
    import mlflow.utils.mlflow_tags  # noqa: F401
    from mlflow.tracking import MlflowClient
    with request_policy(cfg.request_timeout_s):
        return ScopedClient(MlflowClient(uri), cfg.request_timeout_s)


# -- the tracker ---------------------------------------------------------------------------------

class Tracker:
    """An MLflow run handle that never raises on the training path. ``active`` is False off rank 0
    or when tracking is disabled; then every method does nothing."""

    def __init__(self, cfg: TrackingConfig, active: bool, run_dir: str | None = None, background: bool = False) -> None:
        self.cfg = cfg
        self.background = background
        self.active = active and cfg.enabled
        self.uri = tracking_uri(cfg)
        self.run_dir = run_dir
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.delivered = 0  # metric points the store accepted
        self.dropped = 0  # metric points pushed out of the full buffer
        self._client = None
        self._start: dict[str, Any] | None = None
        self._setup_done = False
        self._buffer: deque = deque()
        self._artifacts: list[tuple[str, str]] = []
        self._registrations: list[str] = []
        self._inputs: list[tuple[Any, str]] = []  # (ShardSet, context) not yet delivered
        self._note: str | None = None
        self._failures = 0
        self._next_try = 0.0
        self._last_warn = -float("inf")
        self._lock = threading.Lock()  # the buffer and the lists of pending work, shared with the delivery thread
        self._wake = threading.Event()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._first_attempt = threading.Event()
        self._status = "FINISHED"
        self._in_flight: list = []  # metric points in a request right now (delivery thread)
        self._abandoned = False  # finish() stopped waiting for the delivery thread

    # public API ------------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, Any], config_toml: str, run_id: str | None = None,
              step: int = 0, tags: dict[str, str] | None = None, resume: bool = False) -> str | None:
        """Start a run, or continue ``run_id`` (a resumed training run keeps its MLflow run). With
        ``resume`` and no ``run_id``, the run recorded in ``<run_dir>/mlflow_run_id`` for the same store
        continues. Returns the run id, or None while the store cannot be reached (creating the run is
        then retried with the next metrics)."""
        if not self.active:
            return None
        if run_id is None and resume:
            run_id = self._recorded_run_id()
        self._start = {"name": run_name, "params": params, "toml": config_toml, "run_id": run_id, "step": step,
                       "tags": dict(tags or {})}
        if self.background:
            # MLflow's imports are seconds of Python bytecode: done here, before training, since on the
            # delivery thread they would hold the GIL against every torch call of the training thread.
            try:
                self._client = _client_for_delivery(self.cfg, self.uri)
            except Exception as e:  # noqa: BLE001 - e.g. a sqlite store that cannot be opened: retried later
                self._fail(e, "connecting")
            self._worker = threading.Thread(target=self._deliver_loop, name="mtx-mlflow", daemon=True)
            self._worker.start()
            self._first_attempt.wait(self.cfg.request_timeout_s)  # a healthy store names the run right away
        else:
            self._attempt(force=True)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or self._start is None:
            return
        now = int(time.time() * 1000)  # the time of the measurement, also for points delivered later
        with self._lock:
            for k, v in metrics.items():
                self._buffer.append((k, float(v), now, int(step)))
            self._trim()
        self._poke()

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.active and self._start is not None:
            self._artifacts.append((local_dir, artifact_path))
            self._poke()

    def register_model(self, artifact_path: str) -> None:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of model ``tracking.register_as``
        (after those artifacts are uploaded). A store without a model registry only warns."""
        if self.active and self._start is not None and self.cfg.register_as:
            self._registrations.append(artifact_path)
            self._poke()

    def log_dataset(self, shard_set, context: str) -> None:
        """Record a :class:`mtx_dist.shard_sets.ShardSet` as a dataset input of the run (``context``:
        ``training``, ``validation`` or ``evaluation``)."""
        if self.active and self._start is not None:
            with self._lock:
                self._inputs.append((shard_set, context))
            self._poke()

    def set_note(self, text: str) -> None:
        """The run's description (MLflow's note), replacing the previous one."""
        if self.active and self._start is not None:
            self._note = text
            self._poke()

    def report_hang(self, path: str, what: str) -> None:
        """From the hang watchdog's thread while the training thread is stuck: the stack file as artifact
        ``hangs/``, the description as tag ``mtx_dist.hang``, the run marked FAILED (a requeued job
        continues it). Direct calls, each bounded by the request timeout; failures only warn."""
        if not (self.active and self.run_id and self._client is not None):
            return
        try:
            self._client.log_artifact(self.run_id, path, "hangs")
            self._client.set_tag(self.run_id, "mtx_dist.hang", what[:5000])
            self._client.set_terminated(self.run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the store may be what hangs
            log.warning("MLflow: could not report the hang to %s (%s: %s)", self.uri, type(e).__name__, e)

    def run_url(self) -> str | None:
        """The run's page in the store's UI (http(s) stores), in MLflow 3's model-training view: its UI
        takes the view from a browser-wide switch that defaults to GenAI, unless the URL names it."""
        if not (self.run_id and self.experiment_id and self.uri.startswith(("http://", "https://"))):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"

    @property
    def undelivered(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._in_flight) + self.dropped

    def finish(self, status: str = "FINISHED") -> None:
        """Last delivery attempt (whatever the backoff), end the run, report what was not delivered.
        In background mode the delivery thread makes the last attempt; this waits for it at most
        ``max(FINISH_WAIT_S, 6 x tracking.request_timeout_s)``."""
        if not self.active or self._start is None:
            return
        self._status = status
        if self._worker is not None:
            self._closing = True
            self._wake.set()
            wait = max(FINISH_WAIT_S, 6 * self.cfg.request_timeout_s)
            self._worker.join(wait)
            if self._worker.is_alive():
                with self._lock:
                    self._abandoned = True  # the thread makes no further call that could deliver twice
                log.warning("MLflow: %s did not take the last deliveries within %.0f s; reporting what is pending "
                            "as undelivered", self.uri, wait)
            self._worker = None
        else:
            self._last_attempt()
        lost = self.undelivered
        if self.run_id is None:
            log.warning("MLflow: no run could be created in %s; nothing was tracked", self.uri)
        if lost or self._artifacts:
            where = self._write_undelivered()
            log.warning("MLflow: %d metric points (%d dropped from the full buffer of %d) and %d artifact "
                        "uploads were not delivered to %s%s", lost, self.dropped, self.cfg.buffer,
                        len(self._artifacts), self.uri, f"; the points kept are in {where}" if where else "")
        self._start = None

    # the guard -------------------------------------------------------------------------------

    def _poke(self) -> None:
        """New work: wake the delivery thread, or (no thread) attempt it here."""
        if self.background:
            self._wake.set()
        else:
            self._attempt()

    def _trim(self) -> None:
        """Under the lock: keep the newest ``tracking.buffer`` points, counting the dropped ones."""
        while len(self._buffer) > self.cfg.buffer:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped == 1:
                log.warning("MLflow: the buffer of %d metric points is full; dropping the oldest (counted, "
                            "reported at the end)", self.cfg.buffer)

    def _deliver_loop(self) -> None:
        """The delivery thread: the first attempt, then one attempt per wake-up (a log call, or the end
        of a backoff while work is pending), then the last attempt when :meth:`finish` asks."""
        self._attempt(force=True)
        self._first_attempt.set()
        while not self._closing:
            timeout = max(self._next_try - time.monotonic(), 0.05) if self._failures else None
            self._wake.wait(timeout)
            self._wake.clear()
            if not self._closing:
                self._attempt()
        self._last_attempt()

    def _last_attempt(self) -> None:
        if self._attempt(force=True) and self.run_id is not None and not self._abandoned:
            try:
                self._client.set_terminated(self.run_id, self._status)
            except Exception as e:  # noqa: BLE001 - the run stays RUNNING in the store; training is done
                self._fail(e, "ending the run")

    def _attempt(self, force: bool = False) -> bool:
        """Deliver everything pending unless waiting out a backoff. True when nothing is pending."""
        if not force and time.monotonic() < self._next_try:
            return False
        try:
            self._deliver()
        except Exception as e:  # noqa: BLE001 - anything the store or the network throws; training goes on
            self._fail(e, "logging")
            return False
        if self._failures:
            log.warning("MLflow: %s reachable again after %d failed attempts; buffered points delivered",
                        self.uri, self._failures)
            self._failures, self._last_warn = 0, -float("inf")
        return True

    def _fail(self, e: Exception, what: str) -> None:
        self._failures += 1
        now = time.monotonic()
        wait = self.cfg.retry_s * min(2 ** (self._failures - 1), MAX_BACKOFF)
        self._next_try = now + wait
        if now - self._last_warn >= WARN_EVERY_S:
            self._last_warn = now
            msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
            log.warning("MLflow: %s in %s failed (%s: %s); training continues, metrics are buffered "
                        "(%d now) and sent again in %.0f s", what, self.uri, type(e).__name__, msg,
                        len(self._buffer), wait)

    def _deliver(self) -> None:
        if self._client is None:
            self._client = _client_for_delivery(self.cfg, self.uri)
        if self.run_id is None:
            self.run_id = self._open_run()
        if not self._setup_done:
            self._setup_run()
        from mlflow.entities import Metric
        while not self._abandoned:
            with self._lock:  # taken out while in flight; put back in front if the request fails
                self._in_flight = [self._buffer.popleft() for _ in range(min(METRICS_PER_BATCH, len(self._buffer)))]
            chunk = self._in_flight
            if not chunk:
                break
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
            except BaseException:
                with self._lock:
                    if not self._abandoned:  # else finish() has reported them already
                        self._buffer.extendleft(reversed(chunk))
                        self._trim()
                    self._in_flight = []
                raise
            with self._lock:
                self._in_flight = []
            self.delivered += len(chunk)
        # Only the versions asked for before this attempt's uploads: a version never points at
        # artifacts that are not there yet.
        registrations = len(self._registrations)
        while self._artifacts:
            local_dir, path = self._artifacts[0]
            self._client.log_artifacts(self.run_id, local_dir, path)
            self._artifacts.pop(0)
        for _ in range(registrations):
            self._register(self._registrations.pop(0))
        with self._lock:
            inputs = list(self._inputs)
        if inputs:
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
            batch = [DatasetInput(Dataset(d.name, d.digest, d.source_type, json.dumps({"uri": d.source}),
                                          profile=json.dumps(d.profile)), tags=[InputTag(MLFLOW_DATASET_CONTEXT, c)])
                     for d, c in inputs]
            self._client.log_inputs(self.run_id, datasets=batch)
            with self._lock:
                del self._inputs[:len(inputs)]
        note = self._note
        if note is not None:
            self._client.set_tag(self.run_id, NOTE_TAG, note)
            if self._note is note:
                self._note = None

    def _open_run(self) -> str:
        from mlflow.exceptions import MlflowException
        s, client = self._start, self._client
        if s["run_id"]:
            try:
                run = client.get_run(s["run_id"])
                if run.info.lifecycle_stage == "active":
                    client.update_run(run.info.run_id, status="RUNNING")
                    self.experiment_id = run.info.experiment_id
                    return run.info.run_id
                log.warning("MLflow run %s in %s was deleted; starting a new run", s["run_id"], self.uri)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store is unreachable: try again later
                log.warning("cannot continue MLflow run %s in %s (it does not exist there); starting a new run",
                            s["run_id"], self.uri)
            s["run_id"] = None
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            try:
                # only an experiment we create gets our kind: an existing one keeps its owner's tags
                exp_id = client.create_experiment(self.cfg.experiment, tags=dict([EXPERIMENT_KIND]))
            except MlflowException as e:  # another job created it meanwhile
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(self.cfg.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        from mlflow.tracking.context.registry import resolve_tags
        run = client.create_run(exp_id, run_name=s["name"], tags=resolve_tags({}))
        self.experiment_id = exp_id
        return run.info.run_id

    def _setup_run(self) -> None:
        from mlflow.entities import Param, RunTag
        s, client = self._start, self._client
        logged = client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in s["params"].items() if k not in logged]
        changed = {k: str(v) for k, v in s["params"].items() if k in logged and logged[k] != str(v)}
        tags = dict(s["tags"])
        if s["run_id"]:
            tags["resumed_at_step"] = str(s["step"])
        # MLflow params are immutable: record what a resumed run changed as tags
        tags.update({f"resumed_override.{k}": v for k, v in changed.items()})
        for i in range(0, len(fresh), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=fresh[i:i + PARAMS_PER_BATCH])
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, tags=items[i:i + PARAMS_PER_BATCH])
        client.log_text(self.run_id, s["toml"],
                        f"config-resumed-step{s['step']}.toml" if s["run_id"] else "config.toml")
        self._record_run_id()
        self._setup_done = True

    def _register(self, artifact_path: str) -> None:
        from mlflow.exceptions import MlflowException
        name = self.cfg.register_as
        try:
            try:
                self._client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = self._client.create_model_version(name, f"runs:/{self.run_id}/{artifact_path}", run_id=self.run_id)
            log.info("MLflow: registered %s version %s", name, mv.version)
        except Exception as e:  # noqa: BLE001 - e.g. a store without a model registry
            log.warning("MLflow: could not register %s/%s as model %r in %s (%s: %s)", self.run_id, artifact_path,
                        name, self.uri, type(e).__name__, str(e).strip()[:300])

    # files in the run directory --------------------------------------------------------------

    def _recorded_run_id(self) -> str | None:
        path = os.path.join(self.run_dir or "", RUN_ID_FILE)
        try:
            with open(path) as f:
                rec = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("MLflow: ignoring unreadable %s (%s)", path, e)
            return None
        if not isinstance(rec, dict) or not rec.get("run_id"):
            log.warning("MLflow: ignoring %s: no run id in it", path)
            return None
        if not _same_store(str(rec.get("tracking_uri", "")), self.uri):
            log.warning("MLflow: %s names run %s in %s, not in %s: starting a new run", path, rec["run_id"],
                        rec.get("tracking_uri"), self.uri)
            return None
        return str(rec["run_id"])

    def _record_run_id(self) -> None:
        if not self.run_dir:
            return
        path = os.path.join(self.run_dir, RUN_ID_FILE)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            with atomic_open(path) as f:
                json.dump({"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.cfg.experiment}, f)
        except OSError as e:
            log.warning("MLflow: cannot record the run id in %s (%s)", path, e)

    def _write_undelivered(self) -> str | None:
        with self._lock:
            points = list(self._in_flight) + list(self._buffer)
        if not points or not self.run_dir:
            return None
        path = os.path.join(self.run_dir, UNDELIVERED_FILE)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(path, "a") as f:
                for key, value, timestamp, step in points:
                    f.write(json.dumps({"run_id": self.run_id, "key": key, "value": value, "step": step,
                                        "timestamp": timestamp}) + "\n")
        except OSError as e:
            log.warning("MLflow: cannot write undelivered metrics to %s (%s)", path, e)
            return None
        return path
