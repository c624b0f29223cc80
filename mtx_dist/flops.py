"""Model FLOPs per sample and model FLOPs utilization (MFU).

Counting (a multiply-add is 2 FLOPs; only matmuls are counted, as in the PaLM/Megatron MFU
convention; norms, softmax, GELU and the loss's B x N logits are left out):

  per tower layer and token   2 * (4 w^2 + 2 w h)        qkv (3 w^2), proj (w^2), fc1 and fc2 (w h each)
  attention per layer         4 n^2 w                    QK^T and AV; halved for the causal text tower
  last layer                  2 * 3 w^2 n + 2 * (w^2 + 2 w h) + 4 n w
                                                         keys and values (and queries) of every token,
                                                         then attention, proj and MLP of the pooled
                                                         token alone (Block.forward's ``at``)
  vision patch embedding      2 * g^2 * (3 p^2) * w      g^2 patches of 3 p^2 values each
  output projections          2 * w * embed_dim          one pooled token per tower

with width w, MLP width h = w * mlp_ratio, n tokens, grid g, patch p. A training step costs
3x the forward (the backward is two matmuls per forward matmul); activation recomputation is
*not* counted, so MFU stays comparable with and without activation checkpointing.
"""

from __future__ import annotations

from mtx_dist.models.presets import ModelSpec, TextSpec, VisionSpec

# Dense peak TFLOP/s per device (vendor datasheets): bf16 tensor cores, and TF32 for fp32 training.
PEAK_TFLOPS = {
    "bf16": {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0},
    "fp32": {"H100 PCIe": 378.0, "H100": 494.5, "H200": 494.5, "GH200": 494.5, "A100": 156.0},
}


def _tower_forward(width: int, layers: int, mlp_ratio: float, tokens: float, causal: bool) -> float:
    hidden = int(width * mlp_ratio)
    per_token = 2 * (width * width + 2 * width * hidden)  # proj, fc1, fc2
    qkv = 2 * 3 * width * width * tokens
    attn = 4 * tokens * tokens * width * (0.5 if causal else 1.0)
    last = qkv + per_token + 4 * tokens * width  # only the pooled token's query, proj and MLP
    return (layers - 1) * (qkv + per_token * tokens + attn) + last


def vision_forward_flops(v: VisionSpec, embed_dim: int, tokens: float | None = None,
                         grid: int | None = None) -> float:
    """``tokens``: those the blocks see, when fewer than 1 + grid^2 (FLIP patch dropout); ``grid``: the
    patch grid embedded, when the image is smaller than the preset's (low-resolution training)."""
    patch = 2 * (v.grid if grid is None else grid) ** 2 * 3 * v.patch_size ** 2 * v.width
    n = v.tokens if tokens is None else tokens
    return patch + _tower_forward(v.width, v.layers, v.mlp_ratio, n, False) + 2 * v.width * embed_dim


def text_forward_flops(t: TextSpec, embed_dim: int, tokens: float | None = None) -> float:
    """``tokens``: the padded text length actually run, when shorter than the context (trimmed batches)."""
    n = t.context_length if tokens is None else tokens
    return _tower_forward(t.width, t.layers, t.mlp_ratio, n, True) + 2 * t.width * embed_dim


def forward_flops_per_sample(spec: ModelSpec, vision_tokens: float | None = None,
                             text_tokens: float | None = None, grid: int | None = None) -> float:
    return (vision_forward_flops(spec.vision, spec.embed_dim, vision_tokens, grid)
            + text_forward_flops(spec.text, spec.embed_dim, text_tokens))


def train_flops_per_sample(spec: ModelSpec, vision_tokens: float | None = None,
                           text_tokens: float | None = None, grid: int | None = None) -> float:
    """Model FLOPs of one sample's training step, for the tokens actually computed (MFU of a trimmed or
    patch-dropped step counts the work done, not the work avoided)."""
    return 3 * forward_flops_per_sample(spec, vision_tokens, text_tokens, grid)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Datasheet peak for a device name as torch reports it (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    table = PEAK_TFLOPS["bf16" if precision == "amp_bf16" else precision]  # autocast's matmuls run in bf16
    for key in sorted(table, key=len, reverse=True):  # 'H100 PCIe' before 'H100'
        if all(part in device_name for part in key.split()):
            return table[key]
    return None


def mfu(samples_per_s_per_device: float, spec: ModelSpec, peak: float) -> float:
    """Fraction of ``peak`` TFLOP/s that the model's training FLOPs reach."""
    return samples_per_s_per_device * train_flops_per_sample(spec) / (peak * 1e12)
