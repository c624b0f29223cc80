"""One entry point for scaled dot-product attention, with selectable backends.

Backends (``model.attention``):
  * ``flash_attn`` -- the flash-attn package's ``flash_attn_func`` (CUDA, fp16/bf16; optional extra).
  * ``triton``     -- our FlashAttention-2 Triton kernel (mtx_kernels.triton_attention): CUDA, or CPU
    tensors under ``TRITON_INTERPRET=1`` (how CI checks it).
  * ``sdpa``       -- ``torch.nn.functional.scaled_dot_product_attention`` (fused where torch has a
    fused kernel for the device and dtype; the math kernel otherwise).
  * ``math``       -- the explicit softmax(QK^T / sqrt(d)) V reference, used by tests.
  * ``auto``       -- flash_attn when it can run (installed, CUDA, fp16/bf16), else sdpa (whose
    CUDA kernels are FlashAttention-2 and memory-efficient attention, and which inductor traces);
    on a CPU float32 input while float32 matmuls may use bf16 (``torch.set_float32_matmul_precision
    ("medium")``), math: torch's fused CPU kernel then runs several times slower than two batched
    matmuls (a ``tiny``-preset training step: 375 ms against 141 ms, 2-core AMX CPU, 2026-12-03).
    Our Triton kernel runs only when asked for by name, until a GPU measurement shows it beats
    SDPA (bench/gpu_suite.sh measures both).

The backend that runs is logged once per process for each (requested, chosen) pair, so a log
shows what actually ran. An explicitly requested backend that cannot run on the given inputs
raises :class:`AttentionBackendError` saying why, rather than silently falling back.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

from mtx_kernels import BACKENDS
_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """Raised when a requested attention backend cannot run on the given inputs."""


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _flash_attn_problem(q: torch.Tensor) -> str | None:
    """Why flash-attn cannot run on ``q`` (None when it can)."""
    if not _installed("flash_attn"):
        return "the flash-attn package is not installed (pip install 'mtx-dist[flash]' on a CUDA machine)"
    if q.device.type != "cuda":
        return f"flash-attn runs on CUDA tensors only, got {q.device.type}"
    if q.dtype not in _HALF:
        return f"flash-attn needs fp16 or bf16 inputs, got {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"flash-attn supports head dims that are multiples of 8 up to 256, got {q.shape[-1]}"
    return None


def _triton_problem(q: torch.Tensor) -> str | None:
    if not _installed("triton"):
        return "the triton package is not installed"
    from mtx_kernels.triton_attention import triton_available
    ok, why = triton_available(q.device)
    return None if ok else why


_PROBLEMS = {"flash_attn": _flash_attn_problem, "triton": _triton_problem}
_announced: set[tuple[str, str]] = set()


def resolve_backend(backend: str, q: torch.Tensor | None = None) -> str:
    """The backend that will run for a configured name (possibly ``auto``) on inputs like ``q``.

    Without ``q`` only the name is checked and ``auto`` resolves as on a CPU fp32 input.
    """
    if backend not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        chosen = "sdpa"
        if q is not None and q.device.type == "cuda" and _flash_attn_problem(q) is None:
            chosen = "flash_attn"
        elif (q is not None and q.device.type == "cpu" and q.dtype == torch.float32
              and torch.backends.mkldnn.matmul.fp32_precision == "bf16"):
            chosen = "math"
    else:
        chosen = backend
        problem = _PROBLEMS[backend](q) if backend in _PROBLEMS and q is not None else None
        if problem:
            raise AttentionBackendError(f"attention backend {backend!r} cannot run here: {problem}")
    if (backend, chosen) not in _announced and not torch.compiler.is_compiling():  # no side effect in a graph
        _announced.add((backend, chosen))
        where = "" if q is None else f" on {q.device.type} {str(q.dtype).removeprefix('torch.')}"
        log.info("attention backend: %s (requested %s%s)", chosen, backend, where)
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


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func
    # flash-attn takes (B, N, H, D); these transposes are views (the head dim stays unit-stride).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from mtx_kernels.triton_attention import triton_attention
    return triton_attention(q, k, v, causal=causal)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


_RUN = {"flash_attn": _flash_attn, "triton": _triton, "sdpa": _sdpa, "math": math_attention}


def query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    limit: torch.Tensor | int | None = None) -> torch.Tensor:
    """Attention of ONE query per row: q (B, H, 1, D) over k, v (B, H, N, D) -> (B, H, 1, D).

    ``limit``: the query's own position (an int for every row, or a (B,) tensor), under a causal mask:
    keys after it are not attended; None: every key is. A transformer's last block uses it when only
    one token's output is read (the class token, the text's end-of-text token): that token's output
    equals the full block's, at 1/N of the attention and MLP work. One query gives no work to fuse,
    so two small batched matmuls serve every device and dtype (in float32, as :func:`math_attention`);
    the backends stay for the full blocks."""
    if q.dim() != 4 or q.shape[2] != 1 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"query_attention expects q (B, H, 1, D) and k, v (B, H, N, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    # In float32 throughout (bf16 inputs too, and outside autocast), as fused kernels keep their scores:
    # with one query the casts cost little; on float32 inputs .float() is no copy.
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, 1, N)
        if limit is not None:
            keys = torch.arange(k.shape[2], device=k.device)
            # (B or 1, 1, 1, N), broadcast over heads; an int limit stays a scalar (no host-to-device copy)
            allowed = keys <= (limit if isinstance(limit, int) else limit.reshape(-1, 1, 1, 1))
            scores = scores.masked_fill(~allowed.reshape(-1, 1, 1, k.shape[2]), float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v.float())
    return out.to(v.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (batch, heads, tokens, head_dim)."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"attention expects equal (B, H, N, D) shapes, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return _RUN[resolve_backend(backend, q)](q, k, v, causal)
