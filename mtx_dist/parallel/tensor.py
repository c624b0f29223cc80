"""Tensor parallelism applied to a built model: swap linears for megatron-core's parallel ones.

In every block of both towers (Megatron's MLP/attention split):

    attn.qkv  -> ColumnParallelLinear   each rank holds its heads' rows of q, of k and of v
    attn.proj -> RowParallelLinear      input columns of those heads; all-reduce of the output
    mlp.fc1   -> ColumnParallelLinear   a slice of the hidden units
    mlp.fc2   -> RowParallelLinear      the matching input columns; all-reduce of the output

Everything else (embeddings, norms, projections, temperature) is replicated. Parameter names do
not change, so shard layouts follow from names alone (:func:`tp_kind`), which is what lets a
checkpoint written with any TP size be consolidated offline.

The model code (mtx_dist.models) is untouched: ``Attention`` derives its head count from the
width of the qkv output it receives, so the same forward runs on a full or a sharded projection.
On CPU megatron-core's parallel linears need no patching (``use_cpu_initialization``); its
CUDA-only paths (gather_output, sequence parallelism, its RNG tracker) are never used here.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from mtx_dist.models.blocks import Attention, Mlp
from mtx_dist.parallel.groups import ParallelGroups

QKV, COLUMN, ROW = "qkv", "column", "row"


def tp_kind(name: str) -> str | None:
    """How the tensor ``name`` is split across TP ranks: qkv (dim 0, per q/k/v), column (dim 0),
    row (dim 1) or None (replicated)."""
    if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        return QKV
    if name.endswith((".mlp.fc1.weight", ".mlp.fc1.bias")):
        return COLUMN
    if name.endswith((".attn.proj.weight", ".mlp.fc2.weight")):
        return ROW
    return None


def shard_tensor(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of the full tensor ``name``."""
    kind = tp_kind(name)
    if kind is None or size == 1:
        return full
    if kind == QKV:  # rows are (3, heads, head_dim): take our heads from each of q, k and v
        per_rank = full.shape[0] // (3 * size)
        return full.reshape(3, size, per_rank, *full.shape[1:])[:, rank].reshape(-1, *full.shape[1:])
    return full.chunk(size, dim=0 if kind == COLUMN else 1)[rank]


def unshard_tensor(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from all TP ranks' slices, in rank order."""
    kind = tp_kind(name)
    if kind is None or len(shards) == 1:
        return shards[0]
    if kind == QKV:
        rest = shards[0].shape[1:]
        return torch.cat([s.reshape(3, -1, *rest) for s in shards], dim=1).reshape(-1, *rest)
    return torch.cat(shards, dim=0 if kind == COLUMN else 1)


@functools.cache
def _parallel_linear_classes():
    """Defined on first use: megatron-core is imported only when TP > 1."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """ColumnParallelLinear that returns the output alone, like nn.Linear (bias added inside)."""

        get_extra_state = nn.Module.get_extra_state  # no '_extra_state' entries: same keys as nn.Linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        """RowParallelLinear on a TP-sharded input that returns the (all-reduced) output alone."""

        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear, RowLinear


def _no_init(_: torch.Tensor) -> None:
    """Weights are copied from the already-initialized full linear, never drawn again."""


def apply_tensor_parallel(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Swap the linears of every Attention and Mlp in ``model`` for TP shards of the same weights.

    The full model must be built identically on every TP rank (same seed): each rank keeps its
    slice, so a TP model starts from exactly the weights of the unsharded one. A model on the meta
    device (:mod:`mtx_dist.models.deferred`) gets its shards on the meta device too: the replayed
    initialisation allocates each one on the run's device only when its values are in
    (:func:`shard_tensor` of the full parameter), so with ZeRO-3 no rank ever holds all of its slices
    at once.
    """
    if not groups.tp:
        return model
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    column_cls, row_cls = _parallel_linear_classes()
    names = {id(m): n for n, m in model.named_modules()}
    for module in list(model.modules()):
        if isinstance(module, Attention):
            pairs = (("qkv", True), ("proj", False))
        elif isinstance(module, Mlp):
            pairs = (("fc1", True), ("fc2", False))
        else:
            continue
        for attr, column in pairs:
            old: nn.Linear = getattr(module, attr)
            full_name = f"{names[id(module)]}.{attr}"
            deferred = old.weight.is_meta
            config = ModelParallelConfig(  # CPU initialisation: allocated where torch.empty puts it
                tensor_model_parallel_size=groups.tp_size, params_dtype=old.weight.dtype,
                use_cpu_initialization=deferred or old.weight.device.type == "cpu", perform_initialization=False,
            )
            kwargs = dict(config=config, init_method=_no_init, bias=old.bias is not None,
                          tp_group=groups.tp_group)
            with torch.device("meta") if deferred else contextlib.nullcontext():
                if column:
                    new = column_cls(old.in_features, old.out_features, gather_output=False, **kwargs)
                else:
                    new = row_cls(old.in_features, old.out_features, input_is_parallel=True, skip_bias_add=False,
                                  **kwargs)
            if not deferred:
                new = new.to(old.weight.device)
                with torch.no_grad():
                    new.weight.copy_(shard_tensor(full_name + ".weight", old.weight, groups.tp_rank, groups.tp_size))
                    if old.bias is not None:
                        new.bias.copy_(shard_tensor(full_name + ".bias", old.bias, groups.tp_rank, groups.tp_size))
            # megatron-core sets these only when it initializes the weight itself; DeepSpeed's
            # gradient norm reads them to count each shard once across the TP group.
            set_tensor_model_parallel_attributes(new.weight, True, 0 if column else 1, 1)
            setattr(module, attr, new)
    return model


def gather_tensor_parallel(tensors: dict[str, torch.Tensor], groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Full tensors from TP shards (a collective over the TP group); replicated ones pass through."""
    if not groups.tp:
        return tensors
    out = {}
    for name, t in tensors.items():
        if tp_kind(name) is None:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=groups.tp_group)
        out[name] = unshard_tensor(name, parts)
    return out


def grad_norm(model: nn.Module, groups: ParallelGroups) -> float:
    """L2 norm of the gradients in ``.grad`` over the whole (unsharded) model: TP-sharded
    gradients are summed over the TP group, replicated ones counted once."""
    device = next(model.parameters()).device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if groups.tp:
        dist.all_reduce(sharded, group=groups.tp_group)
    return float((sharded + replicated).sqrt())
