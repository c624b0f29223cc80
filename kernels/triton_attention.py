"""Fused scaled dot-product attention in Triton (FlashAttention-2 algorithm), forward and backward.

Forward: each program owns one tile of BLOCK_M query rows of one (batch, head) and walks over the
keys in tiles of BLOCK_N. It keeps a running row maximum ``m``, a running denominator ``l`` and an
unnormalised output accumulator; when a new tile raises the maximum, the old ``l`` and accumulator
are rescaled by ``exp(m_old - m_new)`` ("online softmax"). Scores only ever exist as one
BLOCK_M x BLOCK_N tile in registers, never as an N x N matrix in memory. Besides the output it saves
one float per query row, the logsumexp of the scaled scores.

Backward: with that logsumexp, ``P = exp(S - lse)`` is recomputed tile by tile from q and k, so the
memory saved for backward is O(N * D): q, k, v (held by autograd anyway), the output and the
logsumexp. Using ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)`` (a small preprocess
kernel), two kernels finish the job without atomics, hence deterministically:
  * dK/dV: a program owns a key tile and loops over query tiles;
  * dQ:    a program owns a query tile and loops over key tiles.
Causal masking (query i sees keys j <= i) skips tiles that are masked entirely: the forward and dQ
loops stop at the diagonal, the dK/dV loop starts there.

Exponentials use exp2 with log2(e) folded into the softmax scale (exp2 is the native instruction);
the saved logsumexp is therefore in base 2. Any sequence length works through masked loads; the head
dimension is padded to a power of two inside the kernel only (masked on the D axis), never in memory.
Accumulation is float32 for every input dtype. ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors
(slowly; used by tests); it must be set before this module is imported, since ``triton.jit`` reads it.
"""

# Annotations stay strings, so this module imports without triton; Triton parses "tl.constexpr".
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the module still imports, so triton_available() can explain why not
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = ""

_jit = triton.jit if triton is not None else (lambda fn: fn)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256  # beyond this, tiles no longer fit in shared memory / registers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(True, "") if the Triton kernels can run on tensors of ``device``, else (False, reason)."""
    if triton is None:
        return False, _IMPORT_ERROR
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpreted():
        return True, ""
    return False, f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


class _Config(NamedTuple):
    fwd_m: int  # forward: query rows per program
    fwd_n: int  # forward: key rows per loop step
    fwd_warps: int
    fwd_stages: int
    bwd_own: int  # backward: rows a program owns (keys for dK/dV, queries for dQ)
    bwd_step: int  # backward: rows per loop step (queries for dK/dV, keys for dQ)
    bwd_warps: int
    bwd_stages: int


def _config(block_d: int, fp32: bool) -> _Config:
    """Tile sizes and launch options. GPU values were checked by compiling for sm_90: no register
    spills and at most ~100 KB of shared memory (H100 allows 227 KB per block)."""
    if _interpreted():
        # Small and unequal blocks: fast on CPU, and several partial / diagonal tiles in tests.
        return _Config(16, 32, 4, 1, 32, 16, 4, 1)
    if not fp32:  # fp16/bf16 on tensor cores; fp32 accumulators in registers bound the tiles
        if block_d <= 64:
            return _Config(128, 64, 4, 3, 128, 32, 8, 3)
        if block_d <= 128:
            return _Config(128, 32, 8, 3, 64, 32, 8, 2)
        return _Config(32, 32, 8, 2, 32, 32, 8, 2)
    # fp32 runs as exact fp32 products on CUDA cores, which need far more registers: small tiles.
    if block_d <= 64:
        return _Config(64, 32, 8, 2, 32, 32, 8, 2)
    if block_d <= 128:
        return _Config(32, 16, 8, 2, 32, 16, 8, 2)
    return _Config(16, 16, 8, 1, 32, 16, 8, 1)


