"""Memory-tiled CLIP (InfoNCE) loss: the B x N logits are never held at once.

The contrastive loss of B local rows against N global columns is usually computed by building the
B x N logit matrix; cross-entropy then saves its log-softmax (another B x N) for the backward, and the
backward builds a third. With N = 32k negatives and B = 4k local rows that is 512 MiB per matrix in
float32 — per direction — and it grows with the global batch. Following Inf-CL ("Breaking the
Memory Barrier", Lin et al. 2024), :class:`TiledCrossEntropy` walks over the columns in tiles:

* forward: for each tile of ``tile`` columns, compute the B x tile logits ``s * a @ b_tile.T``,
  fold them into a running per-row log-sum-exp (online logsumexp) and pick up the positive logit
  when the row's label falls in the tile. Only ``a``, ``b``, ``s``, the labels and the B per-row
  log-sum-exps are saved.
* backward: recompute each tile's logits, turn them into softmax probabilities with the saved
  log-sum-exp, and accumulate ``grad_a += P_tile @ b_tile`` and ``grad_b[tile] = P_tile.T @ a``;
  the one-hot of the positives is subtracted once at the end, and ``grad_s`` follows from
  ``sum(P * a b^T) = sum(a * (P @ b))``, so no second B x tile buffer is needed.

Peak extra memory is O(B x tile) (one block of logits, exponentiated in place) instead of O(B x N), plus the
gradients of the inputs themselves (B x D and N x D), which any backward must produce. The price is
recomputing the logits once in the backward: 4 matmuls of B x N x D instead of 3.

All math is float32 whatever the input precision, autocast included; gradients are returned in the inputs' dtypes.
Value and gradients equal the plain ``F.cross_entropy(s * a @ b.T, labels)`` up to float32 rounding.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

DEFAULT_TILE = 1024


def _forward(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
             tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row log-sum-exp), one B x tile block of logits at a time; float32."""
    n = b.shape[0]
    a32 = a.float()
    lse = a32.new_full((a.shape[0],), float("-inf"))
    pos = a32.new_zeros(a.shape[0])
    for j0 in range(0, n, tile):
        j1 = min(j0 + tile, n)
        logits = (a32 @ b[j0:j1].float().t()).mul_(s)  # B x tile: the only large temporary
        in_tile = (labels >= j0) & (labels < j1)  # no host sync: a masked gather, not an index
        picked = logits.gather(1, (labels - j0).clamp(0, j1 - j0 - 1)[:, None]).squeeze(1)
        pos = torch.where(in_tile, picked, pos)
        # online logsumexp: the tile's own (shifted by its row max, in place), folded into the running one
        top = logits.amax(dim=1)
        tile_lse = logits.sub_(top[:, None]).exp_().sum(dim=1).log_().add_(top)
        lse = torch.logaddexp(lse, tile_lse)
        del logits
    return (lse - pos).mean(), lse


def _backward(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
              tile: int, coef: torch.Tensor, need_a_or_s: bool, need_b: bool):
    """(acc, grad_b): ``acc = (P - onehot) @ b`` (B x D) and ``coef * s * (P - onehot)^T @ a`` (N x D),
    where P is the softmax recomputed one tile at a time; float32."""
    n = b.shape[0]
    a32 = a.float()
    acc = a32.new_zeros(a32.shape) if need_a_or_s else None
    grad_b = a32.new_zeros(b.shape) if need_b else None
    for j0 in range(0, n, tile):
        j1 = min(j0 + tile, n)
        b_t = b[j0:j1].float()
        p = (a32 @ b_t.t()).mul_(s).sub_(lse[:, None]).exp_()  # softmax of this tile, B x tile
        if acc is not None:
            acc.addmm_(p, b_t)
        if grad_b is not None:
            torch.mm(p.t(), a32, out=grad_b[j0:j1])
        del p, b_t
    # the one-hot of the positives, once for all tiles
    if acc is not None:
        acc.sub_(b.index_select(0, labels).float())
    if grad_b is not None:
        grad_b.index_add_(0, labels, a32, alpha=-1.0).mul_(coef * s)
    return acc, grad_b


class TiledCrossEntropy(torch.autograd.Function):
    """``mean_i CE(s * a_i . b^T, labels_i)`` for ``a`` (B x D), ``b`` (N x D), a 0-dim or (1,)
    scale ``s`` (already exponentiated) and integer ``labels`` (B,) in ``[0, N)``, computed over
    column tiles of ``tile`` columns. Float32 even under autocast."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                tile: int) -> torch.Tensor:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"expected a (B x D) and b (N x D), got {tuple(a.shape)} and {tuple(b.shape)}")
        if labels.shape != (a.shape[0],):
            raise ValueError(f"expected one label per row ({a.shape[0]}), got shape {tuple(labels.shape)}")
        if tile < 1 or b.shape[0] < 1:
            raise ValueError(f"tile and the number of columns must be >= 1, got {tile} and {b.shape[0]}")
        with torch.autocast(a.device.type, enabled=False):
            loss, lse = _forward(a, b, scale.float().reshape(()), labels, tile)
        ctx.save_for_backward(a, b, scale, labels, lse)
        ctx.tile = tile
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        a, b, scale, labels, lse = ctx.saved_tensors
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        s = scale.float().reshape(())
        coef = grad_out.float() / a.shape[0]  # d(mean)/d(row loss)
        with torch.autocast(a.device.type, enabled=False):
            acc, grad_b = _backward(a, b, s, labels, lse, ctx.tile, coef, need_a or need_s, need_b)
        grad_a = (acc * (coef * s)).to(a.dtype) if need_a else None
        # sum_ij (P - onehot)_ij a_i . b_j = sum_i a_i . acc_i
        grad_s = (coef * (acc * a.float()).sum()).reshape(scale.shape).to(scale.dtype) if need_s else None
        return grad_a, None if grad_b is None else grad_b.to(b.dtype), grad_s, None, None


def tiled_cross_entropy(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                        tile: int = DEFAULT_TILE) -> torch.Tensor:
    """``F.cross_entropy(scale * a @ b.T, labels)`` (mean over rows) without the B x N logits."""
    return TiledCrossEntropy.apply(a, b, scale, labels, int(tile))


def tiled_clip_loss(img_local: torch.Tensor, txt_all: torch.Tensor, txt_local: torch.Tensor,
                    img_all: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                    tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Symmetric CLIP loss of local rows against all columns, in column tiles:
    ``(CE(img_local vs txt_all) + CE(txt_local vs img_all)) / 2``, where ``labels[i]`` is the column
    of row i's own pair (``arange(B) + B * rank`` for a data-parallel rank's local loss; ``arange(B)``
    on one process, with ``*_all = *_local``). Peak extra memory O(B x tile) instead of O(B x N).
    The ``*_all`` tensors may come from a differentiable all-gather: their gradients flow back to it."""
    return (tiled_cross_entropy(img_local, txt_all, scale, labels, tile)
            + tiled_cross_entropy(txt_local, img_all, scale, labels, tile)) / 2
