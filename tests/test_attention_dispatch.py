"""Attention backend dispatch: what auto picks, clear errors for backends that cannot run, logging."""

import importlib
import logging

import pytest
import torch

import mtx_kernels

attn_mod = importlib.import_module("mtx_kernels.dispatch")


def _qkv(dtype=torch.float32, n=9, d=16):
    torch.manual_seed(0)
    return [torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_sdpa_on_cpu(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even when the Triton interpreter could run, auto stays on SDPA
    q, _, _ = _qkv(dtype)
    assert mtx_kernels.resolve_backend("auto", q) == "sdpa"


def test_auto_takes_math_on_cpu_float32_when_matmuls_may_use_bf16():
    q32, _, _ = _qkv(torch.float32)
    q16, _, _ = _qkv(torch.bfloat16)
    torch.set_float32_matmul_precision("medium")  # restored after the test (conftest)
    assert mtx_kernels.resolve_backend("auto", q32) == "math"
    assert mtx_kernels.resolve_backend("auto", q16) == "sdpa"
    torch.set_float32_matmul_precision("high")
    assert mtx_kernels.resolve_backend("auto", q32) == "sdpa"


def test_auto_on_cuda_is_flash_attn_when_it_can_run_else_sdpa_never_triton(monkeypatch):
    """On a GPU machine (the device checks stubbed: no GPU here) auto takes flash-attn when it can
    run and SDPA otherwise, even where our Triton kernel could run: that one is used only by name."""
    q = torch.empty(1, 2, 9, 64, dtype=torch.bfloat16, device="meta")
    cuda_q = type("CudaLike", (), {"device": torch.device("cuda"), "dtype": q.dtype, "shape": q.shape})()
    monkeypatch.setattr(attn_mod, "_triton_problem", lambda q: None)  # as where our Triton kernel can run
    monkeypatch.setattr(attn_mod, "_flash_attn_problem", lambda q: "not installed")
    assert mtx_kernels.resolve_backend("auto", cuda_q) == "sdpa"
    monkeypatch.setattr(attn_mod, "_flash_attn_problem", lambda q: None)
    assert mtx_kernels.resolve_backend("auto", cuda_q) == "flash_attn"


def test_forcing_flash_attn_without_it_is_a_clear_error():
    q, k, v = _qkv(torch.bfloat16)
    with pytest.raises(mtx_kernels.AttentionBackendError,
                       match="'flash_attn' cannot run here: the flash-attn package is not installed"):
        mtx_kernels.attention(q, k, v, backend="flash_attn")


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises(mtx_kernels.AttentionBackendError, match="'triton' cannot run here: .*CUDA"):
        mtx_kernels.attention(q, k, v, backend="triton")


def test_model_level_error_names_the_backend():
    from mtx_dist.models import ContrastiveModel, get_preset
    model = ContrastiveModel(get_preset("micro"), attn_backend="flash_attn")
    image = torch.randn(1, 3, 32, 32)
    text = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(mtx_kernels.AttentionBackendError, match="flash_attn"):
        model(image, text)


def test_choice_is_logged_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_announced", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="mtx_kernels.dispatch"):
        for _ in range(3):
            mtx_kernels.attention(q, k, v, backend="auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "mtx_kernels.dispatch"]
    assert lines == ["attention backend: sdpa (requested auto on cpu float32)"]


MODEL_CHECK = """
import torch
from mtx_dist.models import ContrastiveModel, get_preset
torch.manual_seed(0)
ours = ContrastiveModel(get_preset("micro"), "triton")
ref = ContrastiveModel(get_preset("micro"), "sdpa")
ref.load_state_dict(ours.state_dict())
image = torch.randn(2, 3, 32, 32)
text = torch.randint(1, 1000, (2, 16))
text[:, -1] = 49407
a, b = ours(image, text), ref(image, text)
(a[0].sum() + a[1].sum()).backward()
(b[0].sum() + b[1].sum()).backward()
# relative to the magnitudes compared: features are unit vectors, gradients are scaled by their largest entry
feat = max(float(((x - y).abs().max() / y.abs().max()).detach()) for x, y in zip(a[:2], b[:2]))
grad = max(float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12))
           for p, q in zip(ours.parameters(), ref.parameters()) if p.grad is not None)
print(feat, grad)
"""


def test_model_with_the_triton_backend_equals_sdpa():
    """The whole contrastive model (causal text tower included) through the dispatcher's Triton path,
    in Triton's interpreter in a fresh process (the interpreter is chosen when the kernels are defined)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    res = subprocess.run([sys.executable, "-c", MODEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    feat, grad = map(float, res.stdout.split())
    # Relative errors. Features: one forward, ~1e-6 here. Gradients pass backward through both towers,
    # and Triton's interpreter (numpy) sums in another order than the CPU BLAS: 1.3e-6 on one machine,
    # 1.05e-5 on another; a wrong kernel is off by O(1), so 1e-4 still tells them apart.
    assert feat < 1e-5 and grad < 1e-4, (feat, grad)
