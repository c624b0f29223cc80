"""Hyperspectral patch classification (Indian-Pines style): one ``.npy`` cube ``(H, W, B)`` per sample.

Reading checks that every cube has the training cubes' shape; the band count and size are saved with
the model and checked again at prediction, naming the file that differs. Each band is standardised
with the training split's statistics. The tokenizer cuts the cube into spectral-spatial tubes
(``band_group`` adjacent bands x ``patch`` x ``patch`` pixels; bands zero-padded to a multiple of the
group) and projects each with one 3-D convolution; learned positions over (band group, row, column).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtx_dist.adapt.data import Moments
from mtx_dist.adapt.errors import AdaptError, DataError
from mtx_dist.adapt.files import list_samples, load_each, read_npy


class HyperspectralIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None):
        raw = list_samples(path, (".npy",), cfg.target, labelled)
        want = tuple(pre["shape"]) if pre else None

        def load(f: str) -> np.ndarray:
            a = read_npy(f)
            if a.ndim != 3 or not np.issubdtype(a.dtype, np.number) or min(a.shape) < 1:
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; expected a numeric (H, W, bands) cube")
            if want and a.shape != want:
                raise DataError(f"{f}: shape {a.shape}; the model was trained on {want} cubes "
                                f"({want[2]} bands, {want[0]} x {want[1]} pixels)")
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise DataError(f"{f}: NaN or infinite values")
            return a

        return load_each(raw, load, cfg)

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        shape = raw.items[train_idx[0]].shape
        for i, a in enumerate(raw.items):  # validation cubes too: they go through the same tokenizer
            if a.shape != shape:
                raise DataError(f"{raw.ids[i]}: shape {a.shape}; the first training cube "
                                f"({raw.ids[train_idx[0]]}) has {shape}: every cube needs the same bands and size")
        bands = Moments()
        for i in train_idx:
            bands.add(raw.items[i].reshape(-1, shape[2]))
        std = bands.std()
        pre = {"shape": list(shape), "mean": bands.mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
        patch = cfg.patch or next(p for p in (4, 3, 2, 1) if shape[0] % p == 0 and shape[1] % p == 0)
        if shape[0] % patch or shape[1] % patch:
            raise AdaptError(f"hyperspectral: patch {patch} does not divide the cubes' {shape[0]} x {shape[1]} pixels")
        return pre, {"size": list(shape[:2]), "bands": shape[2], "patch": patch, "band_group": cfg.band_group}

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
        cubes = np.stack([(a - mean) / std for a in raw.items])  # (N, H, W, B)
        return torch.from_numpy(np.ascontiguousarray(cubes.transpose(0, 3, 1, 2)))  # (N, B, H, W)


class HyperspectralTokenizer(nn.Module):
    """(N, B, H, W) standardised cubes -> [CLS] + (B/g) (H/p) (W/p) spectral-spatial tokens."""

    def __init__(self, width: int, size: list[int], bands: int, patch: int, band_group: int) -> None:
        super().__init__()
        self.size, self.bands, self.group = tuple(size), bands, band_group
        self.padded = -(-bands // band_group) * band_group
        self.embed = nn.Conv3d(1, width, kernel_size=(band_group, patch, patch), stride=(band_group, patch, patch))
        n = (self.padded // band_group) * (size[0] // patch) * (size[1] // patch)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n + 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.bands, *self.size):
            raise AdaptError(f"hyperspectral: input {tuple(x.shape[1:])}, the tokenizer expects "
                             f"({self.bands}, {self.size[0]}, {self.size[1]})")
        x = F.pad(x, (0, 0, 0, 0, 0, self.padded - self.bands))[:, None]  # (N, 1, B', H, W)
        x = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)
