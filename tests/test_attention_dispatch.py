"""Attention backend dispatch: what auto picks, clear errors for backends that cannot run, logging."""

import importlib
import logging

import pytest
import torch

import kernels

attn_mod = importlib.import_module("kernels.attention")  # the module (the package exports the function)


def _qkv(dtype=torch.float32, n=9, d=16):
    torch.manual_seed(0)
    return [torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_sdpa_on_cpu(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even when the Triton interpreter could run, auto stays on SDPA
    q, _, _ = _qkv(dtype)
    assert kernels.resolve_backend("auto", q) == "sdpa"


def test_forcing_flash_attn_without_it_is_a_clear_error():
    q, k, v = _qkv(torch.bfloat16)
    with pytest.raises(kernels.AttentionBackendError,
                       match="'flash_attn' cannot run here: the flash-attn package is not installed"):
        kernels.attention(q, k, v, backend="flash_attn")


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises(kernels.AttentionBackendError, match="'triton' cannot run here: .*CUDA"):
        kernels.attention(q, k, v, backend="triton")


def test_model_level_error_names_the_backend():
    from mtx_dist.models import ContrastiveModel, get_preset
    model = ContrastiveModel(get_preset("micro"), attn_backend="flash_attn")
    image = torch.randn(1, 3, 32, 32)
    text = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(kernels.AttentionBackendError, match="flash_attn"):
        model(image, text)


def test_choice_is_logged_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_announced", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="kernels.attention"):
        for _ in range(3):
            kernels.attention(q, k, v, backend="auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels.attention"]
    assert lines == ["attention backend: sdpa (requested auto on cpu float32)"]
