"""Data2Seq tokenizers: raw modality input -> (B, N, width) tokens for the frozen encoder.

Every tokenizer prepends a learnable [CLS] token, adds learned positions where order means
something, and ends with a LayerNorm of its own: the exported blocks were pretrained on inputs that
had passed the image tower's ``ln_pre``, so a normalised token scale is what they expect.
:func:`build_tokenizer` makes one from the JSON-able settings saved in ``adapter.json``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtx_dist.adapt.audio import AudioTokenizer
from mtx_dist.adapt.config import MODALITIES
from mtx_dist.adapt.errors import AdaptError
from mtx_dist.adapt.graph import GraphTokenizer
from mtx_dist.adapt.hyperspectral import HyperspectralTokenizer
from mtx_dist.adapt.pointcloud import PointCloudTokenizer
from mtx_dist.adapt.text import TextTokenizer
from mtx_dist.adapt.video import VideoTokenizer


def _init(width: int, n: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, width) * 0.02)


class TimeSeriesTokenizer(nn.Module):
    """(B, T, C) -> [CLS] + ceil(T / P) tokens.

    A token is one window of P consecutive steps of *all* channels, flattened (P * C values) and
    projected: channels measured together stay together (PatchTST's channel-independent variant
    would multiply the token count by C). T is zero-padded up to a multiple of P.
    """

    def __init__(self, width: int, length: int, channels: int, patch: int = 16) -> None:
        super().__init__()
        if patch < 1:
            raise AdaptError(f"time series: patch length {patch} must be >= 1")
        self.length, self.channels, self.patch = length, channels, min(patch, length)
        self.n_patches = -(-length // self.patch)
        self.proj = nn.Linear(self.patch * channels, width)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = _init(width, self.n_patches + 1)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        if (t, c) != (self.length, self.channels):
            raise AdaptError(f"time series: input of {t} steps x {c} channels, the tokenizer expects "
                             f"{self.length} x {self.channels}")
        pad = self.n_patches * self.patch - t
        if pad:
            x = torch.cat([x, x.new_zeros(b, pad, c)], dim=1)
        x = self.proj(x.reshape(b, self.n_patches, self.patch * c))
        cls = self.cls_token.expand(b, 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)


class TabularTokenizer(nn.Module):
    """(B, n_numeric + n_categorical) -> [CLS] + one token per column (FT-Transformer style).

    Numeric column c (standardised upstream with training-split statistics): ``value * w_c + b_c``.
    Categorical column c: an embedding of its id in that column's training vocabulary, id 0 being
    "unknown" (a value never seen in training). The ids arrive as floats in the same tensor (exact
    below 2**24) so that a batch is one tensor. A learned column embedding tells columns apart.
    """

    def __init__(self, width: int, n_numeric: int, vocab_sizes: list[int]) -> None:
        super().__init__()
        self.n_numeric, self.vocab_sizes = n_numeric, list(vocab_sizes)
        n_cols = n_numeric + len(vocab_sizes)
        if n_cols == 0:
            raise AdaptError("tabular: no feature columns")
        self.num_weight = _init(width, n_numeric)
        self.num_bias = _init(width, n_numeric)
        offsets = torch.tensor([0] + self.vocab_sizes[:-1], dtype=torch.long).cumsum(0)[: len(vocab_sizes)]
        self.register_buffer("offsets", offsets, persistent=False)
        self.cat_embed = nn.Embedding(max(1, sum(self.vocab_sizes)), width)
        nn.init.normal_(self.cat_embed.weight, std=0.02)
        self.col_embed = _init(width, n_cols)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.n_numeric + len(self.vocab_sizes):
            raise AdaptError(f"tabular: {x.shape[1]} columns, the tokenizer expects "
                             f"{self.n_numeric + len(self.vocab_sizes)}")
        num = x[:, : self.n_numeric, None] * self.num_weight + self.num_bias
        parts = [self.cls_token.expand(x.shape[0], 1, -1), num]
        if self.vocab_sizes:
            parts.append(self.cat_embed(x[:, self.n_numeric:].long() + self.offsets))
        cls, cols = parts[0], torch.cat(parts[1:], dim=1) + self.col_embed
        return self.norm(torch.cat([cls, cols], dim=1))


class ImageTokenizer(nn.Module):
    """(B, C, S, S) normalised images -> [CLS] + (S/P)^2 patch tokens (a conv with stride = patch).
    C = 3 (``image``) or 1 (``xray``, ``infrared``: a one-channel patch embedding)."""

    def __init__(self, width: int, image_size: int, patch: int, channels: int = 3, init: str = "random") -> None:
        super().__init__()
        self.init = init  # where the weights started (mtx_dist.adapt.pretrained); they come from the file after
        if image_size % patch:
            raise AdaptError(f"image: size {image_size} is not a multiple of patch {patch}")
        self.image_size, self.channels = image_size, channels
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = _init(width, (image_size // patch) ** 2 + 1)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise AdaptError(f"image: input {tuple(x.shape[1:])}, the tokenizer expects "
                             f"({self.channels}, {self.image_size}, {self.image_size})")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)


def build_tokenizer(modality: str, width: int, settings: dict) -> nn.Module:
    """A tokenizer from its saved settings (``adapter.json`` "tokenizer" section, less "modality")."""
    kinds = {"timeseries": TimeSeriesTokenizer, "tabular": TabularTokenizer, "audio": AudioTokenizer,
             "pointcloud": PointCloudTokenizer, "image": ImageTokenizer, "xray": ImageTokenizer,
             "infrared": ImageTokenizer, "hyperspectral": HyperspectralTokenizer, "imu": TimeSeriesTokenizer,
             "video": VideoTokenizer, "text": TextTokenizer, "graph": GraphTokenizer}
    if modality not in kinds:
        raise AdaptError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    try:
        return kinds[modality](width, **settings)
    except TypeError as e:
        raise AdaptError(f"{modality} tokenizer settings {settings}: {e}") from e
