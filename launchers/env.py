"""Where am I? Rank, world size and rendezvous address from the launcher's environment.

torchrun and the deepspeed launcher both export RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. With none of them set, this is a single process and a free loopback
port is chosen for the (one-member) process group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass


class LaunchEnvError(RuntimeError):
    """Launcher variables that are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # which launcher the values came from

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
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise LaunchEnvError(f"launcher environment is incomplete: {', '.join(missing)} not set")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if not 0 <= rank < world:
            raise LaunchEnvError(f"RANK={rank} is outside WORLD_SIZE={world}")
        if not 0 <= local_rank < local_world:
            raise LaunchEnvError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
        return DistEnv(rank, local_rank, world, local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "env")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")
