"""Run tags: the code version (git) and where a job ran (hosts, launcher, SLURM job), for MLflow."""

from __future__ import annotations

import os
import socket
import subprocess

from mtx_dist import package_version


def git_info(path: str | None = None, timeout_s: float = 5.0) -> tuple[str, str]:
    """(commit, dirty) of the git checkout holding ``path`` (default: this package), or ("unknown", "unknown").

    Read with git itself: MLflow's own git tag describes the entry script's repository, which is not
    necessarily where this package's code lives, and it records no uncommitted changes."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=timeout_s)
        # An installed package can sit inside some unrelated repository (a virtualenv in a project):
        # the commit only describes this code if git tracks files here.
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", "."], cwd=cwd, capture_output=True,
                                 text=True, timeout=timeout_s)
        if commit.returncode != 0 or tracked.returncode != 0:
            return "unknown", "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=timeout_s)
        dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "unknown"


def host_ranges(hosts: list[str]) -> str:
    """Rank-ordered host names as ``a:0-7,b:8-15`` (one entry per contiguous block of ranks)."""
    parts, start = [], 0
    for r in range(1, len(hosts) + 1):
        if r == len(hosts) or hosts[r] != hosts[start]:
            parts.append(f"{hosts[start]}:{start}" + (f"-{r - 1}" if r - 1 > start else ""))
            start = r
    return ",".join(parts)


SLURM_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
              "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SLURM_RESTART_COUNT": "slurm.restart_count",
              "SLURM_JOB_NODELIST": "slurm.nodelist", "SLURM_JOB_PARTITION": "slurm.partition"}


def launcher_name(source: str, environ=None) -> str:
    """The discovery's source, naming the launcher behind plain RANK/WORLD_SIZE variables where its own
    marker variables show it (only for the record: discovery treats both the same)."""
    env = os.environ if environ is None else environ
    if source == "env" and "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if source == "env" and "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    return source


def cluster_tags(env, tp_size: int, dp_size: int, enabled: bool = True) -> dict[str, str]:
    """Tags describing this job. A collective when the world has more than one rank (every rank must
    call it; only rank 0's result is used): the host names of all ranks are gathered once."""
    if not enabled:
        return {}
    hosts = [socket.gethostname()]
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    if env.rank != 0:
        return {}
    commit, dirty = git_info()
    tags = {"world_size": env.world_size, "tensor_parallel": tp_size, "data_parallel": dp_size,
            "launcher": launcher_name(env.source), "hosts": host_ranges(hosts)[:5000], "num_hosts": len(set(hosts)),
            "mtx_dist.version": package_version(), "mtx_dist.git_commit": commit, "mtx_dist.git_dirty": dirty}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by MLflow's UI
    tags.update({tag: os.environ[var] for var, tag in SLURM_TAGS.items() if os.environ.get(var)})
    return {k: str(v) for k, v in tags.items()}
