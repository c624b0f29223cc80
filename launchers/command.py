"""The deepspeed-launcher or torchrun command line for a hostfile or the current SLURM allocation.

Standard library only. One launcher process runs per node and starts that node's ranks; nodes find
each other through MASTER_ADDR:MASTER_PORT, so no ssh/pdsh is needed: the deepspeed launcher runs
with ``--no_ssh --node_rank K`` (its per-node mode), torchrun with its static rendezvous
(``--node-rank K``). Under SLURM, ``srun --ntasks-per-node=1`` starts the per-node launchers.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtx_launchers.env import DEFAULT_PORT, LaunchEnvError
from mtx_launchers.slurm import NodelistError, node_address, parse_nodelist, parse_tasks_per_node, port_for_job

LAUNCHERS = ("deepspeed", "torchrun")
TRAIN_MODULE = "mtx_dist.cli"
_HOST_LINE = re.compile(r"(\S+)\s+slots\s*=\s*(\d+)")


class HostfileError(LaunchEnvError):
    """A hostfile that is empty or has a line that is not ``host slots=N``."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # processes (GPUs) on that host


def read_hostfile(path: str) -> list[Host]:
    """``host slots=N`` per line (the deepspeed/MPI format); ``#`` comments and blank lines ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror or e}") from None
    hosts: list[Host] = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.fullmatch(line)
        if not m:
            raise HostfileError(f"{path} line {n}: {raw.strip()!r} is not of the form 'host slots=N'")
        if int(m.group(2)) < 1:
            raise HostfileError(f"{path} line {n}: {raw.strip()!r}: slots must be at least 1")
        if any(h.name == m.group(1) for h in hosts):
            raise HostfileError(f"{path} line {n}: host {m.group(1)!r} is listed twice")
        hosts.append(Host(m.group(1), int(m.group(2))))
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts")
    return hosts


def format_hostfile(hosts: Sequence[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def _gpus(env: Mapping[str, str]) -> int | None:
    """GPUs per node of the allocation (SLURM_GPUS_ON_NODE, or SLURM_GPUS_PER_NODE like 'a100:4')."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = env.get(name, "").strip()
        if raw:
            m = re.fullmatch(r"(?:[\w-]+:)*(\d+)", raw)
            if not m:
                raise LaunchEnvError(f"{name}={raw!r} is not a GPU count")
            return int(m.group(1)) or None
    return None


def slurm_hosts(env: Mapping[str, str], nproc_per_node: int | None = None) -> list[Host]:
    """The allocation's nodes with one slot per rank: ``nproc_per_node`` when given, else the GPUs per
    node, else SLURM_NTASKS_PER_NODE, else 1 (a CPU node runs one rank unless told otherwise)."""
    name = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env), None)
    if name is None:
        raise LaunchEnvError("no SLURM allocation (SLURM_JOB_NODELIST is not set) and no --hostfile given: "
                             "run inside sbatch/salloc, or pass --hostfile FILE")
    try:
        nodes = parse_nodelist(env[name])
    except NodelistError as e:
        raise LaunchEnvError(f"{name}: {e}") from None
    if nproc_per_node is None:
        nproc_per_node = _gpus(env)
    if nproc_per_node is None and env.get("SLURM_NTASKS_PER_NODE", "").strip():
        try:
            per_node = parse_tasks_per_node(env["SLURM_NTASKS_PER_NODE"])
        except NodelistError as e:
            raise LaunchEnvError(f"SLURM_NTASKS_PER_NODE: {e}") from None
        nproc_per_node = per_node[0]
    return [Host(n, nproc_per_node or 1) for n in nodes]


@dataclass(frozen=True)
class Plan:
    """What one node runs: the launcher command plus the hostfile it reads (deepspeed)."""

    argv: list[str]
    hosts: list[Host]
    node_rank: int
    master_addr: str
    master_port: int
    hostfile: str | None = None


