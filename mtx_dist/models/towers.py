"""Image and text towers with OpenCLIP geometry, built from timm-named blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtx_dist.models.blocks import Block, init_blocks, init_blocks_default
from mtx_dist.models.embedding import TokenEmbedding
from mtx_dist.models.presets import TextSpec, VisionSpec


def resample_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, width) position embeddings of a class token and a g x g patch grid -> the same for a
    grid x grid layout: the patch part resampled bicubically (antialiased when shrinking), the class
    token's position unchanged; ``pos`` itself when the grid is its own."""
    g, w = round((pos.shape[0] - 1) ** 0.5), pos.shape[1]
    if grid == g:
        return pos
    patches = pos[1:].reshape(1, g, g, w).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=grid < g, align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, w)])


class VisionTower(nn.Module):
    """Conv patch embedding, class token, learned positions, ln_pre, blocks, ln_post, projection."""

    def __init__(self, spec: VisionSpec, embed_dim: int, attn_backend: str = "auto") -> None:
        super().__init__()
        if spec.image_size % spec.patch_size:
            raise ValueError(f"image size {spec.image_size} is not a multiple of patch {spec.patch_size}")
        self.spec = spec
        w = spec.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.empty(w))
        self.pos_embed = nn.Parameter(torch.empty(spec.tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, spec.heads, spec.mlp_ratio, attn_backend) for _ in range(spec.layers))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.spec.width ** -0.5
        for p in (self.cls_token, self.pos_embed, self.proj):
            nn.init.normal_(p, std=scale)
        init_blocks_default(self.blocks)

    def positions(self, grid: int) -> torch.Tensor:
        """Position embeddings for a grid x grid patch layout: the learned ones at the preset's size,
        else their patch part resampled bicubically (antialiased when shrinking; the class token's
        position unchanged). Low-resolution training (CLIPA) and evaluation at another size use it;
        the resampling is differentiable, so low-resolution steps train the full-size positions."""
        return resample_positions(self.pos_embed, grid)

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Patch tokens with class token and positions, before ln_pre: (B, 1 + grid^2, width). Any square
        image whose side is a multiple of the patch size; the grid follows the image."""
        h, w = image.shape[-2:]
        if h != w or h % self.spec.patch_size:
            raise ValueError(f"image of {h}x{w} pixels: the vision tower takes square images whose side is a "
                             f"multiple of the patch size {self.spec.patch_size}")
        x = self.patch_embed(image)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positions(grid).to(x.dtype)

    def forward(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: (B, K) indices of the patch tokens each image keeps (FLIP patch dropout, training
        only; :func:`patch_keep_indices`); the class token is always kept."""
        x = self.tokens(image)
        if keep is not None:
            patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        x = self.ln_pre(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.ln_post(self.blocks[-1](x, at=0)) @ self.proj  # the last block runs the class token alone


def kept_patches(patches: int, drop: float) -> int:
    """How many of ``patches`` patch tokens an image keeps under FLIP patch dropout ``drop``."""
    return max(1, int(patches * (1 - drop))) if drop else patches


def patch_keep_indices(batch: int, patches: int, drop: float, generator: torch.Generator,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, K) sorted indices of the patches each image keeps under FLIP patch dropout: a uniform
    random subset of K = max(1, int(patches * (1 - drop))) per row, drawn from ``generator``."""
    keep = kept_patches(patches, drop)
    noise = torch.rand(batch, patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


class TextTower(nn.Module):
    """Causal text transformer: token + position embeddings, blocks, ln_final, EOT pooling, projection."""

    def __init__(self, spec: TextSpec, embed_dim: int, attn_backend: str = "auto") -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        self.token_embedding = TokenEmbedding(spec.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.empty(spec.context_length, w))
        self.blocks = nn.ModuleList(
            Block(w, spec.heads, spec.mlp_ratio, attn_backend, causal=True) for _ in range(spec.layers)
        )
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj, std=self.spec.width ** -0.5)
        init_blocks(self.blocks, self.spec.width)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """``text``: (B, L) ids, L <= context length. Batches padded only to their longest caption give the
        features of full-length padding: attention is causal and the features are read at EOT, so the
        padding after EOT never reaches them."""
        n = text.shape[1]
        if n > self.spec.context_length:
            raise ValueError(f"text has {n} tokens; the tower takes at most {self.spec.context_length}")
        x = self.token_embedding(text) + self.pos_embed[:n]
        for blk in self.blocks[:-1]:
            x = blk(x)
        # The end-of-text token has the largest id in the CLIP vocabulary, so argmax finds it; the last
        # block runs it alone (its causal query sees the tokens up to it, as in the full block).
        eot = text.argmax(dim=-1)
        return self.ln_final(self.blocks[-1](x, at=eot)) @ self.proj
