"""Parallelism applied around plain models: process groups, tensor parallelism, activation
checkpointing, distributed collectives for the losses, and checkpoint consolidation.

ZeRO itself is DeepSpeed's business (mtx_dist.engine); this package prepares the model and the
groups DeepSpeed is given.
"""

from __future__ import annotations

import torch.utils.checkpoint
from torch import nn

from mtx_dist.models.blocks import Block
from mtx_dist.parallel.groups import DeepSpeedMpu, ParallelGroups, ParallelLayoutError, destroy_groups, init_groups
from mtx_dist.parallel.tensor import (apply_tensor_parallel, gather_tensor_parallel, grad_norm, shard_tensor, tp_kind,
                                      unshard_tensor)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every transformer block's activations in the backward instead of storing them.

    The block's bound ``forward`` is replaced on the instance rather than the block wrapped in
    another module, so parameter names (and hence checkpoints and exports) stay the same. torch's
    non-reentrant checkpoint re-enters the submodules' forward, which keeps ZeRO-3's parameter
    fetch hooks and the TP collectives working in the recomputation.
    """
    for module in model.modules():
        if isinstance(module, Block):
            inner = module.forward

            def forward(x, at=None, _inner=inner):
                return torch.utils.checkpoint.checkpoint(_inner, x, at, use_reentrant=False)

            module.forward = forward
    return model


def parallelize(model: nn.Module, groups: ParallelGroups, activation_checkpointing: bool = False) -> nn.Module:
    """Tensor parallelism (when groups.tp_size > 1), then activation checkpointing (when asked). A model on
    the meta device gets its TP shards on the meta device too (see apply_tensor_parallel)."""
    apply_tensor_parallel(model, groups)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


__all__ = ["DeepSpeedMpu", "ParallelGroups", "ParallelLayoutError", "apply_activation_checkpointing",
           "apply_tensor_parallel", "destroy_groups", "gather_tensor_parallel", "grad_norm", "init_groups",
           "parallelize", "shard_tensor", "tp_kind", "unshard_tensor"]
