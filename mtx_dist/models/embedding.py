"""The text tower's token embedding: ``nn.Embedding`` whose dense gradient can reuse its last buffer.

A lookup's gradient is a dense (vocab, width) tensor although only the looked-up rows are non-zero,
and torch zero-fills all of it at every backward: for ``tiny`` on a 2-core CPU a 25 MB fill, ~2 ms of
a 127 ms step (docs/BENCHMARKS.md, session 10). With recycling on, the backward adds the rows into
the previous step's gradient tensor instead, after the optimizer step has zeroed the rows that step
touched (:meth:`TokenEmbedding.recycle_grad`, an optimizer step hook, which then sets ``weight.grad``
to None as ``zero_grad`` would): a few hundred rows instead of 49,408. The gradient is bit for bit
torch's: torch's CPU backward adds the rows into zeros in the order of the ids, as ``index_add_`` does
(tested).

Only where nothing else writes the gradient tensor between two steps: one process (no data-parallel
reduction adding other ranks' rows), ZeRO stage 0 (the optimizer reads ``param.grad`` itself), eager
(a custom autograd function in a compiled graph gains nothing there). :func:`enable_grad_recycling`
decides; elsewhere the module is a plain ``nn.Embedding``. Written here because no library offers a
dense embedding gradient without the fill (``sparse=True`` gradients do not fit DeepSpeed's clipping
or fused AdamW).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding(num, dim)`` (same parameter name, init and forward) with optional gradient recycling."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.recycling = False
        self._spare: torch.Tensor | None = None  # a zero gradient tensor for the next backward
        self._handed: int | None = None  # data_ptr of the tensor a backward gave autograd as the gradient
        self._touched: list[torch.Tensor] = []  # ids looked up since the last recycling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.recycling and self.weight.requires_grad and torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            return _Lookup.apply(self.weight, ids, self)
        return super().forward(ids)

    def _gradient(self, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The weight's gradient of one backward, in the spare tensor when it can take it."""
        spare, self._spare = self._spare, None
        first = self.weight.grad is None  # else autograd adds ours into the existing gradient: a new tensor
        if first:  # a gradient starts here: the rows it will hold are those of this and later lookups
            self._touched = []
        if spare is None or not first or spare.dtype != grad_out.dtype or spare.device != grad_out.device:
            spare = torch.zeros(self.weight.shape, dtype=grad_out.dtype, device=grad_out.device)
        flat = ids.reshape(-1)
        spare.index_add_(0, flat, grad_out.reshape(flat.numel(), -1))
        self._touched.append(flat.clone())  # the caller may reuse its id tensor before the step
        if first:
            self._handed = spare.data_ptr()
        return spare

    def recycle_grad(self) -> None:
        """After the optimizer step: zero the rows the step's lookups touched and keep the tensor for the
        next backward, if ``weight.grad`` is still the tensor a backward handed out (autograd took it
        without a copy and nobody replaced it)."""
        grad, touched, self._touched = self.weight.grad, self._touched, []
        handed, self._handed = self._handed, None
        if grad is None or not touched or grad.data_ptr() != handed or not grad.is_contiguous():
            return
        grad.index_fill_(0, torch.cat(touched), 0)
        self._spare = grad
        self.weight.grad = None  # the step is done with it (as zero_grad would say); no one else sees the spare

    def __getstate__(self) -> dict:  # copies and pickles leave the spare gradient behind
        return {**self.__dict__, "_spare": None, "_handed": None, "_touched": []}


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, owner: TokenEmbedding) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.owner = owner
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return ctx.owner._gradient(ids, grad_out.contiguous()), None, None


def enable_grad_recycling(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[TokenEmbedding]:
    """Turn recycling on for every :class:`TokenEmbedding` of ``model``, recycled after each step of
    ``optimizer``. The caller decides that nothing but autograd and this optimizer touches the
    gradients (see the module docstring)."""
    mods = [m for m in model.modules() if isinstance(m, TokenEmbedding)]
    for m in mods:
        m.recycling = True
    if mods:
        optimizer.register_step_post_hook(lambda *_: [m.recycle_grad() for m in mods])
    return mods
