"""Point-cloud Data2Seq (Point-BERT / Meta-Transformer style): FPS centres -> kNN groups -> mini
PointNet per group -> one token per group, positions from the centre coordinates.

Farthest-point sampling starts at point 0 of every cloud (deterministic; clouds are shuffled or
resampled upstream if a random start is wanted) and breaks ties by the lowest index, as
``argmax`` does. Neighbours are the K nearest points to each centre by squared Euclidean distance
(the centre itself included), ordered nearest first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtx_dist.adapt.errors import AdaptError


def farthest_point_sample(xyz: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, N, 3) -> (B, groups) indices of farthest-point-sampled centres, starting at index 0."""
    b, n, _ = xyz.shape
    if groups > n:
        raise AdaptError(f"point cloud: {groups} groups requested from clouds of {n} points")
    idx = torch.zeros(b, groups, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    current = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    # A loop over groups (not points): G is small (tens), and each step is one vectorised distance.
    for g in range(groups):
        idx[:, g] = current
        d = ((xyz - xyz[rows, current].unsqueeze(1)) ** 2).sum(-1)
        nearest = torch.minimum(nearest, d)
        current = nearest.argmax(dim=1)
    return idx


def knn(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, G, 3), (B, N, 3) -> (B, G, k) indices of each query's k nearest points, nearest first."""
    if k > points.shape[1]:
        raise AdaptError(f"point cloud: {k} neighbours requested from clouds of {points.shape[1]} points")
    # Explicit differences rather than torch.cdist: cdist's matmul form loses precision for near
    # points and can reorder close neighbours.
    d = ((query.unsqueeze(2) - points.unsqueeze(1)) ** 2).sum(-1)
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: torch.Tensor, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3+F) -> centres (B, G, 3), neighbourhoods (B, G, K, 3+F) with xyz relative to the centre."""
    xyz = points[..., :3]
    rows = torch.arange(points.shape[0], device=points.device)[:, None]
    centres = xyz[rows, farthest_point_sample(xyz, groups)]
    nbr = points[rows.unsqueeze(-1), knn(centres, xyz, k)]
    rel = torch.cat([nbr[..., :3] - centres.unsqueeze(2), nbr[..., 3:]], dim=-1)
    return centres, rel


class PointCloudTokenizer(nn.Module):
    """(B, N, 3+F) -> [CLS] + G group tokens; a shared MLP + max-pool embeds each group."""

    def __init__(self, width: int, channels: int = 3, groups: int = 32, neighbours: int = 16,
                 hidden: int = 128) -> None:
        super().__init__()
        if channels < 3:
            raise AdaptError(f"point cloud: {channels} channels per point; xyz (3) at least are needed")
        self.channels, self.groups, self.neighbours = channels, groups, neighbours
        self.point_mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.proj = nn.Linear(hidden, width)
        self.pos_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.cls_pos = nn.Parameter(torch.randn(width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.channels:
            raise AdaptError(f"point cloud: {points.shape[-1]} channels per point, the tokenizer expects "
                             f"{self.channels}")
        centres, rel = group_points(points, self.groups, self.neighbours)
        x = self.proj(self.point_mlp(rel).amax(dim=2)) + self.pos_mlp(centres)
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1))


def normalize_cloud(points: np.ndarray) -> np.ndarray:
    """Centre xyz at the origin and scale it into the unit sphere (extra channels untouched)."""
    out = points.astype(np.float32, copy=True)
    out[:, :3] -= out[:, :3].mean(axis=0)
    radius = float(np.sqrt((out[:, :3] ** 2).sum(axis=1)).max())
    if radius > 0:
        out[:, :3] /= radius
    return out


def resample_cloud(points: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Exactly ``n`` points: a seeded subset without replacement, or with replacement when fewer exist."""
    rng = np.random.default_rng(seed)
    replace = len(points) < n
    return points[np.sort(rng.choice(len(points), n, replace=replace))] if len(points) != n else points
