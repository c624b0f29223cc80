"""MLflow's own system-metrics monitor for a training run, one per node, kept alive through outages.

MLflow's ``SystemMetricsMonitor`` samples CPU, memory, disk and network (psutil) and the GPUs (NVML,
when ``nvidia-ml-py`` is installed and a GPU is there) and logs them under ``system/`` in the run's
System metrics tab. We use it as it is, with two things it lacks for long jobs:

- It ends its thread at the first failed request (a store that is restarting, a network blip). Here
  a supervisor thread starts it again after a backoff, continuing its step count, so the charts resume
  when the store is back. Samples taken while the store is down are lost, not queued: they describe
  the machine, not the training, and the training metrics have their own buffer.
- Construction, sampling and every request happen on that thread: a step never waits for it.

In a job over several nodes each node's monitor names its node (MLflow's ``node_id``, see
``mtx_dist.run_monitor.monitor_node_id``), so the metrics read ``system/<host>/cpu_utilization_percentage``;
a one-node job keeps MLflow's plain names.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class SystemMetrics:
    """Run MLflow's system-metrics monitor for ``run_id`` (or a callable returning it once it is known)
    until :meth:`stop`; restarted ``retry_s`` (doubling up to 8x) after it gives up."""

    def __init__(self, run_id: str | Callable[[], str | None], uri: str, interval_s: float, samples: int,
                 node_id: str | None = None, retry_s: float = 5.0, request_timeout_s: float = 10.0) -> None:
        self.request_timeout_s = request_timeout_s  # of the last flush, which runs on the caller's thread
        self._run_id = run_id if callable(run_id) else (lambda: run_id)
        self.uri, self.interval_s, self.samples, self.node_id, self.retry_s = uri, interval_s, samples, node_id, retry_s
        self.restarts = 0  # how often the monitor was started again after it gave up
        self._stop = threading.Event()
        self._monitor = None
        self._next_step = None  # the step the next monitor continues from (None: ask the store)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="mtx-system-metrics")

    def start(self) -> "SystemMetrics":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop sampling and deliver what the monitor holds (guarded: a store that is down only warns)."""
        self._stop.set()
        with self._lock:
            if self._monitor is not None:
                self._monitor._shutdown_event.set()
        self._thread.join(timeout_s)
        monitor = self._monitor
        if monitor is not None and monitor.mlflow_logger.data:
            from mtx_dist.mlflow_requests import request_policy

            try:
                with request_policy(self.request_timeout_s):  # no retries: training is over, exit soon
                    monitor.mlflow_logger.flush()
            except Exception as e:  # noqa: BLE001 - the run's last system samples; training is done
                log.warning("MLflow: the last system metrics could not be delivered to %s (%s)", self.uri, e)

    def _supervise(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        failures = 0
        for name in ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor"):
            logging.getLogger(name).setLevel(logging.ERROR)  # its own warnings repeat ours at every restart
        while not self._stop.is_set():
            run_id = self._run_id()
            if run_id is not None:
                try:
                    monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s,
                                                   samples_before_logging=self.samples,
                                                   resume_logging=self._next_step is None, node_id=self.node_id,
                                                   tracking_uri=self.uri)
                    if self._next_step is not None:
                        monitor._logging_step = self._next_step
                    with self._lock:
                        self._monitor = monitor
                        if self._stop.is_set():
                            monitor._shutdown_event.set()
                    first = monitor._logging_step
                    monitor.monitor()  # returns when the run is not RUNNING, on a failed request, or on stop
                    self._next_step = monitor._logging_step
                    if self._next_step > first:
                        failures = 0  # it delivered before it gave up: wait the shortest backoff
                except Exception as e:  # noqa: BLE001 - anything from the store; try again later
                    log.debug("system metrics monitor failed: %s", e)
                if self._stop.is_set():
                    return
                failures += 1
                self.restarts += 1
            self._stop.wait(self.retry_s * min(2 ** max(failures - 1, 0), 8))
