"""Plain PyTorch models: no parallelism, no device logic.

The names load on first use (PEP 562): the geometry tables (``presets``) import no torch, so the
config can validate a preset before anything heavy loads.
"""

from __future__ import annotations

from mtx_dist.lazy import lazy_getattr

_WHERE = {
    "Attention": "blocks", "Block": "blocks", "Mlp": "blocks",
    "ContrastiveModel": "clip",
    "PRESETS": "presets", "ModelSpec": "presets", "TextSpec": "presets", "VisionSpec": "presets",
    "get_preset": "presets",
    "TextTower": "towers", "VisionTower": "towers", "kept_patches": "towers", "patch_keep_indices": "towers",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
