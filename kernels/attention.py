"""One entry point for scaled dot-product attention, with selectable backends.

Backends:
  * ``sdpa`` -- ``torch.nn.functional.scaled_dot_product_attention`` (fused where torch has a
    fused kernel for the device and dtype; the math kernel otherwise).
  * ``math`` -- the explicit softmax(QK^T / sqrt(d)) V reference, used by tests.
  * ``auto`` -- the best available backend for the inputs (``sdpa`` for now).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "math")


class AttentionBackendError(RuntimeError):
    """Raised when a requested attention backend cannot run on the given inputs."""


_announced: set[str] = set()


def resolve_backend(backend: str) -> str:
    """Map a configured backend name (possibly ``auto``) to the backend that will run."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    chosen = "sdpa" if backend == "auto" else backend
    if chosen not in _announced:  # once per process, so a log shows what actually ran
        _announced.add(chosen)
        log.info("attention backend: %s (requested %s)", chosen, backend)
    return chosen


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Reference attention on (B, H, N, D) tensors, computed in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (batch, heads, tokens, head_dim)."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"attention expects equal (B, H, N, D) shapes, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    chosen = resolve_backend(backend)
    if chosen == "math":
        return math_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
