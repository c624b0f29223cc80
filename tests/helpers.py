"""Helpers shared by the tests.

torchvision has no CPU build on PyPI; the CUDA wheel installs but its import fails on a CPU torch
because the ``torchvision::nms`` operator schema is missing. Tests that import timm or open_clip
(interop references only; the package itself never needs torchvision) define those schemas first.
"""

from __future__ import annotations

import os
import subprocess
import sys

from launchers.env import DIST_VARS  # noqa: F401 (the tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_torchvision_shim = None


def torchvision_shim() -> None:
    global _torchvision_shim
    if _torchvision_shim is not None or "torchvision" in sys.modules:
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_shim = lib  # keep the library object alive for the session




def run_cli(args: list[str], cwd: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``mtx-dist`` as a user would (a fresh interpreter), with a hard timeout. Launcher variables
    that an in-process test left in this interpreter's environment are not passed on."""
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    full_env = {**base, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mtx_dist.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
