"""The Triton fused attention against the float32 math reference, run on CPU by Triton's interpreter.

``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, not when it launches one. Setting
the variable for the whole session would leak into every other test (and, on a GPU machine, would
turn the shared ``mtx_kernels.triton_attention`` into interpreted kernels). So this file executes a
private copy of that module with the variable set, and sets it again around each test only.
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from mtx_kernels.dispatch import math_attention

_SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "triton_attention.py"


def _load_interpreted():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_triton_attention_interpreted", _SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


_interpreted = _load_interpreted()
triton_attention, triton_available = _interpreted.triton_attention, _interpreted.triton_available


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the wrapper checks it at call time (CPU tensors)


# Measured max abs errors (output and dq/dk/dv, cases below): fp32 3.8e-6 (summation order only),
# fp16 1.7e-3 (P and dS are rounded to fp16 before their matmuls, results to fp16), bf16 8.6e-3.
# Tolerances leave >= 3x headroom; a masking or scaling bug gives errors of order 1e-1 or more.
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    # bf16 (computed in fp32 by the interpreter, results rounded to bf16: 8 bits of mantissa).
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}


def _inputs(n, d, dtype, b=1, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(4))
    return q, k, v, grad


def _check(q, k, v, grad, causal, scale=None):
    """Forward and backward of triton_attention vs math_attention on float32 copies."""
    tq, tk, tv = (x.clone().requires_grad_() for x in (q, k, v))
    out = triton_attention(tq, tk, tv, causal=causal, scale=scale)
    out.backward(grad)

    rq, rk, rv = (x.detach().float().requires_grad_() for x in (q, k, v))
    # math_attention uses 1/sqrt(D); a different scale is the same as scaling q.
    factor = 1.0 if scale is None else scale * math.sqrt(q.shape[-1])
    ref = math_attention(rq * factor, rk, rv, causal)
    ref.backward(grad.float())

    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOL[q.dtype]
    for name, got, want in (("out", out, ref), ("dq", tq.grad, rq.grad), ("dk", tk.grad, rk.grad),
                            ("dv", tv.grad, rv.grad)):
        assert got.dtype == q.dtype, name
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("n", [1, 77, 128, 197])
def test_fp32_matches_reference(n, d, causal):
    _check(*_inputs(n, d, torch.float32), causal)


# fp16 on the ragged lengths only (the aligned 128 is covered by fp32), to keep the file fast.
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("n", [1, 77, 197])
def test_fp16_matches_reference(n, d, causal):
    _check(*_inputs(n, d, torch.float16), causal)


def test_bf16_matches_reference():
    _check(*_inputs(77, 64, torch.bfloat16), causal=True)


@pytest.mark.parametrize("d", [16, 128])
def test_other_head_dims(d):
    _check(*_inputs(50, d, torch.float32, h=1), causal=True)


def test_explicit_scale():
    _check(*_inputs(77, 64, torch.float32, h=1), causal=False, scale=0.3)


def test_non_contiguous_inputs():
    # (B, N, H, D) projections viewed as (B, H, N, D): the usual layout after a qkv split.
    g = torch.Generator().manual_seed(1)
    q, k, v, grad = (torch.randn(2, 40, 3, 64, generator=g).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    _check(q, k, v, grad, causal=True)


def test_wrong_shape_raises():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError):
        triton_attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError):
        triton_attention(q[0], q[0], q[0])


def test_available_under_interpreter():
    assert triton_available(torch.device("cpu")) == (True, "")
