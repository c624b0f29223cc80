"""Transformer encoder block with timm ViT parameter names.

Parameter names equal timm's ``vision_transformer.Block`` (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2), so the encoder's blocks export to Meta-Transformer as a rename-free slice.
No parallelism lives here: tensor parallelism swaps the linears afterwards (mtx_dist.parallel).
"""

from __future__ import annotations

import torch
from torch import nn

import mtx_kernels

# A token position per row: an int for every row, or a (B,) tensor of per-row positions; None: all.
Position = int | torch.Tensor | None


def rows_at(t: torch.Tensor, at: int | torch.Tensor) -> torch.Tensor:
    """(B, N, ...) -> (B, ...): each row's entry at position ``at`` (an int, or a (B,) tensor per row)."""
    return t[:, at] if isinstance(at, int) else t[torch.arange(t.shape[0], device=t.device), at]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, causal: bool = False, at: Position = None) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim); with ``at`` (see :meth:`Block.forward`) -> (B, dim), the output of
        that one position, whose query attends to every key (up to itself when causal)."""
        b, n, _ = x.shape
        qkv = self.qkv(x)
        # Heads are derived from the (possibly tensor-parallel, hence narrower) qkv output, so the
        # same code runs on a full or a column-sharded projection.
        heads = qkv.shape[-1] // (3 * self.head_dim)
        if at is not None:
            # unbind, not three slices: its backward writes the qkv gradient once, where each slice's
            # would zero-fill a whole qkv-sized buffer (bit-identical; the tiny last block 30 % faster)
            q, k, v = qkv.view(b, n, 3, heads, self.head_dim).unbind(2)
            out = mtx_kernels.query_attention(rows_at(q, at).unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                              limit=at if causal else None)
            return self.proj(out.reshape(b, heads * self.head_dim))
        # (B, heads, N, head_dim) views, as a permute of the whole would give; unbinding the token-major
        # layout makes the backward stack the three gradients straight into qkv's layout (one copy fewer)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, n, 3, heads, self.head_dim).unbind(2))
        out = mtx_kernels.attention(q, k, v, causal=causal, backend=self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto",
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, at: Position = None) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim). ``at``: only the output at one token position is wanted (an int for
        every row, e.g. 0 for a class token; a (B,) tensor of positions per row, e.g. end-of-text) ->
        (B, dim), equal to that row of the full output: keys and values still come from every token, but
        the query, the attention output projection and the MLP run for that token alone. A tower's last
        block uses it, since only the pooled token reaches the loss: for four layers 18 % fewer FLOPs per
        step, ViT-B/16 6 % (the backward of the unread positions was all zeros anyway)."""
        if at is None:
            x = x + self.attn(self.norm1(x), causal=self.causal)
            return x + self.mlp(self.norm2(x))
        y = rows_at(x, at) + self.attn(self.norm1(x), causal=self.causal, at=at)
        return y + self.mlp(self.norm2(y))


def init_blocks_default(blocks: nn.ModuleList) -> None:
    """The image tower's init, as OpenCLIP's (whose ``VisionTransformer`` defines none of its own):
    ``nn.MultiheadAttention``'s (xavier-uniform qkv, zero biases) and ``nn.Linear``'s defaults elsewhere,
    so that a race against OpenCLIP's trainer starts both sides from the same distribution. Against
    :func:`init_blocks` (``bench/bench_race.py``, tiny preset, 200 steps, seeds 0 and 1) the held-out
    metric differed by less than the seeds did: hard set 0.175/0.179 vs 0.145/0.189, demo 0.091/0.101
    vs 0.110/0.095."""
    for blk in blocks:
        nn.init.xavier_uniform_(blk.attn.qkv.weight)
        nn.init.zeros_(blk.attn.qkv.bias)
        blk.attn.proj.reset_parameters()
        nn.init.zeros_(blk.attn.proj.bias)
        blk.mlp.fc1.reset_parameters()
        blk.mlp.fc2.reset_parameters()


def init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """CLIP's text-tower init: attention std width^-0.5, residual outputs scaled by depth."""
    depth = len(blocks)
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for blk in blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
        nn.init.normal_(blk.attn.proj.weight, std=proj_std)
        nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            nn.init.zeros_(lin.bias)