def build(launcher: str, hosts: Sequence[Host], train_args: Sequence[str], *, node_rank: int = 0,
          master_addr: str = "127.0.0.1", master_port: int = DEFAULT_PORT, hostfile: str | None = None,
          python: str | None = None) -> Plan:
    """The launcher command for node ``node_rank`` of ``hosts``; ``train_args`` go to ``mtx-dist``
    (e.g. ``["train", "cfg.toml", "--resume", "latest"]``). ``hostfile`` (deepspeed) is where the
    caller writes :func:`format_hostfile` of ``hosts``."""
    if launcher not in LAUNCHERS:
        raise LaunchEnvError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if not hosts:
        raise HostfileError("no hosts to launch on")
    if not 0 <= node_rank < len(hosts):
        raise LaunchEnvError(f"node rank {node_rank} is outside the {len(hosts)} hosts "
                             f"({', '.join(h.name for h in hosts)})")
    py = python or sys.executable
    if launcher == "deepspeed":
        if hostfile is None:
            raise LaunchEnvError("the deepspeed launcher needs a hostfile path")
        argv = [py, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh",
                "--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(master_port),
                "--module", TRAIN_MODULE, *train_args]
    else:
        slots = {h.slots for h in hosts}
        if len(slots) != 1:
            raise LaunchEnvError("torchrun starts the same number of processes on every node, but the hosts have "
                                 f"{', '.join(f'{h.name}={h.slots}' for h in hosts)} slots; use --launcher deepspeed")
        argv = [py, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc-per-node",
                str(hosts[0].slots), "--node-rank", str(node_rank), "--master-addr", master_addr,
                "--master-port", str(master_port), "-m", TRAIN_MODULE, *train_args]
    return Plan(argv, list(hosts), node_rank, master_addr, master_port, hostfile)


def plan_from_environment(launcher: str, train_args: Sequence[str], env: Mapping[str, str], *,
                          hostfile: str | None = None, write_hostfile: str | None = None,
                          nproc_per_node: int | None = None, node_rank: int | None = None,
                          master_addr: str | None = None, master_port: int | None = None,
                          resolve=node_address, python: str | None = None) -> Plan:
    """Hosts from ``hostfile`` or else the SLURM allocation (written to ``write_hostfile`` for deepspeed);
    node rank, master address and port from the arguments, else SLURM (SLURM_NODEID, the first node's
    address, a port derived from the job id), else node 0 on this host at port 29500."""
    if nproc_per_node is not None and nproc_per_node < 1:
        raise LaunchEnvError(f"--nproc-per-node {nproc_per_node}: must be at least 1")
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        if nproc_per_node is not None:
            hosts = [Host(h.name, nproc_per_node) for h in hosts]
    else:
        hosts = slurm_hosts(env, nproc_per_node)
    if node_rank is None:
        node_rank = int(env["SLURM_NODEID"]) if "SLURM_NODEID" in env and hostfile is None else 0
    if master_addr is None:
        master_addr = env.get("MASTER_ADDR") or ("127.0.0.1" if len(hosts) == 1 and hostfile is None
                                                 else resolve(hosts[0].name))
        if not master_addr:
            raise LaunchEnvError(f"cannot find the address of {hosts[0].name}, the first host; pass --master-addr")
    if master_port is None:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        master_port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else port_for_job(job) if job else DEFAULT_PORT
    if launcher == "deepspeed" and hostfile is None:
        hostfile = write_hostfile or "hostfile"
    return build(launcher, hosts, train_args, node_rank=node_rank, master_addr=master_addr,
                 master_port=master_port, hostfile=hostfile, python=python)


def render(plan: Plan) -> str:
    return shlex.join(plan.argv)


def execute(plan: Plan) -> None:
    """Replace this process with the launcher (no process in between to lose signals or exit codes).

    SIGUSR1 is set to ignored first: a preemption notice sent to the whole process group must not
    kill the launcher (its default action); the training processes inherit that and install their
    own handler as soon as training starts. SIGTERM keeps its meaning: the launchers stop their ranks."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(plan.argv[0], plan.argv)
