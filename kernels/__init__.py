"""Attention kernels and their dispatch. A leaf package: imports torch only.

Every transformer block calls :func:`attention`; the backend is a plain string so
model code stays free of kernel details.
"""

from kernels.attention import BACKENDS, AttentionBackendError, attention, resolve_backend

__all__ = ["BACKENDS", "AttentionBackendError", "attention", "resolve_backend"]
