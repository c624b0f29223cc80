"""Contrastive losses on normalized features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy of image->text and text->image over scaled cosine logits.

    Features are expected L2-normalized; pair i of the batch is the positive of row/column i.
    Computed in float32 whatever the training precision, since the softmax over the batch is where
    bf16 rounding hurts most.
    """
    img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
    logits = scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


LOSSES = {"clip": clip_loss}
