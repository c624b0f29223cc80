"""Attention kernels and their dispatch. A leaf package: imports torch only, and only when used.

Every transformer block calls :func:`attention` (``mtx_kernels.dispatch``); the backend is a plain string
so model code stays free of kernel details. The backend names are importable without torch (the
config validates ``model.attention`` before anything heavy loads); the functions load on first use.
"""

from __future__ import annotations

import importlib

BACKENDS = ("auto", "flash_attn", "triton", "sdpa", "math")
_LAZY = {"AttentionBackendError": "dispatch", "attention": "dispatch", "query_attention": "dispatch",
         "resolve_backend": "dispatch"}
__all__ = ["BACKENDS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
