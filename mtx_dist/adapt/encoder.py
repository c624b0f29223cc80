"""The frozen shared encoder: an exported ``encoder.safetensors`` loaded into our timm-named blocks.

Construction follows Meta-Transformer: ``nn.Sequential(*[Block(width, heads, mlp_ratio)] * depth)``
with a bare ``N.norm1.weight``-style state dict loaded ``strict=True``; no patch embedding, class
token, positions, ln_pre/ln_post or projection come with it -- those belong to each modality's
tokenizer and head. The export is verified (sha256 of every file) before a single tensor is read.

Choices: the blocks run in eval mode always (``train()`` is overridden to keep them there, so a
caller's ``model.train()`` cannot switch dropout or similar behaviour on in a frozen part), all
parameters have ``requires_grad=False`` (gradients still flow *through* them to the tokenizer), and
no final LayerNorm is part of the encoder: each head brings its own, trainable one.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

from mtx_dist.adapt.errors import AdaptError
from mtx_dist.export import ENCODER_FILE, verify_export
from mtx_dist.models.blocks import Block


class FrozenEncoder(nn.Module):
    """Exported transformer blocks, frozen. ``sha256`` identifies the exact encoder file."""

    def __init__(self, export_dir: str, attn_backend: str = "auto") -> None:
        super().__init__()
        manifest = verify_export(export_dir)  # raises ExportError on any hash or layout problem
        enc = manifest.get("encoder", {})
        for key, allowed in (("act", "gelu"), ("norm", "layernorm")):
            if enc.get(key, allowed) != allowed:
                raise AdaptError(f"{export_dir}: encoder {key}={enc.get(key)!r} is not supported (only {allowed})")
        if float(enc.get("norm_eps", 1e-5)) != 1e-5:
            raise AdaptError(f"{export_dir}: encoder norm_eps={enc['norm_eps']} is not supported (only 1e-5)")
        self.export_dir = os.path.abspath(export_dir)
        self.sha256 = manifest["files"][ENCODER_FILE]["sha256"]
        self.width, self.depth, self.heads = int(enc["width"]), int(enc["depth"]), int(enc["heads"])
        self.mlp_ratio = float(enc.get("mlp_ratio", 4.0))
        self.manifest = manifest
        self.blocks = nn.Sequential(*[Block(self.width, self.heads, self.mlp_ratio, attn_backend)
                                      for _ in range(self.depth)])
        state = load_file(os.path.join(export_dir, ENCODER_FILE))
        self.blocks.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        for p in self.blocks.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means frozen: the wrapper's .train() must not change this module's behaviour.
        return super().train(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.width:
            raise AdaptError(f"tokens of width {tokens.shape[-1]} offered to an encoder of width {self.width}")
        return self.blocks(tokens)
