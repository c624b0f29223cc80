"""Plain PyTorch models: no parallelism, no device logic."""

from mtx_dist.models.blocks import Attention, Block, Mlp
from mtx_dist.models.clip import ContrastiveModel
from mtx_dist.models.presets import PRESETS, ModelSpec, TextSpec, VisionSpec, get_preset
from mtx_dist.models.towers import TextTower, VisionTower, kept_patches, patch_keep_indices

__all__ = ["Attention", "Block", "ContrastiveModel", "Mlp", "ModelSpec", "PRESETS", "TextSpec",
           "TextTower", "VisionSpec", "VisionTower", "get_preset", "kept_patches", "patch_keep_indices"]
