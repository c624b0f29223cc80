"""Synthetic image-text batches for benchmarks and tests: no data, no loader, the same bytes every time."""

from __future__ import annotations

import torch

from mtx_dist.models.presets import ModelSpec

EOT = 49407  # CLIP's end-of-text id (the largest), where the text tower pools


def synthetic_pairs(spec: ModelSpec, n: int, step: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of ``n`` image-text pairs for ``step``: images randn at the preset's size,
    captions of random ids and lengths ending in EOT, zero padded to the context. Two batches alternate
    with the step's parity, so that a few steps of training visibly lower the loss."""
    g = torch.Generator().manual_seed(seed + step % 2)
    size, ctx = spec.vision.image_size, spec.text.context_length
    image = torch.randn(n, 3, size, size, generator=g)
    lengths = torch.randint(2, ctx, (n,), generator=g)
    text = torch.randint(1, 49000, (n, ctx), generator=g)
    pos = torch.arange(ctx)
    text = torch.where(pos < lengths[:, None], text, torch.zeros_like(text))
    text[torch.arange(n), lengths - 1] = EOT
    return image, text
