"""What watches a training run besides its loss: the hang watchdog, MLflow's system metrics (one
monitor per node) and the data set records of the run (``mtx_dist.trainer`` starts and stops them)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

from mtx_dist import shard_sets
from mtx_dist.config import Config
from mtx_dist.engine import Runtime
from mtx_dist.system_metrics import SystemMetrics
from mtx_dist.tracking import Tracker, import_mlflow, tracking_uri
from mtx_dist.watchdog import LONG_PHASE_S, HangWatchdog
from mtx_launchers.slurm import requeue as slurm_requeue


def start_watchdog(cfg: Config, runtime: Runtime, tracker: Tracker, step: int) -> HangWatchdog:
    """Every rank's hang watchdog (a stopped one when ``run.hang_watchdog`` is off); rank 0 reports a
    hang to MLflow and requeues the SLURM job (``run.requeue``)."""
    def report(path: str, what: str) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if cfg.run.requeue and job:  # first: the hung rank leaves soon, and srun may then end this one
            if not dog.progressed:
                print(f"hang watchdog: not requeueing SLURM job {job}: no step completed since this job started, "
                      f"so a restart would hang again", file=sys.stderr, flush=True)
            else:
                ok, said = slurm_requeue(job)
                print("hang watchdog: " + (f"requeued SLURM job {job}" if ok else
                                           f"requeue of SLURM job {job} failed: {said}"), file=sys.stderr, flush=True)
        tracker.report_hang(path, what)

    dog = HangWatchdog(cfg.run.dir, runtime.env.rank, cfg.run.hang_timeout_s,
                       on_hang=report if runtime.is_main else None,
                       collective_timeout_s=cfg.parallel.dist_timeout_s,
                       min_step_limit_s=LONG_PHASE_S if cfg.run.compile else 0.0)
    return dog.start(step) if cfg.run.hang_watchdog else dog


def describe_data(tracker: Tracker, train_shards: str, val_shards: str | None) -> None:
    """The shard sets as the run's MLflow dataset inputs (rank 0; digests from the shards' manifests)."""
    if not tracker.active:
        return
    for spec, context in ((train_shards, "training"), (val_shards, "validation")):
        if spec:
            try:
                tracker.log_dataset(shard_sets.describe(spec), context)
            except (OSError, ValueError) as e:  # the loader reads them regardless; only the record is missing
                tqdm.write(f"MLflow: cannot describe the {context} shards {spec!r} ({e})")


def monitor_node_id(host: str, node_rank: int, num_nodes: int, num_hosts: int) -> str | None:
    """MLflow's ``node_id`` of one node's system-metrics monitor: none on a single node (plain
    ``system/...`` names), the host name when every node is its own host, else host and node rank (two
    nodes of a job on one host must not write the same metric names)."""
    if max(num_nodes, num_hosts) <= 1:
        return None
    return host if num_hosts == num_nodes else f"{host}-node{node_rank}"


def start_system_metrics(cfg: Config, runtime: Runtime, tracker: Tracker, tags: dict[str, str]) -> SystemMetrics | None:
    """MLflow's system metrics, one monitor per node (local rank 0). A collective when tracking is on
    (rank 0 tells every node the run id); a node learns nothing when the store was down at the start,
    except rank 0's, whose monitor starts once the run exists."""
    t = cfg.tracking
    if not (t.enabled and t.system_metrics):
        return None
    import torch.distributed as dist
    shared = [{"run_id": tracker.run_id, "num_hosts": int(tags.get("num_hosts", "1"))} if runtime.is_main else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    if runtime.env.local_rank != 0:
        return None
    run_id = (lambda: tracker.run_id) if runtime.is_main else shared[0]["run_id"]
    if run_id is None:
        return None
    import_mlflow()  # telemetry off and MLflow's loggers quiet on every node
    import socket
    env = runtime.env
    return SystemMetrics(run_id, tracking_uri(t), t.system_metrics_interval_s, t.system_metrics_samples,
                         node_id=monitor_node_id(socket.gethostname(), env.node_rank, env.num_nodes,
                                                 shared[0]["num_hosts"]),
                         retry_s=max(t.retry_s, 1.0), request_timeout_s=t.request_timeout_s).start()


def stop_system_metrics(monitor: SystemMetrics | None) -> None:
    if monitor is not None:
        monitor.stop()
