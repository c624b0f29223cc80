"""Two-tower contrastive model: image tower, text tower, learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtx_dist.models.presets import ModelSpec, get_preset
from mtx_dist.models.towers import TextTower, VisionTower

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


class ContrastiveModel(nn.Module):
    def __init__(self, spec: ModelSpec, attn_backend: str = "auto", logit_scale_init: float | None = None,
                 logit_bias_init: float | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec.vision, spec.embed_dim, attn_backend)
        self.text = TextTower(spec.text, spec.embed_dim, attn_backend)
        # Shape (1,) rather than OpenCLIP's 0-dim: DeepSpeed broadcasts parameters as byte views,
        # which 0-dim tensors do not support. Exports reshape it.
        # Values set in place, not by torch.full: mtx_dist.models.deferred replays in-place initialisation.
        self.logit_scale = nn.Parameter(torch.empty(1))
        nn.init.constant_(self.logit_scale, LOGIT_SCALE_INIT if logit_scale_init is None else logit_scale_init)
        # A learnable logit bias exists only for losses that use one (SigLIP).
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.empty(1))
        if self.logit_bias is not None:
            nn.init.constant_(self.logit_bias, logit_bias_init)

    @classmethod
    def from_preset(cls, name: str, attn_backend: str = "auto") -> "ContrastiveModel":
        return cls(get_preset(name), attn_backend)

    def encode_image(self, image: torch.Tensor, normalize: bool = True,
                     patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.visual(image, patch_keep)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.text(text)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, image: torch.Tensor, text: torch.Tensor, patch_keep: torch.Tensor | None = None):
        """-> (image features, text features, logit scale, logit bias or None); features L2-normalized.
        ``patch_keep``: the patches each image keeps (FLIP patch dropout, training only)."""
        # The scale is clamped here rather than by an in-place clamp after the optimizer step (as
        # OpenCLIP does) so that it works unchanged when ZeRO-3 partitions the parameter; it is used
        # inside this top-level forward, which ZeRO-3 needs for parameters outside submodules.
        scale = self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX).squeeze(0)
        bias = None if self.logit_bias is None else self.logit_bias.squeeze(0)
        return self.encode_image(image, patch_keep=patch_keep), self.encode_text(text), scale, bias