@_jit
def _fwd_kernel(Q, K, V, O, LSE, N, D, qk_scale, n_tiles,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # 1-D grid over (batch*head, query tile): no 65535 limit on grid axis 1, and neighbouring
    # programs share K/V of one head (L2 reuse). In causal mode the longest rows start first.
    pid = tl.program_id(0)
    bh = pid // n_tiles
    tile = pid % n_tiles
    if CAUSAL:
        tile = n_tiles - 1 - tile
    base = bh.to(tl.int64) * N * D  # int64: B*H*N*D may exceed 2**31
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < N) & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: key tiles beyond this tile's last query are fully masked; don't visit them.
    hi = tl.minimum(N, (tile + 1) * BLOCK_M) if CAUSAL else N
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < N) & d_ok[None, :]
        k = tl.load(K + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION) * qk_scale  # log2 units
        valid = cols[None, :] < N
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # Every row has at least one valid key (key 0), so m_new is finite and no NaN appears.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    row_ok = offs_m < N
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@_jit
def _bwd_delta_kernel(O, DO, DELTA, N, D, n_tiles, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the row term of the softmax gradient.
    pid = tl.program_id(0)
    bh = pid // n_tiles
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    ptrs = bh.to(tl.int64) * N * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@_jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, N, D, qk_scale, sm_scale, n_tiles,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # One program per key tile; works in the transposed frame (keys x queries), so that
    # dV = P^T dO and dK = dS^T Q need no transpose of the recomputed probabilities.
    pid = tl.program_id(0)
    bh = pid // n_tiles
    start_n = (pid % n_tiles) * BLOCK_N
    base = bh.to(tl.int64) * N * D
    row_base = bh.to(tl.int64) * N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < N) & d_ok[None, :]
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Causal: queries before this key tile's first key never see it; start at its query tile.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, N, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + base + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + base + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q).to(k.dtype), input_precision=PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])  # P^T recomputed from the saved logsumexp
        valid = row_ok[None, :] & (offs_n[:, None] < N)
        if CAUSAL:
            valid = valid & (rows[None, :] >= offs_n[:, None])
        p_t = tl.where(valid, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do).to(v.dtype), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dk = dk * sm_scale  # S = scale * q k^T, so dK carries the scale once
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N, D, qk_scale, sm_scale, n_tiles,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # One program per query tile, looping over key tiles (the forward's access pattern).
    pid = tl.program_id(0)
    bh = pid // n_tiles
    tile = pid % n_tiles
    if CAUSAL:
        tile = n_tiles - 1 - tile
    base = bh.to(tl.int64) * N * D
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < N
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = tl.minimum(N, (tile + 1) * BLOCK_M) if CAUSAL else N
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < N) & d_ok[None, :]
        k = tl.load(K + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        valid = row_ok[:, None] & (cols[None, :] < N)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v).to(do.dtype), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


def _launch_params(q: torch.Tensor) -> tuple[int, int, int, int, _Config, str]:
    b, h, n, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16
    # fp32 stays fp32 (no silent TF32 on tensor cores), as torch matmul does by default;
    # for 16-bit inputs the option is ignored.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return b * h, n, d, block_d, _config(block_d, q.dtype == torch.float32), precision


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        bh, n, d, block_d, cfg, prec = _launch_params(q)
        o = torch.empty_like(q)
        lse = torch.empty((bh, n), device=q.device, dtype=torch.float32)
        n_tiles = triton.cdiv(n, cfg.fwd_m)
        _fwd_kernel[(bh * n_tiles,)](
            q, k, v, o, lse, n, d, scale * _LOG2E, n_tiles,
            CAUSAL=causal, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=block_d, PRECISION=prec,
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, o, lse = ctx.saved_tensors
        do = grad_out.contiguous()
        bh, n, d, block_d, cfg, prec = _launch_params(q)
        delta = torch.empty_like(lse)
        n_tiles = triton.cdiv(n, cfg.bwd_own)
        _bwd_delta_kernel[(bh * n_tiles,)](o, do, delta, n, d, n_tiles,
                                           BLOCK_M=cfg.bwd_own, BLOCK_D=block_d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = {"CAUSAL": ctx.causal, "BLOCK_D": block_d, "PRECISION": prec,
                  "num_warps": cfg.bwd_warps, "num_stages": cfg.bwd_stages}
        _bwd_dkdv_kernel[(bh * n_tiles,)](
            q, k, v, do, lse, delta, dk, dv, n, d, ctx.scale * _LOG2E, ctx.scale, n_tiles,
            BLOCK_M=cfg.bwd_step, BLOCK_N=cfg.bwd_own, **common)
        _bwd_dq_kernel[(bh * n_tiles,)](
            q, k, v, do, lse, delta, dq, n, d, ctx.scale * _LOG2E, ctx.scale, n_tiles,
            BLOCK_M=cfg.bwd_own, BLOCK_N=cfg.bwd_step, **common)
        return dq, dk, dv, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v for q, k, v of equal shape (B, H, N, D); output in q's dtype."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"triton_attention expects equal (B, H, N, D) shapes, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"triton_attention needs one dtype among float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"triton_attention supports head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}")
    ok, why = triton_available(q.device)
    if not ok:
        raise RuntimeError(why)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0:
        return torch.empty_like(q)
    if q.dtype == torch.bfloat16 and _interpreted():
        # The interpreter cannot compute in bf16 (triton issue #11584): run fp32, round the result.
        out = _TritonAttention.apply(q.float().contiguous(), k.float().contiguous(),
                                     v.float().contiguous(), causal, scale)
        return out.to(q.dtype)
    return _TritonAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), causal, scale)
