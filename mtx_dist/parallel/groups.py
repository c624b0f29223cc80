"""Process groups: tensor-parallel (TP) size T, data-parallel (DP) size D = world / T.

megatron-core's ``parallel_state`` builds the groups (TP ranks are adjacent, so a TP group stays
inside a node). With T = 1 we skip it and use the world group for data parallelism: nothing in
that path needs megatron-core.

DeepSpeed takes an ``mpu`` object to shard ZeRO over the data-parallel group only and to count
each TP shard once in the gradient norm. megatron-core's ``parallel_state`` lacks the
``get_model_parallel_*`` getters DeepSpeed calls, hence :class:`DeepSpeedMpu`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from mtx_dist.errors import UserError


class ParallelLayoutError(UserError, ValueError):
    """The world size cannot be split into the requested tensor-parallel size."""


@dataclass(frozen=True)
class ParallelGroups:
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: object | None  # None when tp_size == 1
    dp_group: object | None  # None = the default (world) group

    @property
    def tp(self) -> bool:
        return self.tp_size > 1


def _megatron_state():
    from megatron.core import parallel_state
    return parallel_state


def init_groups(tp_size: int, timeout_s: float) -> ParallelGroups:
    """Create the TP and DP groups on an initialized default process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ParallelLayoutError(f"tensor-parallel size {tp_size} does not divide the world size {world}")
    if tp_size == 1:
        return ParallelGroups(1, 0, world, rank, None, None)
    ps = _megatron_state()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp_size,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
            # The gloo twins of the NCCL groups are only needed for megatron's own optimizer.
            create_gloo_process_groups=False,
        )
    return ParallelGroups(
        tp_size, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_world_size(),
        ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(),
    )


def destroy_groups(groups: ParallelGroups) -> None:
    if groups.tp:
        _megatron_state().destroy_model_parallel()


class DeepSpeedMpu:
    """The ``mpu`` interface DeepSpeed reads, backed by megatron-core's parallel_state.

    With no pipeline parallelism the "model-parallel" group is the TP group. Deliberately no
    ``initialize_sequence_parallel``: DeepSpeed takes an mpu that has it for a Ulysses
    sequence-parallel one and then ignores the model-parallel group.
    """

    def __init__(self) -> None:
        self._ps = _megatron_state()

    # model parallel (= tensor parallel here)
    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())

    # pipeline (size 1)
    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

