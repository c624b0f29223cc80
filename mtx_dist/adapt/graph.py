"""Graph classification (the Meta-Transformer paper's graph route, TokenGT-style): a folder of graphs,
``.json`` ``{"nodes": [[features...], ...], "edges": [[i, j], ...]}`` or ``.npz`` with ``x (N, F)``
and ``edge_index (2, E)``; undirected (an edge listed both ways counts once).

Every node and every edge becomes a token. Its structural identifier comes from the graph's
Laplacian eigenvectors (TokenGT, Kim et al. 2022): the ``k`` eigenvectors of the smallest eigenvalues
of the normalised Laplacian give each node a vector P; a node token carries (features, P, P), an edge
token (zeros, P_i, P_j), plus a node/edge type flag. Graphs are padded with a learned pad token to
the training set's largest node + edge count; a larger graph at prediction is refused naming the
file. Node features are standardised with training statistics.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from mtx_dist.adapt.errors import DataError
from mtx_dist.adapt.files import list_samples, load_each


def _load_graph(f: str) -> tuple[np.ndarray, np.ndarray]:
    """(node features (N, F) float32, undirected edges (E, 2) int64 with i < j, deduplicated)."""
    try:
        if f.lower().endswith(".json"):
            with open(f) as fh:
                g = json.load(fh)
            x = np.asarray(g["nodes"], dtype=np.float32)
            edges = np.asarray(g.get("edges", []), dtype=np.int64).reshape(-1, 2)
        else:
            with np.load(f, allow_pickle=False) as z:
                x = np.asarray(z["x"], dtype=np.float32)
                index = np.asarray(z["edge_index"], dtype=np.int64)
            if index.ndim != 2 or index.shape[0] != 2:
                raise ValueError(f"edge_index of shape {index.shape}, not (2, E)")
            edges = index.T
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{f}: not a readable graph ({type(e).__name__}: {e}); expected JSON {{'nodes': [[...]], "
                        "'edges': [[i, j]]}} or .npz with x (N, F) and edge_index (2, E)") from e
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{f}: nodes of shape {x.shape}; expected (N >= 1, features)")
    if not np.isfinite(x).all():
        raise DataError(f"{f}: NaN or infinite node features")
    bad = edges[(edges < 0).any(1) | (edges >= len(x)).any(1)]
    if len(bad):
        raise DataError(f"{f}: edge {bad[0][0]} -> {bad[0][1]} names a missing node (the graph has {len(x)} "
                        f"nodes, 0..{len(x) - 1})")
    edges = np.unique(np.sort(edges[edges[:, 0] != edges[:, 1]], axis=1), axis=0)
    return x, edges


def laplacian_ids(n: int, edges: np.ndarray, k: int) -> np.ndarray:
    """(n, k) eigenvectors of the smallest eigenvalues of I - D^-1/2 A D^-1/2 (zero-padded below k)."""
    a = np.zeros((n, n))
    a[edges[:, 0], edges[:, 1]] = a[edges[:, 1], edges[:, 0]] = 1.0
    d = a.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-12)), 0.0)
    _, vecs = np.linalg.eigh(np.eye(n) - inv[:, None] * a * inv[None, :])
    # An eigenvector's sign is arbitrary: fix it (largest-magnitude entry positive) so that the same
    # graph gets the same identifiers on any LAPACK build. (Bases of repeated eigenvalues stay arbitrary.)
    vecs = vecs * np.where(vecs[np.abs(vecs).argmax(0), np.arange(n)] < 0, -1.0, 1.0)
    out = np.zeros((n, k), np.float32)
    out[:, : min(k, n)] = vecs[:, : min(k, n)]
    return out


class GraphIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None):
        raw = list_samples(path, (".json", ".npz"), cfg.target, labelled)
        raw = load_each(raw, _load_graph, cfg)
        if pre is not None:
            for gid, (x, e) in zip(raw.ids, raw.items):
                if x.shape[1] != pre["features"]:
                    raise DataError(f"{gid}: {x.shape[1]} node features; the model was trained on {pre['features']}")
                if len(x) + len(e) > pre["tokens"]:
                    raise DataError(f"{gid}: {len(x)} nodes + {len(e)} edges = {len(x) + len(e)} tokens; the model "
                                    f"takes at most {pre['tokens']} (its largest training graph)")
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        feats = {g[0].shape[1] for g in raw.items}
        if len(feats) > 1:
            raise DataError(f"the graphs have different node feature counts: {sorted(feats)}")
        x = np.concatenate([raw.items[i][0] for i in train_idx])
        std = x.std(0)
        tokens = max(len(g[0]) + len(g[1]) for g in raw.items)  # validation graphs need room too
        pre = {"features": feats.pop(), "tokens": tokens, "eigvecs": cfg.graph_eigvecs,
               "mean": x.mean(0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
        return pre, {"in_features": pre["features"] + 2 * cfg.graph_eigvecs + 3, "tokens": tokens}

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        f, k, t = pre["features"], pre["eigvecs"], pre["tokens"]
        mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
        out = np.zeros((len(raw.items), t, f + 2 * k + 3), np.float32)
        out[:, :, -1] = 1.0  # pad, until a node or an edge takes the slot
        for g, (x, edges) in enumerate(raw.items):
            n, p = len(x), laplacian_ids(len(x), edges, k)
            out[g, :n, :f] = (x - mean) / std
            out[g, :n, f:f + k] = out[g, :n, f + k:f + 2 * k] = p
            out[g, n:n + len(edges), f:f + k] = p[edges[:, 0]]
            out[g, n:n + len(edges), f + k:f + 2 * k] = p[edges[:, 1]]
            out[g, :n, -3] = 1.0  # node
            out[g, n:n + len(edges), -2] = 1.0  # edge
            out[g, :n + len(edges), -1] = 0.0
        return torch.from_numpy(out)


class GraphTokenizer(nn.Module):
    """(N, tokens, features + 2k + 3) node/edge/pad rows -> [CLS] + one token per row."""

    def __init__(self, width: int, in_features: int, tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, width)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1))
