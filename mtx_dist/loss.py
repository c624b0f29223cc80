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

from mtx_kernels.tiled_loss import tiled_clip_loss
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
    logits shrink by the number of ranks. ``tile_size`` > 0: the logits are computed in column tiles
    with a recomputing backward (mtx_kernels.tiled_loss), so the peak is B x tile rather than B x N (at
    tens of thousands of negatives the logits outgrow a small tower's activations). Same value and
    gradients; the gathered features are plain inputs of the tiled function, whose backward
    hands their gradients to the all-gather. Without local_loss the rows are all N (peak N x tile).
    """

    def __init__(self, group=None, gather_with_grad: bool = True, local_loss: bool = True,
                 tile_size: int = 0) -> None:
        super().__init__()
        if tile_size < 0:
            raise ValueError(f"tile_size must be >= 0 (0 = untiled), got {tile_size}")
        self.group, self.gather_with_grad, self.local_loss = group, gather_with_grad, local_loss
        self.tile_size = tile_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        world = group_size(self.group)
        if world == 1 and not self.tile_size:
            return clip_loss(image_features, text_features, logit_scale)
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        all_img, all_txt = gather(img, self.group), gather(txt, self.group)
        b = img.shape[0]
        if self.local_loss:  # our B rows; their positives sit at our offset among the gathered columns
            rows_img, rows_txt = img, txt
            labels = torch.arange(b, device=img.device) + b * group_rank(self.group)
        else:
            rows_img, rows_txt = all_img, all_txt
            labels = torch.arange(b * world, device=img.device)
        if self.tile_size:
            return tiled_clip_loss(rows_img, all_txt, rows_txt, all_img, scale, labels, self.tile_size)
        logits_i2t = scale * rows_img @ all_txt.t()
        logits_t2i = scale * rows_txt @ all_img.t() if self.local_loss else logits_i2t.t()
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
    is one B x B logit block and B x D of received features. Each exchange is a blocking send/receive
    pair (``batch_isend_irecv``, then wait) before the block's matmul: transfers do not overlap the
    compute. A B x D block is small next to the B x B x D matmul it feeds, so the ring costs W - 1
    latencies; overlapping would need the receive started before the previous block's terms, with
    the same in the backward. The exchange is differentiable; gradients travel back around the ring.
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


def build_loss(kind: str, group=None, gather_with_grad: bool = True, local_loss: bool = True,
               tile_size: int = 0) -> nn.Module:
    if kind == "clip":
        return ClipLoss(group, gather_with_grad, local_loss, tile_size)
    if kind == "siglip":
        return SigLipLoss(group)
    raise ValueError(f"unknown loss {kind!r}; choose 'clip' or 'siglip'")


def logit_init(kind: str) -> tuple[float | None, float | None]:
    """(logit_scale init, logit_bias init) for a loss; None = the model's default / no bias."""
    return (SIGLIP_SCALE_INIT, SIGLIP_BIAS_INIT) if kind == "siglip" else (None, None)
