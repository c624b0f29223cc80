"""Offline consolidation: one full fp32 state dict from a checkpoint of any ZeRO stage and TP size.

DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges the ZeRO partitions of the
data-parallel ranks but assumes a single model-parallel rank (``mp_rank_00``): given a TP=2
checkpoint it finds twice the optimizer files it expects and refuses. So each TP rank's files are
presented to it on their own, through a directory of symlinks renamed to ``mp_rank_00``, and the
resulting per-TP-rank state dicts are joined along each tensor's TP split (:func:`unshard_tensor`).

Without ZeRO (stage 0) there are no partitions: the weights are the module state in
``mp_rank_XX_model_states.pt`` (fp32 when training in fp32; under bf16 these are the bf16 weights,
since DeepSpeed's bf16 optimizer files carry no ZeRO layout that its merger reads).
"""

from __future__ import annotations

import os
import re

import torch

from mtx_dist.errors import UserError
from mtx_dist.parallel.tensor import unshard_tensor

_MP_RANK = re.compile(r"mp_rank_(\d+)")


class CheckpointLayoutError(UserError, ValueError):
    """A checkpoint directory whose files do not form a complete DeepSpeed checkpoint."""


def tp_ranks(tag_dir: str) -> list[int]:
    """TP ranks present in a DeepSpeed checkpoint directory (from its file names)."""
    ranks = {int(m.group(1)) for f in os.listdir(tag_dir) if f.endswith("_model_states.pt")
             for m in [_MP_RANK.search(f)] if m}
    if not ranks:
        raise CheckpointLayoutError(f"{tag_dir} holds no DeepSpeed '*_model_states.pt' files")
    if sorted(ranks) != list(range(len(ranks))):
        raise CheckpointLayoutError(f"{tag_dir}: tensor-parallel ranks {sorted(ranks)} are not 0..{len(ranks) - 1}")
    return sorted(ranks)


def _one_tp_rank(tag_dir: str, tp_rank: int) -> dict[str, torch.Tensor]:
    suffix = f"mp_rank_{tp_rank:02d}"
    files = [f for f in sorted(os.listdir(tag_dir)) if suffix in f and f.endswith(".pt")]
    if not any(f.endswith("_optim_states.pt") and not f.startswith("bf16_") for f in files):
        # ZeRO stage 0: the module's own state
        path = os.path.join(tag_dir, f"{suffix}_model_states.pt")
        if not os.path.exists(path):
            raise CheckpointLayoutError(f"{tag_dir}: no {os.path.basename(path)}")
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}
    from mtx_dist.deepspeed_compat import zero_fp32_state_dict

    return {k: v.float() for k, v in zero_fp32_state_dict(tag_dir, files, suffix).items()}


def consolidate_checkpoint(tag_dir: str) -> dict[str, torch.Tensor]:
    """Full float32 CPU state dict (names of the unparallelized model) from one checkpoint directory."""
    if not os.path.isdir(tag_dir):
        raise CheckpointLayoutError(f"{tag_dir} is not a checkpoint directory")
    parts = [_one_tp_rank(tag_dir, t) for t in tp_ranks(tag_dir)]
    names = list(parts[0])
    for t, p in enumerate(parts[1:], start=1):
        if list(p) != names:
            raise CheckpointLayoutError(f"{tag_dir}: TP rank {t} holds different tensors than TP rank 0")
    return {name: unshard_tensor(name, [p[name] for p in parts]) for name in names}

