"""Launch environment: discovery, launcher commands, preemption signals. A leaf package: standard
library only (+ torch.distributed for the preemption all-reduce)."""

from mtx_launchers.env import DistEnv, LaunchEnvError, RendezvousError, discover
from mtx_launchers.slurm import NodelistError, parse_nodelist, parse_tasks_per_node

__all__ = ["DistEnv", "LaunchEnvError", "NodelistError", "RendezvousError", "discover", "parse_nodelist",
           "parse_tasks_per_node"]
