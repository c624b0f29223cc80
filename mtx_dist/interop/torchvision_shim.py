"""torchvision has no CPU build on PyPI; the CUDA wheel installs but its import fails on a CPU torch
because the ``torchvision::nms`` operator schema is missing. Tests and benchmarks that import timm
or open_clip (interop references only; the package itself never needs torchvision) define those
schemas first.
"""

from __future__ import annotations

import sys

_torchvision_shim = None


def torchvision_shim() -> None:
    """Define torchvision's operator schemas unless torchvision is imported already (idempotent)."""
    global _torchvision_shim
    if _torchvision_shim is not None or "torchvision" in sys.modules:
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_shim = lib  # keep the library object alive for the session
