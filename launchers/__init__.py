"""Launch-environment discovery. A leaf package: standard library only (+ torch.distributed)."""

from launchers.env import DistEnv, LaunchEnvError, discover

__all__ = ["DistEnv", "LaunchEnvError", "discover"]
