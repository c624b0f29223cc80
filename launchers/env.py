"""Where am I? Rank, world size and rendezvous address from the launcher's environment.

Sources, first match wins:

1. explicit variables (torchrun, the deepspeed launcher, a script): RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE (deepspeed: LOCAL_SIZE), MASTER_ADDR, MASTER_PORT;
2. a SLURM step with one task per rank (``srun``): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
   SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE, SLURM_NODEID and the
   node list; the master is the first node's NodeAddr, the port derived from SLURM_JOB_ID;
3. MPI launchers: OpenMPI (OMPI_COMM_WORLD_*), MVAPICH2 (MV2_COMM_WORLD_*), MPICH/Intel MPI
   (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS). They name no master: MASTER_ADDR must be
   set, or come from a surrounding SLURM allocation's first node.

With none of them set, this is a single process and a free loopback port is chosen for the
(one-member) process group. Values that contradict each other raise :class:`LaunchEnvError`
naming the variables.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mtx_launchers.slurm import NodelistError, node_address, parse_nodelist, parse_tasks_per_node, port_for_job

DEFAULT_PORT = 29500  # torch.distributed's customary port, when nothing else names one
# What DistEnv.export writes (torch.distributed's env:// rendezvous): a process that starts others
# outside a launcher (tests, benchmarks) removes these from the child's environment.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Variables only a launcher that starts the ranks itself sets: under them SLURM_* describe the
# launcher's tasks (often one per node), not the ranks, so the two are not compared.
_LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "LOCAL_SIZE")
_MPI = (  # (name, rank, size, local rank, local size)
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


class LaunchEnvError(RuntimeError):
    """Launcher variables that are missing, malformed or contradict each other."""


class RendezvousError(LaunchEnvError):
    """The process group could not form (a peer missing or unreachable) within the timeout."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # which launcher the values came from: env, slurm, OpenMPI, MVAPICH2, PMI, single
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self, environ: dict | None = None) -> None:
        """Write the variables torch.distributed's env:// rendezvous reads."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                   LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                   MASTER_PORT=str(self.master_port))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((n for n in names if n in environ), None)


def _check_ranks(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str]) -> None:
    r, w, lr, lw = names
    if world < 1:
        raise LaunchEnvError(f"{w}={world} must be at least 1")
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{r}={rank} is outside {w}={world}")
    if not 1 <= local_world <= world:
        raise LaunchEnvError(f"{lw}={local_world} is inconsistent with {w}={world}")
    if not 0 <= local_rank < local_world:
        raise LaunchEnvError(f"{lr}={local_rank} is outside {lw}={local_world}")


def _port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
        if not 0 < port < 65536:
            raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port")
        return port
    job = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    return port_for_job(_int(env, job)) if job else DEFAULT_PORT


def _nodes(env: Mapping[str, str]) -> tuple[str, list[str]] | None:
    name = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if name is None:
        return None
    try:
        return name, parse_nodelist(env[name])
    except NodelistError as e:
        raise LaunchEnvError(f"{name}: {e}") from None


def _slurm_master(env: Mapping[str, str], resolve: Callable[[str], str | None]) -> str:
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    found = _nodes(env)
    if found is None:
        raise LaunchEnvError("SLURM_PROCID is set but no node list (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or "
                             "SLURM_NODELIST) names the master node; set MASTER_ADDR")
    name, hosts = found
    addr = resolve(hosts[0])
    if not addr:
        raise LaunchEnvError(f"cannot find the address of {hosts[0]}, the first node of {name}={env[name]!r} "
                             f"(no NodeAddr from scontrol, no DNS entry); set MASTER_ADDR")
    return addr


def _from_explicit(env: Mapping[str, str]) -> DistEnv:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchEnvError(f"launcher environment is incomplete: {', '.join(missing)} not set")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    lw_name = _first(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    local_world = _int(env, lw_name) if lw_name else world
    _check_ranks(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", lw_name or "WORLD_SIZE"))
    nr_name = _first(env, "GROUP_RANK", "CROSS_RANK")
    nn_name = _first(env, "GROUP_WORLD_SIZE", "CROSS_SIZE")
    node_rank = _int(env, nr_name) if nr_name else rank // local_world
    num_nodes = _int(env, nn_name) if nn_name else -(-world // local_world)
    if not any(m in env for m in _LAUNCHER_MARKERS) and "SLURM_PROCID" in env:
        ntasks = _first(env, "SLURM_NTASKS", "SLURM_NPROCS")
        # RANK set by hand inside an srun step with one task per rank must be that task's rank.
        if ntasks and _int(env, ntasks) == world and _int(env, "SLURM_PROCID") != rank:
            raise LaunchEnvError(f"RANK={rank} contradicts SLURM_PROCID={env['SLURM_PROCID']} (both describe a job "
                                 f"of {world} processes); unset one of them")
    return DistEnv(rank, local_rank, world, local_world, env["MASTER_ADDR"], _port(env), "env", node_rank, num_nodes)


def _from_slurm(env: Mapping[str, str], resolve: Callable[[str], str | None]) -> DistEnv:
    ntasks = _first(env, "SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks is None:
        raise LaunchEnvError("SLURM_PROCID is set but SLURM_NTASKS is not: start the ranks with srun "
                             "(one task per rank) or set RANK/WORLD_SIZE")
    rank, world = _int(env, "SLURM_PROCID"), _int(env, ntasks)
    if world > 1 and _first(env, "SLURM_STEP_ID", "SLURM_STEPID") is None:
        raise LaunchEnvError(f"SLURM_PROCID={rank} and {ntasks}={world} come from the batch script, not from an srun "
                             f"step (SLURM_STEP_ID is not set): start one process per task with `srun mtx-dist "
                             f"train ...`, or start them with a launcher (mtx-dist launch)")
    if "SLURM_LOCALID" not in env:
        raise LaunchEnvError("SLURM_PROCID is set but SLURM_LOCALID is not")
    local_rank, node_rank = _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    tpn_name = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_name:
        try:
            per_node = parse_tasks_per_node(env[tpn_name])
        except NodelistError as e:
            raise LaunchEnvError(f"{tpn_name}: {e}") from None
        if sum(per_node) != world:
            raise LaunchEnvError(f"{tpn_name}={env[tpn_name]!r} adds up to {sum(per_node)} tasks but "
                                 f"{ntasks}={world}")
        if not 0 <= node_rank < len(per_node):
            raise LaunchEnvError(f"SLURM_NODEID={node_rank} is outside the {len(per_node)} nodes of "
                                 f"{tpn_name}={env[tpn_name]!r}")
        local_world, num_nodes, lw_name = per_node[node_rank], len(per_node), tpn_name
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world, lw_name = _int(env, "SLURM_NTASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE"
        num_nodes = -(-world // local_world) if local_world > 0 else 0
    else:
        local_world, num_nodes, lw_name = world, 1, ntasks
    _check_ranks(rank, world, local_rank, local_world, ("SLURM_PROCID", ntasks, "SLURM_LOCALID", lw_name))
    found = _nodes(env)
    if found and len(found[1]) < num_nodes:
        raise LaunchEnvError(f"{found[0]}={env[found[0]]!r} names {len(found[1])} nodes but {lw_name} describes "
                             f"{num_nodes}")
    return DistEnv(rank, local_rank, world, local_world, _slurm_master(env, resolve), _port(env), "slurm",
                   node_rank, num_nodes)


def _from_mpi(env: Mapping[str, str], spec: tuple, resolve: Callable[[str], str | None]) -> DistEnv:
    name, r, w, lr, lw = spec
    if w not in env:
        raise LaunchEnvError(f"{r} is set but {w} is not")
    rank, world = _int(env, r), _int(env, w)
    local_rank = _int(env, lr) if lr in env else 0
    local_world = _int(env, lw) if lw in env else 1
    _check_ranks(rank, world, local_rank, local_world, (r, w, lr, lw))
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif _nodes(env) is not None:
        addr = _slurm_master(env, resolve)
    else:
        raise LaunchEnvError(f"{name} environment ({r}={rank}, {w}={world}) names no master: set MASTER_ADDR to the "
                             f"first host's address (e.g. mpirun -x MASTER_ADDR=...)")
    return DistEnv(rank, local_rank, world, local_world, addr, _port(env), name, rank // local_world,
                   -(-world // local_world))


def discover(environ: Mapping[str, str] | None = None,
             resolve: Callable[[str], str | None] = node_address) -> DistEnv:
    """The process's place in the job. ``resolve`` maps a SLURM node name to an address (tests pass
    their own; by default scontrol's NodeAddr, then DNS)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_explicit(env)
    mpi = next((spec for spec in _MPI if spec[1] in env), None)
    if "SLURM_PROCID" in env:
        slurm = _from_slurm(env, resolve)
        if mpi is not None:
            other = _from_mpi(env, mpi, lambda _: slurm.master_addr)
            if other.world_size != slurm.world_size:
                return other  # mpirun inside an allocation: SLURM's tasks are MPI's daemons, not the ranks
            if other.rank != slurm.rank:
                raise LaunchEnvError(f"{mpi[1]}={other.rank} contradicts SLURM_PROCID={slurm.rank} (both describe a "
                                     f"job of {slurm.world_size} processes)")
        return slurm
    if mpi is not None:
        return _from_mpi(env, mpi, resolve)
    return DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")
