"""Model FLOPs formula vs torch's own FLOP counter, and the peak table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mtx_dist.flops import (forward_flops_per_sample, mfu, peak_tflops, text_forward_flops, train_flops_per_sample,
                            vision_forward_flops)
from mtx_dist.models import ContrastiveModel, get_preset


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_forward_flops_equal_torch_flop_counter(preset):
    spec = get_preset(preset)
    model = ContrastiveModel(spec, attn_backend="math")  # explicit matmuls, which the counter sees on CPU
    batch = 3
    image = torch.randn(batch, 3, spec.vision.image_size, spec.vision.image_size)
    text = torch.randint(1, 1000, (batch, spec.text.context_length))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image, text)
    # torch counts causal attention in full; the formula counts only the unmasked half (the last
    # block's single end-of-text query is counted in full by both)
    t = spec.text
    causal_half = (t.layers - 1) * 2 * t.context_length ** 2 * t.width
    assert counter.get_total_flops() == batch * (forward_flops_per_sample(spec) + causal_half)
    assert forward_flops_per_sample(spec) == vision_forward_flops(spec.vision, spec.embed_dim) + \
        text_forward_flops(spec.text, spec.embed_dim)


def test_large_presets_and_mfu():
    # ViT-B/16 image tower: 17.56 G multiply-adds per image with every block run on all 197 tokens
    # (OpenCLIP's profile lists 17.58 GMACs); the last block runs proj, MLP and attention for the class
    # token alone, which skips 196 tokens' 768^2 + 2 * 768 * 3072 and 196 of 197 attention rows.
    b16 = get_preset("vit-b16")
    skipped = 196 * (768 ** 2 + 2 * 768 * 3072) + 196 * 2 * 197 * 768
    assert vision_forward_flops(b16.vision, b16.embed_dim) / 2e9 == pytest.approx(17.56 - skipped / 1e9, abs=0.01)
    assert train_flops_per_sample(b16) == 3 * forward_flops_per_sample(b16)
    assert mfu(1000.0, b16, 989.0) == pytest.approx(1000 * train_flops_per_sample(b16) / 989e12)


def test_peak_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0
    assert peak_tflops("NVIDIA GeForce RTX 3090", "bf16") is None
