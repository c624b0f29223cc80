"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

from mtx_launchers.env import DIST_VARS  # noqa: F401 (the tests import it from here)
from mtx_dist.interop.torchvision_shim import torchvision_shim  # noqa: F401 (likewise)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_env(**extra: str) -> dict[str, str]:
    """This environment for a fresh interpreter running this checkout: without the launcher variables an
    in-process test left in it, with ``PYTHONPATH`` at the repository."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONPATH": REPO, **extra}


def run_cli(args: list[str], cwd: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``mtx-dist`` as a user would (a fresh interpreter), with a hard timeout. Launcher variables
    that an in-process test left in this interpreter's environment are not passed on."""
    full_env = fresh_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "mtx_dist.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (VmHWM). Not ru_maxrss: that
    also counts the parent's memory at the fork before exec, so a child of a large test process
    reports the parent's size (a pytest session grows past 1 GiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
