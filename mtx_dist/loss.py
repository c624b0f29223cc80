"""Contrastive losses whose negatives span the global batch of the data-parallel group.

Every loss here, evaluated on each data-parallel rank's local batch and followed by DeepSpeed's
gradient averaging over that group, gives the value (after averaging the per-rank values) and
the parameter gradients of the single-process loss on the concatenated global batch. All math is
float32 whatever the training precision: the softmax / sigmoid over the batch is where bf16
rounding hurts most.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtx_dist.parallel.collectives import (all_gather_no_grad, all_gather_with_grad, group_rank, group_size,
                                           ring_pass)

SIGLIP_SCALE_INIT = math.log(10.0)  # SigLIP (Zhai et al. 2023): t' = log 10, b = -10
SIGLIP_BIAS_INIT = -10.0


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on one process: pair i is the positive of row/column i."""
    img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
    logits = scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class ClipLoss(nn.Module):
    """CLIP's InfoNCE with negatives from every data-parallel rank.

    ``gather_with_grad``: gather features with a differentiable all-gather, so that the gradient of
    our features as *negatives* in other ranks' logits comes back to us. Without it (OpenCLIP's
    default) that part is dropped and the gradient is only an approximation of the global-batch
    one. ``local_loss``: each rank scores only its own B rows against all N columns (B x N logits
    instead of N x N); with gather_with_grad this is still exact, and the memory and FLOPs of the
    logits shrink by the number of ranks.
    """

    def __init__(self, group=None, gather_with_grad: bool = True, local_loss: bool = True) -> None:
        super().__init__()
        self.group, self.gather_with_grad, self.local_loss = group, gather_with_grad, local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        world = group_size(self.group)
        if world == 1:
            return clip_loss(image_features, text_features, logit_scale)
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        all_img, all_txt = gather(img, self.group), gather(txt, self.group)
        b = img.shape[0]
        if self.local_loss:
            logits_i2t, logits_t2i = scale * img @ all_txt.t(), scale * txt @ all_img.t()
            labels = torch.arange(b, device=img.device) + b * group_rank(self.group)
        else:
            logits_i2t = scale * all_img @ all_txt.t()
            logits_t2i = logits_i2t.t()
            labels = torch.arange(b * world, device=img.device)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def _sigmoid_terms(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   positives: bool) -> torch.Tensor:
    logits = scale * img @ txt.t() + bias
    if positives:  # +1 on the diagonal (matching pairs), -1 elsewhere
        labels = 2 * torch.eye(img.shape[0], txt.shape[0], device=img.device, dtype=logits.dtype) - 1
    else:
        labels = -torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss on one process: -(1/N) sum_ij log sigmoid(y_ij (s x_i.t_j + b))."""
    return _sigmoid_terms(image_features.float(), text_features.float(), logit_scale.float(), logit_bias.float(),
                          positives=True)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) with a learnable bias.

    Instead of all-gathering N text features, each rank scores its images against its own texts,
    then passes the text block it holds to the next rank around the ring, W - 1 times: peak memory
    is one B x B logit block and B x D of received features, and each step's transfer can overlap
    the next block's matmul. The exchange is differentiable; gradients travel back around the ring.
    """

    def __init__(self, group=None) -> None:
        super().__init__()
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs the model's logit_bias (build the model with loss.kind='siglip')")
        img, txt = image_features.float(), text_features.float()
        scale, bias = logit_scale.float(), logit_bias.float()
        loss = _sigmoid_terms(img, txt, scale, bias, positives=True)
        for _ in range(group_size(self.group) - 1):
            txt = ring_pass(txt, self.group)
            loss = loss + _sigmoid_terms(img, txt, scale, bias, positives=False)
        return loss


SINGLE_PROCESS_LOSSES = {"clip": lambda img, txt, scale, bias=None: clip_loss(img, txt, scale), "siglip": siglip_loss}


def build_loss(kind: str, group=None, gather_with_grad: bool = True, local_loss: bool = True) -> nn.Module:
    if kind == "clip":
        return ClipLoss(group, gather_with_grad, local_loss)
    if kind == "siglip":
        return SigLipLoss(group)
    raise ValueError(f"unknown loss {kind!r}; choose 'clip' or 'siglip'")


def logit_init(kind: str) -> tuple[float | None, float | None]:
    """(logit_scale init, logit_bias init) for a loss; None = the model's default / no bias."""
    return (SIGLIP_SCALE_INIT, SIGLIP_BIAS_INIT) if kind == "siglip" else (None, None)
