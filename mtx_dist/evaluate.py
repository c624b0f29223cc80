"""Held-out image<->text retrieval."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of image->text and text->image, pair i being the match of item i."""
    sim = image_features.float() @ text_features.float().t()
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for name, scores in (("i2t", sim), ("t2i", sim.t())):
        # rank of the true match = how many other candidates score at least as high (ties count
        # against the match, so a collapsed model with identical features scores 0, not 1)
        true = scores[target, target].unsqueeze(1)
        rank = (scores >= true).sum(dim=1) - 1
        for k in ks:
            if k <= n:
                out[f"{name}_recall_at_{k}"] = (rank < k).float().mean().item()
    return out


@torch.no_grad()
def embed_split(model: nn.Module, loader, device: torch.device, dtype: torch.dtype,
                group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized image and text features of every sample this rank reads, gathered over ``group``
    (the data-parallel group: tensor-parallel peers read the same samples)."""
    images, texts = [], []
    for batch in loader:
        image = batch["image"].to(device, dtype, non_blocking=True)
        text = batch["text"].to(device, non_blocking=True)
        img, txt, *_ = model(image, text)
        images.append(img.float().cpu()), texts.append(txt.float().cpu())
    local = (torch.cat(images), torch.cat(texts))
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
